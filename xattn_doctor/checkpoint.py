"""Resolve a checkpoint (file, sharded index or directory) and read it lazily.

Headers are read and checked first, by our own parser; tensors are then read (positioned
reads, the file opened read-only) one block at a time, only the rows a block needs. Pickles are
refused, never loaded.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from xattn_doctor.errors import CheckpointError, PickleRefused
from xattn_doctor.layouts._base import KeyIndex, ModelConfig, TensorRef
from xattn_doctor.st_header import FLOAT_DTYPES, TORCH_NAMES, Header, read_header

PICKLE_SUFFIXES = {".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle"}
INDEX_SUFFIX = ".safetensors.index.json"
MAX_JSON = 64 * 1024 * 1024
NOT_REGULAR = "not a regular file or directory (a FIFO, device or socket would block or never end)"


@dataclass
class Checkpoint:
    """A resolved checkpoint: its shards' headers, where each key lives, and config.json."""

    path: Path
    headers: list[Header]
    where: dict[str, Header]
    config: ModelConfig
    config_path: Path | None

    @property
    def index(self) -> KeyIndex:
        """Key names and shapes (no data read)."""
        return KeyIndex({k: h.tensors[k].shape for k, h in self.where.items()})

    @property
    def nbytes(self) -> int:
        """Bytes on disk over all shards."""
        return sum(h.size for h in self.headers)

    @property
    def dtype(self) -> str:
        """The floating dtype holding most of the bytes ('float32' when there is none)."""
        weight: Counter[str] = Counter()
        for key, h in self.where.items():
            t = h.tensors[key]
            if t.dtype in FLOAT_DTYPES:
                weight[t.torch_dtype] += t.end - t.start
        return weight.most_common(1)[0][0] if weight else "float32"

    def dtype_of(self, key: str) -> str:
        """The torch dtype name of one tensor."""
        return TORCH_NAMES[self.where[key].tensors[key].dtype]

    def load(self, refs: Mapping[str, TensorRef]) -> dict[str, Any]:
        """Read the tensors `refs` names (by role), only the packed rows asked for.

        Plain positioned reads into fresh buffers, not a memory map: the pages of the blocks
        already done do not linger in the process's resident set.
        """
        out: dict[str, Any] = {}
        for role, ref in refs.items():
            header = self.where.get(ref.key)
            if header is None:
                raise CheckpointError(self.path, f"tensor {ref.key!r} is not in the checkpoint")
            code = header.tensors[ref.key].dtype
            if code not in FLOAT_DTYPES and not code.startswith("F8_"):
                raise CheckpointError(header.path, f"tensor {ref.key!r} has dtype {code}; "
                                                   "attention weights must be floating point")
            out[role] = read_tensor(header, ref.key, ref.rows)
        return out


def read_tensor(header: Header, key: str, rows: tuple[int, int] | None = None) -> Any:
    """One tensor (or rows [a, b) of it) of a validated shard, read from disk."""
    import torch

    info = header.tensors[key]
    shape = list(info.shape)
    start, end = info.start, info.end
    if rows is not None:
        if not (shape and 0 <= rows[0] <= rows[1] <= shape[0]):
            raise CheckpointError(header.path, f"tensor {key!r} of shape {shape} has no rows "
                                               f"{rows[0]}..{rows[1]}")
        row = (end - start) // shape[0] if shape[0] else 0
        start, end = start + rows[0] * row, start + rows[1] * row
        shape[0] = rows[1] - rows[0]
    dtype = getattr(torch, info.torch_dtype)
    if end == start:
        return torch.empty(shape, dtype=dtype)
    buf = bytearray(end - start)
    try:
        with header.path.open("rb") as fh:
            fh.seek(header.data_start + start)
            got = fh.readinto(buf)
    except OSError as e:
        raise CheckpointError(header.path, f"cannot read tensor {key!r}: {e.strerror or e}") from e
    if got != len(buf):
        raise CheckpointError(header.path, f"tensor {key!r} is truncated: {got} of {len(buf)} "
                                           "bytes")
    return torch.frombuffer(buf, dtype=dtype).reshape(shape)


def open_checkpoint(path: Path) -> Checkpoint:
    """Resolve `path` to its shards and config; raise CheckpointError/PickleRefused."""
    if not path.exists():
        raise CheckpointError(path, "no such file or directory")
    if not path.is_dir() and not path.is_file():
        raise CheckpointError(path, NOT_REGULAR)
    if path.is_dir():
        files, config_dir = _from_directory(path), path
    elif path.name.endswith(INDEX_SUFFIX) or path.name.endswith(".index.json"):
        files, config_dir = _from_index(path), path.parent
    else:
        _refuse_pickle(path)
        files, config_dir = [path], path.parent
    headers = [read_header(f) for f in files]
    where: dict[str, Header] = {}
    for h in headers:
        for key in h.tensors:
            if key in where:
                raise CheckpointError(h.path, f"tensor {key!r} is also in {where[key].path.name}")
            where[key] = h
    if not where:
        raise CheckpointError(path, "the checkpoint holds no tensors")
    config, config_path = _config(config_dir)
    return Checkpoint(path, headers, where, config, config_path)


def _refuse_pickle(path: Path) -> None:
    if path.suffix.lower() in PICKLE_SUFFIXES:
        raise PickleRefused(path)
    try:
        with path.open("rb") as fh:
            magic = fh.read(9)
    except OSError as e:
        raise CheckpointError(path, f"cannot read: {e.strerror or e}") from e
    if magic[8:9] == b"{":  # safetensors: 8-byte header length, then the JSON header
        return
    if magic[:1] == b"\x80" and len(magic) > 1 and 2 <= magic[1] <= 5 or magic[:2] == b"PK":
        raise PickleRefused(path)


def _from_directory(path: Path) -> list[Path]:
    indexes = sorted(path.glob(f"*{INDEX_SUFFIX}"))
    if len(indexes) == 1:
        return _from_index(indexes[0])
    if len(indexes) > 1:
        raise CheckpointError(path, "several sharded indexes (" + ", ".join(
            i.name for i in indexes) + "); pass the one to diagnose")
    files = sorted(p for p in path.glob("*.safetensors") if p.is_file())
    if files:
        return files
    pickles = sorted(p.name for p in path.iterdir() if p.suffix.lower() in PICKLE_SUFFIXES)
    if pickles:
        raise PickleRefused(path / pickles[0])
    raise CheckpointError(path, "directory holds no .safetensors weights or index")


def _from_index(path: Path) -> list[Path]:
    data = _read_json(path, CheckpointError)
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise CheckpointError(path, "sharded index has no `weight_map` object")
    shards: dict[str, list[str]] = {}
    for key, shard in weight_map.items():
        if not isinstance(shard, str) or "/" in shard or "\\" in shard or shard in ("", ".", ".."):
            raise CheckpointError(path, f"weight_map entry {key!r} names a bad shard {shard!r}")
        shards.setdefault(shard, []).append(key)
    missing = [s for s in shards if not (path.parent / s).is_file()]
    if missing:
        raise CheckpointError(path, f"index names missing shard(s): {', '.join(sorted(missing))}")
    files = [path.parent / s for s in sorted(shards)]
    for f in files:
        _refuse_pickle(f)
    _check_index_keys(path, files, shards)
    return files


def _check_index_keys(path: Path, files: Iterable[Path], shards: dict[str, list[str]]) -> None:
    for f in files:
        present = read_header(f).tensors
        absent = [k for k in shards[f.name] if k not in present]
        if absent:
            raise CheckpointError(path, f"index maps {absent[0]!r} to {f.name}, which lacks it")


def _config(folder: Path) -> tuple[ModelConfig, Path | None]:
    cfg = folder / "config.json"
    if not cfg.is_file():
        return ModelConfig(), None
    data = _read_json(cfg, CheckpointError)
    if not isinstance(data, dict):
        raise CheckpointError(cfg, "config.json is not a JSON object")
    return ModelConfig(data), cfg


def _read_json(path: Path, error: type[CheckpointError]) -> Any:
    if path.exists() and not path.is_file():
        raise error(path, NOT_REGULAR)
    try:
        if path.stat().st_size > MAX_JSON:
            raise error(path, f"JSON file larger than {MAX_JSON // 2**20} MiB")
        return json.loads(path.read_text(encoding="utf-8"))
    except RecursionError as e:
        raise error(path, "not valid JSON: nested too deeply") from e
    except (OSError, ValueError) as e:  # ValueError: bad UTF-8, bad JSON, a huge integer
        raise error(path, f"not valid JSON: {e}") from e
