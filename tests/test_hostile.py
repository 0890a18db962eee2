"""Hostile and broken inputs: each is exit 2 with one stderr line naming the file.

CONTRACT.md: exit 2 = could not diagnose, one clear line on stderr naming the file and what
is wrong, no traceback; inputs are only ever read. Every case here runs on copies in a tmp
directory and checks, around the run, that every file there is byte-identical with the same
mtime and that no file appeared (the working directory is an empty tmp directory too).
A few odd-but-valid inputs (NaN/Inf in the probe, any integer --seed, a pyproject.toml whose
`tool` is not a table) must instead be diagnosed (exit 0 or 1). Last, hypothesis mutates the
healthy fixture's checkpoint and probe: whatever comes out must be exit 0, 1 or 2, one line.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import shutil
import struct
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file
from typer.testing import CliRunner

from xattn_doctor.cli import app

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "fixtures"
HEALTHY = FIXTURES / "healthy"

# ----------------------------------------------------------------------------- helpers


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread() -> Iterator[None]:
    """The tensors here are tiny: one intra-op thread is several times faster than many
    threads fighting over a busy CI machine's cores."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def snapshot(root: Path, skip: frozenset[Path] = frozenset()) -> dict[str, tuple[Any, ...]]:
    """Every path under root: (kind, sha256, size, mtime_ns); files in `skip` are not hashed."""
    out: dict[str, tuple[Any, ...]] = {}
    for p in sorted(root.rglob("*")):
        st_ = p.lstat()
        if p.is_file() and p not in skip:
            out[str(p)] = ("file", hashlib.sha256(p.read_bytes()).hexdigest(), st_.st_size,
                           st_.st_mtime_ns)
        elif p.is_file():
            out[str(p)] = ("file", None, st_.st_size, st_.st_mtime_ns)
        elif p.is_dir():
            out[str(p)] = ("dir",)
        else:  # a FIFO made by a test: never opened, so only its mtime can tell
            out[str(p)] = ("other", st_.st_mtime_ns)
    return out


@contextlib.contextmanager
def untouched(root: Path, skip: frozenset[Path] = frozenset()) -> Iterator[None]:
    """Assert that nothing under root is modified, created or removed inside the block."""
    before = snapshot(root, skip)
    yield
    after = snapshot(root, skip)
    assert sorted(after) == sorted(before), "files appeared or vanished"
    for k, v in before.items():
        assert after[k] == v, f"{k} was modified"


def invoke(args: list[str], root: Path, skip: frozenset[Path] = frozenset()) -> Any:
    """Run the CLI in-process with an empty tmp cwd, checking `root` is left untouched."""
    cwd = root / "cwd"
    cwd.mkdir(exist_ok=True)
    with untouched(root, skip), contextlib.chdir(cwd):
        result = CliRunner().invoke(app, args)
    return result


def assert_refused(result: Any, *names: str | Path, says: str | None = None) -> str:
    """Exit 2, exactly one stderr line naming one of `names`, no traceback, no report."""
    assert "Traceback" not in result.stdout + result.stderr
    assert result.exit_code == 2, (result.exit_code, result.stdout, result.stderr,
                                   result.exception)
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    line = lines[0]
    assert "internal error" not in line, line
    if names:
        assert any(str(n) in line for n in names), (line, names)
    if says is not None:
        assert says.lower() in line.lower(), line
    assert result.stdout == "", result.stdout
    return line


def diagnose(ckpt: Path | str, probe: Path | str | None, root: Path, *extra: str,
             skip: frozenset[Path] = frozenset()) -> Any:
    args = ["diagnose", str(ckpt)]
    if probe is not None:
        args += ["--probe", str(probe)]
    return invoke(args + ["--format", "json", *extra], root, skip)


def copy_fixture(tmp: Path, name: str = "healthy") -> Path:
    dest = tmp / name
    shutil.copytree(FIXTURES / name, dest)
    return dest


def raw_safetensors(path: Path, header: Any, data: bytes = b"", length: int | None = None) -> Path:
    """Write a safetensors file by hand: header (dict, or raw bytes) and data buffer."""
    blob = header if isinstance(header, bytes) else json.dumps(header).encode()
    n = len(blob) if length is None else length
    path.write_bytes(struct.pack("<Q", n) + blob + data)
    return path


class _Marker:
    """Unpickling this creates `path`: proof that something was unpickled."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def __reduce__(self) -> tuple[Any, ...]:
        return (open, (self.path, "w"))


def write_pickle(path: Path, marker: Path, zipped: bool = True) -> Path:
    torch.save({"weight": torch.zeros(2, 2), "evil": _Marker(marker)}, path,
               _use_new_zipfile_serialization=zipped)
    assert not marker.exists()
    return path


# ----------------------------------------------------------------------------- checkpoints
# Each builder makes its files under tmp and returns (checkpoint arg, names one of which the
# message must contain, a phrase it must contain or None).

Case = Callable[[Path], tuple[Path, list[Path], str | None]]


def _empty(tmp: Path):
    p = tmp / "model.safetensors"
    p.write_bytes(b"")
    return p, [p], "not a safetensors file"


def _truncated_in_data(tmp: Path):
    p = tmp / "model.safetensors"
    data = (HEALTHY / "model.safetensors").read_bytes()
    p.write_bytes(data[: len(data) - 100])
    return p, [p], "truncated"


def _truncated_in_header(tmp: Path):
    p = tmp / "model.safetensors"
    data = (HEALTHY / "model.safetensors").read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    p.write_bytes(data[: 8 + n // 2])
    return p, [p], "truncated"


def _random_bytes(tmp: Path):
    p = tmp / "model.safetensors"
    p.write_bytes(bytes((i * 7919 + 13) % 251 for i in range(4096)))
    return p, [p], None


def _header_claims_gigabytes(tmp: Path):
    p = raw_safetensors(tmp / "model.safetensors", {}, b"", length=5 * 2**30)
    return p, [p], None


def _header_claims_2_64(tmp: Path):
    p = raw_safetensors(tmp / "model.safetensors", {}, b"", length=2**64 - 1)
    return p, [p], None


def _offsets_past_end(tmp: Path):
    p = raw_safetensors(tmp / "model.safetensors",
                        {"w": {"dtype": "F32", "shape": [4, 4], "data_offsets": [0, 64]}},
                        bytes(32))
    return p, [p], "past"


def _offsets_past_end_huge(tmp: Path):
    n = 2**40
    p = raw_safetensors(tmp / "model.safetensors",
                        {"w": {"dtype": "U8", "shape": [n], "data_offsets": [0, n]}}, bytes(16))
    return p, [p], "past"


def _overlapping(tmp: Path):
    p = raw_safetensors(tmp / "model.safetensors",
                        {"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]},
                         "b": {"dtype": "F32", "shape": [4], "data_offsets": [8, 24]}},
                        bytes(24))
    return p, [p], "overlap"


def _span_mismatch(tmp: Path):
    p = raw_safetensors(tmp / "model.safetensors",
                        {"a": {"dtype": "F64", "shape": [4], "data_offsets": [0, 16]}},
                        bytes(16))
    return p, [p], "bytes"


def _unsupported_dtype(tmp: Path):
    p = raw_safetensors(tmp / "model.safetensors",
                        {"a": {"dtype": "C64", "shape": [2], "data_offsets": [0, 16]}},
                        bytes(16))
    return p, [p], "dtype"


def _header_list(tmp: Path):
    p = raw_safetensors(tmp / "model.safetensors", [1, 2, 3])
    return p, [p], "not a JSON object"


def _header_string(tmp: Path):
    p = raw_safetensors(tmp / "model.safetensors", "hello")
    return p, [p], "not a JSON object"


def _header_null(tmp: Path):
    p = raw_safetensors(tmp / "model.safetensors", None)
    return p, [p], "not a JSON object"


def _header_not_utf8(tmp: Path):
    p = raw_safetensors(tmp / "model.safetensors", b"\xff\xfe{}")
    return p, [p], None


def _header_deeply_nested(tmp: Path):
    p = raw_safetensors(tmp / "model.safetensors", b"[" * 100_000 + b"]" * 100_000)
    return p, [p], "nested"


def _header_huge_integer(tmp: Path):
    p = raw_safetensors(tmp / "model.safetensors",
                        b'{"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 1'
                        + b"0" * 5000 + b"]}}", bytes(16))
    return p, [p], None


def _bad_shape(tmp: Path):
    p = raw_safetensors(tmp / "model.safetensors",
                        {"a": {"dtype": "F32", "shape": [-1, 4], "data_offsets": [0, 16]}},
                        bytes(16))
    return p, [p], "shape"


def _metadata_not_object(tmp: Path):
    p = raw_safetensors(tmp / "model.safetensors", {"__metadata__": [1]})
    return p, [p], None


def _no_tensors(tmp: Path):
    p = raw_safetensors(tmp / "model.safetensors", {})
    return p, [p], "no tensors"


def _text_file(tmp: Path):
    p = tmp / "notes.txt"
    p.write_text("These are not weights.\n" * 20)
    return p, [p], None


def _text_file_as_safetensors(tmp: Path):
    p = tmp / "model.safetensors"
    p.write_text("{\"weights\": \"somewhere else\"}\n")
    return p, [p], None


def _zip_as_safetensors(tmp: Path):
    p = write_pickle(tmp / "model.safetensors", tmp / "MARKER")
    return p, [p], "unpickled"


def _legacy_pickle_as_safetensors(tmp: Path):
    p = write_pickle(tmp / "model.safetensors", tmp / "MARKER", zipped=False)
    return p, [p], "unpickled"


def _dir_without_weights(tmp: Path):
    d = tmp / "ckpt"
    d.mkdir()
    (d / "README.md").write_text("nothing here\n")
    (d / "config.json").write_text("{}")
    return d, [d], "no .safetensors"


def _dir_with_pickle(tmp: Path):
    d = tmp / "ckpt"
    d.mkdir()
    write_pickle(d / "pytorch_model.bin", tmp / "MARKER")
    return d, [d], "unpickled"


def _sharded(tmp: Path) -> tuple[Path, dict[str, Any]]:
    d = copy_fixture(tmp, "stack6_sharded")
    index = d / "model.safetensors.index.json"
    return index, json.loads(index.read_text())


def _index_missing_shard(tmp: Path):
    index, _ = _sharded(tmp)
    (index.parent / "model-00002-of-00002.safetensors").unlink()
    return index, [index], "missing shard"


def _index_key_in_wrong_shard(tmp: Path):
    index, data = _sharded(tmp)
    wm = data["weight_map"]
    key = next(k for k, v in wm.items() if v == "model-00002-of-00002.safetensors")
    wm[key] = "model-00001-of-00002.safetensors"
    index.write_text(json.dumps(data))
    return index, [index], "lacks it"


def _index_dotdot_shard(tmp: Path):
    index, data = _sharded(tmp)
    # A file the traversal would reach, so following it would "work".
    shutil.copy(index.parent / "model-00001-of-00002.safetensors", tmp / "x.safetensors")
    wm = data["weight_map"]
    for k in list(wm)[:3]:
        wm[k] = "../x.safetensors"
    index.write_text(json.dumps(data))
    return index, [index], "bad shard"


def _index_absolute_shard(tmp: Path):
    index, data = _sharded(tmp)
    wm = data["weight_map"]
    wm[next(iter(wm))] = str(index.parent / "model-00001-of-00002.safetensors")
    index.write_text(json.dumps(data))
    return index, [index], "bad shard"


def _index_not_json(tmp: Path):
    index, _ = _sharded(tmp)
    index.write_text("{\"weight_map\": ")
    return index, [index], "JSON"


def _index_deeply_nested(tmp: Path):
    index, _ = _sharded(tmp)
    index.write_text("[" * 100_000 + "]" * 100_000)
    return index, [index], "JSON"


def _index_huge_integer(tmp: Path):
    index, _ = _sharded(tmp)
    index.write_text('{"weight_map": {"a": 1' + "0" * 5000 + "}}")
    return index, [index], "JSON"


def _index_odd_shard_names(tmp: Path):
    index, data = _sharded(tmp)
    wm = data["weight_map"]
    for k, bad in zip(list(wm), ["a\u0000b.safetensors", "two\nlines.safetensors", "", ".."]):
        wm[k] = bad
    index.write_text(json.dumps(data))
    return index, [index], None


def _index_weight_map_list(tmp: Path):
    index, data = _sharded(tmp)
    data["weight_map"] = list(data["weight_map"].items())
    index.write_text(json.dumps(data))
    return index, [index], "weight_map"


def _index_no_weight_map(tmp: Path):
    index, _ = _sharded(tmp)
    index.write_text(json.dumps({"metadata": {}}))
    return index, [index], "weight_map"


def _index_pickle_shard(tmp: Path):
    index, data = _sharded(tmp)
    write_pickle(index.parent / "evil.safetensors", tmp / "MARKER")
    data["weight_map"][next(iter(data["weight_map"]))] = "evil.safetensors"
    index.write_text(json.dumps(data))
    return index, [index.parent / "evil.safetensors"], "unpickled"


def _config_invalid_json(tmp: Path):
    d = copy_fixture(tmp)
    (d / "config.json").write_text("{\"num_attention_heads\": 4,,}")
    return d / "model.safetensors", [d / "config.json"], "JSON"


def _config_deeply_nested(tmp: Path):
    d = copy_fixture(tmp)
    (d / "config.json").write_text('{"a":' * 50_000 + "1" + "}" * 50_000)
    return d / "model.safetensors", [d / "config.json"], "JSON"


def _config_not_object(tmp: Path):
    d = copy_fixture(tmp)
    (d / "config.json").write_text("[4]")
    return d / "model.safetensors", [d / "config.json"], "object"


def _mlp_only(tmp: Path):
    p = tmp / "mlp.safetensors"
    g = torch.Generator().manual_seed(0)
    save_file({"mlp.fc1.weight": torch.randn(64, 32, generator=g),
               "mlp.fc1.bias": torch.zeros(64),
               "mlp.fc2.weight": torch.randn(32, 64, generator=g),
               "mlp.fc2.bias": torch.zeros(32)}, str(p))
    return p, [p], "no cross-attention block recognised"


def _retyped(tmp: Path, dtype: str) -> Path:
    """The healthy checkpoint with every F32 tensor relabelled `dtype` (same byte size)."""
    src = (HEALTHY / "model.safetensors").read_bytes()
    (n,) = struct.unpack("<Q", src[:8])
    header = src[8:8 + n].replace(b'"F32"', f'"{dtype}"'.encode())
    assert len(header) == n
    d = copy_fixture(tmp)
    p = d / "model.safetensors"
    p.write_bytes(src[:8] + header + src[8 + n:])
    return p


def _integer_weights(tmp: Path):
    p = _retyped(tmp, "I32")
    return p, [p], "dtype"


def _unsigned_weights(tmp: Path):
    p = _retyped(tmp, "U32")
    return p, [p], "dtype"


def _edited(tmp: Path, edit: Callable[[dict[str, Any]], None]) -> Path:
    """The healthy checkpoint with its header edited (data untouched; still valid JSON)."""
    src = (HEALTHY / "model.safetensors").read_bytes()
    (n,) = struct.unpack("<Q", src[:8])
    header = json.loads(src[8:8 + n])
    edit(header)
    d = copy_fixture(tmp)
    return raw_safetensors(d / "model.safetensors", header, src[8 + n:])


def _bias_shape(tmp: Path):
    def edit(h: dict[str, Any]) -> None:
        h["layers.0.cross_attn.in_proj_bias"]["shape"] = [1, 96]
    p = _edited(tmp, edit)
    return p, [p], "in_proj_bias"


def _weight_transposed(tmp: Path):
    def edit(h: dict[str, Any]) -> None:
        h["layers.1.cross_attn.out_proj.weight"]["shape"] = [16, 64]
    p = _edited(tmp, edit)
    return p, [p], "out_proj.weight"


def _norm_width(tmp: Path):
    def edit(h: dict[str, Any]) -> None:
        h["layers.0.key_norm.weight"]["shape"] = [2, 16]
    p = _edited(tmp, edit)
    return p, [p], None


def _gate_shape(tmp: Path):
    def edit(h: dict[str, Any]) -> None:
        entry = h["layers.0.gate"]
        start = entry["data_offsets"][0]
        entry.update(shape=[0], data_offsets=[start, start])
    p = _edited(tmp, edit)
    return p, [p], "gate"


def _hole_in_data(tmp: Path):
    p = _edited(tmp, lambda h: h.pop("layers.0.cross_attn.out_proj.bias"))
    return p, [p], "no tensor"


def _trailing_bytes(tmp: Path):
    d = copy_fixture(tmp)
    p = d / "model.safetensors"
    p.write_bytes(p.read_bytes() + bytes(8))
    return p, [p], "trailing"


CHECKPOINT_CASES: dict[str, Case] = {
    "empty": _empty,
    "truncated_in_data": _truncated_in_data,
    "truncated_in_header": _truncated_in_header,
    "random_bytes": _random_bytes,
    "header_claims_gigabytes": _header_claims_gigabytes,
    "header_claims_2_64": _header_claims_2_64,
    "offsets_past_end": _offsets_past_end,
    "offsets_past_end_huge": _offsets_past_end_huge,
    "overlapping_tensors": _overlapping,
    "hole_in_data": _hole_in_data,
    "trailing_bytes": _trailing_bytes,
    "dtype_span_mismatch": _span_mismatch,
    "unsupported_dtype": _unsupported_dtype,
    "header_is_list": _header_list,
    "header_is_string": _header_string,
    "header_is_null": _header_null,
    "header_not_utf8": _header_not_utf8,
    "header_deeply_nested": _header_deeply_nested,
    "header_huge_integer": _header_huge_integer,
    "negative_shape": _bad_shape,
    "metadata_not_object": _metadata_not_object,
    "no_tensors": _no_tensors,
    "text_file": _text_file,
    "text_file_as_safetensors": _text_file_as_safetensors,
    "pt_zip_renamed_safetensors": _zip_as_safetensors,
    "legacy_pickle_renamed_safetensors": _legacy_pickle_as_safetensors,
    "directory_without_weights": _dir_without_weights,
    "directory_with_pickle": _dir_with_pickle,
    "index_missing_shard": _index_missing_shard,
    "index_key_in_wrong_shard": _index_key_in_wrong_shard,
    "index_dotdot_shard": _index_dotdot_shard,
    "index_absolute_shard": _index_absolute_shard,
    "index_not_json": _index_not_json,
    "index_without_weight_map": _index_no_weight_map,
    "index_odd_shard_names": _index_odd_shard_names,
    "index_weight_map_list": _index_weight_map_list,
    "index_deeply_nested": _index_deeply_nested,
    "index_huge_integer": _index_huge_integer,
    "index_pickle_shard": _index_pickle_shard,
    "config_invalid_json": _config_invalid_json,
    "config_not_object": _config_not_object,
    "config_deeply_nested": _config_deeply_nested,
    "no_cross_attention": _mlp_only,
    "bias_shape_mismatch": _bias_shape,
    "weight_shape_mismatch": _weight_transposed,
    "norm_shape_mismatch": _norm_width,
    "empty_gate": _gate_shape,
    "integer_weights": _integer_weights,
    "unsigned_weights": _unsigned_weights,
}


CHECKPOINT_PARAMS = list(CHECKPOINT_CASES)


@pytest.mark.parametrize("case", CHECKPOINT_PARAMS)
def test_bad_checkpoint(case: str, tmp_path: Path) -> None:
    probe = copy_fixture(tmp_path / "p") / "probe.safetensors"
    ckpt, names, says = CHECKPOINT_CASES[case](tmp_path)
    result = diagnose(ckpt, probe, tmp_path)
    assert_refused(result, *names, says=says)
    assert not (tmp_path / "MARKER").exists()


def test_checkpoint_not_a_regular_file(tmp_path: Path) -> None:
    fifo = tmp_path / "model.safetensors"
    os.mkfifo(fifo)  # opening it for reading would block forever
    assert_refused(diagnose(fifo, None, tmp_path), fifo, says="regular file")
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    index = ckpt / "model.safetensors.index.json"
    os.mkfifo(index)
    assert_refused(diagnose(ckpt, None, tmp_path), index, says="regular file")


def test_checkpoint_is_a_device(tmp_path: Path) -> None:
    assert_refused(diagnose("/dev/zero", None, tmp_path), "/dev/zero", says="regular file")


@pytest.mark.parametrize("name", ["two\nlines.safetensors", "tab\tand\rreturn.safetensors",
                                  "ünïcödé model.safetensors"])
def test_file_name_cannot_break_the_line(name: str, tmp_path: Path) -> None:
    p = tmp_path / name
    p.write_bytes(b"")
    shown = str(p) if str(p).isprintable() else repr(str(p))
    assert_refused(diagnose(p, None, tmp_path), shown)


def test_second_checkpoint_broken(tmp_path: Path) -> None:
    """Several checkpoints: one bad one means no report at all (exit 2, stdout empty)."""
    d = copy_fixture(tmp_path)
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x00" * 3)
    assert_refused(invoke(["diagnose", str(d / "model.safetensors"), str(bad), "--probe",
                           str(d / "probe.safetensors"), "--format", "json"], tmp_path), bad)


def test_missing_checkpoint(tmp_path: Path) -> None:
    missing = tmp_path / "nope.safetensors"
    assert_refused(diagnose(missing, None, tmp_path), missing)


@pytest.mark.parametrize("suffix", [".bin", ".pt", ".pth", ".ckpt"])
def test_pickle_refused_without_unpickling(suffix: str, tmp_path: Path) -> None:
    marker = tmp_path / "MARKER"
    p = write_pickle(tmp_path / f"pytorch_model{suffix}", marker)
    # The marker really would be made by unpickling (so its absence below proves something).
    with tempfile.TemporaryDirectory() as other:
        probe_marker = Path(other) / "MARKER"
        torch.load(write_pickle(Path(other) / "m.pt", probe_marker), weights_only=False)
        assert probe_marker.exists()
    line = assert_refused(diagnose(p, None, tmp_path), p, says="never unpickled")
    assert "safetensors" in line
    assert not marker.exists()


# ----------------------------------------------------------------------------- probes

Tensors = dict[str, torch.Tensor]


def _probe_tensors() -> Tensors:
    from safetensors.torch import load_file

    return load_file(str(HEALTHY / "probe.safetensors"))


def _widths_fit_none() -> Tensors:
    return {"hidden_states": torch.randn(2, 8, 48), "encoder_hidden_states": torch.randn(2, 16, 40)}


def _integer_probe() -> Tensors:
    return {k: v.to(torch.int64) for k, v in _probe_tensors().items()}


def _zero_length_queries() -> Tensors:
    t = _probe_tensors()
    t["hidden_states"] = torch.zeros(2, 0, 32)
    return t


def _zero_length_keys() -> Tensors:
    return {"hidden_states": torch.randn(2, 8, 32), "encoder_hidden_states": torch.zeros(2, 0, 32),
            "encoder_attention_mask": torch.zeros(2, 0)}


def _unexpected_key() -> Tensors:
    t = _probe_tensors()
    t["attention_mask"] = torch.ones(2, 16)
    return t


def _mask_length() -> Tensors:
    t = _probe_tensors()
    t["encoder_attention_mask"] = torch.ones(2, 10)
    return t


def _batch_sizes() -> Tensors:
    t = _probe_tensors()
    t["hidden_states"] = torch.randn(3, 8, 32)
    return t


def _mask_batch() -> Tensors:
    t = _probe_tensors()
    t["encoder_attention_mask"] = torch.ones(3, 16)
    return t


def _wrong_rank() -> Tensors:
    t = _probe_tensors()
    t["hidden_states"] = torch.randn(8, 32)
    return t


def _only_mask() -> Tensors:
    return {"encoder_attention_mask": torch.ones(2, 16)}


def _block_key_wrong_width() -> Tensors:
    t = _probe_tensors()
    t["layers.0.hidden_states"] = torch.randn(2, 8, 48)
    return t


def _block_batch_mismatch() -> Tensors:
    t = _probe_tensors()
    t["layers.0.hidden_states"] = torch.randn(2, 8, 32)
    t["layers.0.encoder_hidden_states"] = torch.randn(5, 16, 32)
    return t


PROBE_CASES: dict[str, tuple[Callable[[], Tensors], str | None]] = {
    "widths_fit_no_block": (_widths_fit_none, "expected"),
    "integer_probe": (_integer_probe, "floating"),
    "zero_length_queries": (_zero_length_queries, "empty"),
    "zero_length_keys": (_zero_length_keys, "empty"),
    "unexpected_key": (_unexpected_key, "attention_mask"),
    "mask_length_differs": (_mask_length, "encoder_attention_mask"),
    "batch_sizes_differ": (_batch_sizes, "batch"),
    "mask_batch_differs": (_mask_batch, "batch"),
    "wrong_rank": (_wrong_rank, "rank"),
    "only_a_mask": (_only_mask, None),
    "block_key_wrong_width": (_block_key_wrong_width, "width"),
    "block_batch_mismatch": (_block_batch_mismatch, "batch"),
}


@pytest.mark.parametrize("case", list(PROBE_CASES))
def test_bad_probe(case: str, tmp_path: Path) -> None:
    build, says = PROBE_CASES[case]
    d = copy_fixture(tmp_path)
    probe = tmp_path / "bad_probe.safetensors"
    save_file(build(), str(probe))
    line = assert_refused(diagnose(d / "model.safetensors", probe, tmp_path), probe, says=says)
    if case == "widths_fit_no_block":
        assert "32" in line  # the widths the blocks expect


def test_probe_widths_message_names_expected_widths(tmp_path: Path) -> None:
    d = copy_fixture(tmp_path)
    probe = tmp_path / "p.safetensors"
    save_file({"hidden_states": torch.randn(1, 4, 7), "encoder_hidden_states": torch.randn(1, 4, 9)},
              str(probe))
    line = assert_refused(diagnose(d / "model.safetensors", probe, tmp_path), probe)
    assert "queries 32" in line and "context 32" in line, line


def test_probe_header_claims_10_gb(tmp_path: Path) -> None:
    d = copy_fixture(tmp_path)
    n = 10 * 2**30
    probe = raw_safetensors(tmp_path / "probe.safetensors",
                            {"hidden_states": {"dtype": "F32", "shape": [1, n // 4 // 32, 32],
                                               "data_offsets": [0, n]}}, bytes(64))
    assert_refused(diagnose(d / "model.safetensors", probe, tmp_path), probe)


@pytest.mark.parametrize("case", ["empty", "random_bytes", "header_claims_gigabytes",
                                  "offsets_past_end", "header_is_list", "text_file",
                                  "pt_zip_renamed_safetensors"])
def test_bad_probe_file(case: str, tmp_path: Path) -> None:
    d = copy_fixture(tmp_path)
    probe, names, _ = CHECKPOINT_CASES[case](tmp_path)
    assert_refused(diagnose(d / "model.safetensors", probe, tmp_path), *names)
    assert not (tmp_path / "MARKER").exists()


def test_missing_probe(tmp_path: Path) -> None:
    d = copy_fixture(tmp_path)
    missing = tmp_path / "nope" / "probe.safetensors"
    assert_refused(diagnose(d / "model.safetensors", missing, tmp_path), missing)


def test_probe_is_a_directory(tmp_path: Path) -> None:
    d = copy_fixture(tmp_path)
    assert_refused(diagnose(d / "model.safetensors", d, tmp_path), d, says="regular file")


def test_probe_is_a_fifo(tmp_path: Path) -> None:
    d = copy_fixture(tmp_path)
    fifo = tmp_path / "probe.safetensors"
    os.mkfifo(fifo)
    assert_refused(diagnose(d / "model.safetensors", fifo, tmp_path), fifo, says="regular file")


def test_nan_inf_probe_is_a_finding_not_an_error(tmp_path: Path) -> None:
    d = copy_fixture(tmp_path)
    t = _probe_tensors()
    t["hidden_states"][0, 0, 0] = float("nan")
    t["encoder_hidden_states"][1, 3, 5] = float("inf")
    probe = tmp_path / "nan_probe.safetensors"
    save_file(t, str(probe))
    result = diagnose(d / "model.safetensors", probe, tmp_path)
    assert "Traceback" not in result.stdout + result.stderr
    assert result.exit_code == 1, (result.stdout, result.stderr, result.exception)
    report = json.loads(result.stdout)
    hits = [f for f in report["findings"] if f["code"] == "XD501"]
    assert hits, report["findings"]
    assert all(f["symptom"] == "numerics" and f["severity"] == "error" for f in hits)


# ----------------------------------------------------------------------------- options


@pytest.mark.parametrize("extra,says", [
    (["--device", "cuda"], "cuda"),
    (["--device", "cuda:3"], "cuda"),
    (["--device", "tpu"], "tpu"),
    (["--dtype", "int8"], "int8"),
    (["--heads", "5"], "5"),
    (["--heads", "0"], "--heads"),
    (["--format", "nope"], "nope"),
    (["--fail-on", "sometimes"], "sometimes"),
    (["--seed", "x"], "--seed"),
    (["--bogus"], "--bogus"),
])
def test_bad_option(extra: list[str], says: str, tmp_path: Path) -> None:
    if extra[:2] == ["--device", "cuda"] and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    d = copy_fixture(tmp_path)
    assert_refused(diagnose(d / "model.safetensors", d / "probe.safetensors", tmp_path, *extra),
                   says=says)


@pytest.mark.parametrize("seed", ["-1", str(2**50), str(2**64), str(-(2**70))])
def test_any_integer_seed(seed: str, tmp_path: Path) -> None:
    """--seed N takes any integer (the synthetic probe and the proxy loss reduce it)."""
    d = copy_fixture(tmp_path)
    result = diagnose(d / "model.safetensors", None, tmp_path, "--seed", seed)
    assert result.exit_code in (0, 1), (result.stderr, result.exception)
    json.loads(result.stdout)


def test_heads_not_dividing_names_checkpoint(tmp_path: Path) -> None:
    d = copy_fixture(tmp_path)
    (d / "config.json").unlink()
    ckpt = d / "model.safetensors"
    assert_refused(diagnose(ckpt, d / "probe.safetensors", tmp_path, "--heads", "5"), ckpt,
                   says="5")


# "Billion laughs": nine levels of nine aliases, a few hundred bytes that print as 9**9 items.
YAML_BOMB = "[" + ", ".join(
    ["&l0 [" + ", ".join(['"xxxxxxxx"'] * 9) + "]"]
    + [f"&l{i} [" + ", ".join([f"*l{i - 1}"] * 9) + "]" for i in range(1, 9)]) + "]"


CONFIG_CASES = {
    "unknown_key": ("bogus_key: 1\n", "bogus_key"),
    "unknown_disabled_code": ("disable: [XD999]\n", "XD999"),
    "unknown_threshold_code": ("thresholds:\n  XD998: {warn_at: 1}\n", "XD998"),
    "threshold_wrong_type": ("thresholds:\n  XD101: {warn_at: high}\n", "warn_at"),
    "unknown_threshold_option": ("thresholds:\n  XD101: {nonsense: 1}\n", "nonsense"),
    "heads_wrong_type": ("heads: four\n", "heads"),
    "fail_on_wrong_type": ("fail_on: 3\n", "fail_on"),
    "disable_not_a_list": ("disable: XD101\n", "disable"),
    "include_not_a_list": ("blocks: {include: 7}\n", "include"),
    "budget_negative": ("memory_budget_mb: -1\n", "memory_budget_mb"),
    "invalid_yaml": ("[unclosed\n", "YAML"),
    "yaml_nested_too_deeply": ("a: " + "[" * 100_000 + "]" * 100_000 + "\n", "YAML"),
    "mixed_type_keys": ("1: x\nfoo: y\n", "unknown key"),
    "blocks_mixed_type_keys": ("blocks: {1: x, foo: y}\n", "blocks"),
    "alias_bomb_in_disable": ("disable: [" + YAML_BOMB + "]\n", "disable"),
    "alias_bomb_heads": ("heads: " + YAML_BOMB + "\n", "heads"),
    "alias_bomb_fail_on": ("fail_on: " + YAML_BOMB + "\n", "fail_on"),
    "alias_bomb_threshold": ("thresholds:\n  XD101:\n    warn_at: " + YAML_BOMB + "\n",
                             "warn_at"),
    "not_a_mapping": ("- a\n- b\n", "mapping"),
}


@pytest.mark.parametrize("text,key", list(CONFIG_CASES.values()), ids=list(CONFIG_CASES))
def test_bad_config(text: str, key: str, tmp_path: Path) -> None:
    d = copy_fixture(tmp_path)
    cfg = tmp_path / "xd.yaml"
    cfg.write_text(text)
    line = assert_refused(diagnose(d / "model.safetensors", d / "probe.safetensors", tmp_path,
                                   "--config", str(cfg)), cfg)
    assert key in line, line


def test_config_not_a_regular_file(tmp_path: Path) -> None:
    d = copy_fixture(tmp_path)
    fifo = tmp_path / "xd.yaml"
    os.mkfifo(fifo)  # reading it would block forever
    assert_refused(diagnose(d / "model.safetensors", d / "probe.safetensors", tmp_path,
                            "--config", str(fifo)), fifo, says="regular file")


def test_config_too_large(tmp_path: Path) -> None:
    d = copy_fixture(tmp_path)
    cfg = tmp_path / "xd.yaml"
    cfg.write_text("# padding\n" * 500_000)
    assert_refused(diagnose(d / "model.safetensors", d / "probe.safetensors", tmp_path,
                            "--config", str(cfg)), cfg)


def test_pyproject_tool_not_a_table(tmp_path: Path) -> None:
    """`tool = 1` is valid TOML with no xattn-doctor table: it is not our config, so it is
    ignored (the diagnosis runs)."""
    d = copy_fixture(tmp_path)
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    (cwd / "pyproject.toml").write_text("tool = 1\n")
    result = diagnose(d / "model.safetensors", d / "probe.safetensors", tmp_path)
    assert result.exit_code in (0, 1), (result.stderr, result.exception)
    json.loads(result.stdout)


def test_missing_config(tmp_path: Path) -> None:
    d = copy_fixture(tmp_path)
    cfg = tmp_path / "nope.yaml"
    assert_refused(diagnose(d / "model.safetensors", d / "probe.safetensors", tmp_path,
                            "--config", str(cfg)), cfg)


def test_bad_pyproject_table(tmp_path: Path) -> None:
    d = copy_fixture(tmp_path)
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    (cwd / "pyproject.toml").write_text("[tool.xattn-doctor]\nnot_a_key = 1\n")
    line = assert_refused(diagnose(d / "model.safetensors", d / "probe.safetensors", tmp_path),
                          "pyproject.toml")
    assert "not_a_key" in line


def test_output_into_missing_directory(tmp_path: Path) -> None:
    d = copy_fixture(tmp_path)
    out = tmp_path / "no" / "such" / "dir" / "report.json"
    assert_refused(diagnose(d / "model.safetensors", d / "probe.safetensors", tmp_path,
                            "--output", str(out)), out)
    assert not (tmp_path / "no").exists()


def test_output_is_a_directory(tmp_path: Path) -> None:
    d = copy_fixture(tmp_path)
    out = tmp_path / "reports"
    out.mkdir()
    assert_refused(diagnose(d / "model.safetensors", d / "probe.safetensors", tmp_path,
                            "--output", str(out)), out)


def test_output_is_an_input(tmp_path: Path) -> None:
    """--output naming the checkpoint or probe must not overwrite an input."""
    d = copy_fixture(tmp_path)
    cfg = tmp_path / "xd.yaml"
    cfg.write_text("fail_on: never\n")
    for target in (d / "model.safetensors", d / "probe.safetensors", d / "config.json", cfg):
        assert_refused(diagnose(d / "model.safetensors", d / "probe.safetensors", tmp_path,
                                "--config", str(cfg), "--output", str(target)), target)
    shards = copy_fixture(tmp_path, "stack6_sharded")
    shard = shards / "model-00001-of-00002.safetensors"
    assert_refused(diagnose(shards, shards / "probe.safetensors", tmp_path,
                            "--output", str(shard)), shard)


def test_debug_env_gives_traceback(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """XATTN_DOCTOR_DEBUG=1 lets the exception through (the escape hatch still works)."""
    monkeypatch.setenv("XATTN_DOCTOR_DEBUG", "1")
    p = tmp_path / "model.safetensors"
    p.write_bytes(b"")
    result = CliRunner().invoke(app, ["diagnose", str(p)])
    assert result.exit_code != 0
    assert result.exception is not None and not isinstance(result.exception, SystemExit)


# ----------------------------------------------------------------------------- memory


def _run_child(args: list[str], cwd: Path) -> subprocess.Popen[bytes]:
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "OMP_NUM_THREADS": "1"}
    env.pop("XATTN_DOCTOR_DEBUG", None)
    return subprocess.Popen([sys.executable, "-m", "xattn_doctor", *args], cwd=cwd, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def _reap(p: subprocess.Popen[bytes]) -> tuple[int, str, str, int]:
    """Wait for one child and return its exit code, output and own peak RSS in bytes."""
    out = p.stdout.read().decode() if p.stdout else ""
    err = p.stderr.read().decode() if p.stderr else ""
    _, status, usage = os.wait4(p.pid, 0)
    p.returncode = os.waitstatus_to_exitcode(status)
    factor = 1 if sys.platform == "darwin" else 1024  # ru_maxrss: bytes on macOS, KiB on Linux
    return p.returncode, out, err, usage.ru_maxrss * factor


@pytest.mark.slow
def test_hostile_sizes_do_not_allocate(tmp_path: Path) -> None:
    """A header length of ~1 TiB and a (sparse) 10 GiB probe: refused, peak RSS < 1 GiB."""
    d = copy_fixture(tmp_path)
    ckpt = raw_safetensors(tmp_path / "huge_header.safetensors", {}, b"", length=2**40)
    n = 10 * 2**30
    header = json.dumps({"hidden_states": {"dtype": "F32", "shape": [1, n // 4 // 32, 32],
                                           "data_offsets": [0, n]}}).encode()
    probe = raw_safetensors(tmp_path / "huge_probe.safetensors", header)
    with probe.open("r+b") as fh:  # sparse: the 10 GiB data buffer takes no disk space
        fh.truncate(8 + len(header) + n)
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    with untouched(tmp_path, skip=frozenset({probe})):
        children = [
            _run_child(["diagnose", str(ckpt), "--probe", str(d / "probe.safetensors"),
                        "--format", "json"], cwd),
            _run_child(["diagnose", str(d / "model.safetensors"), "--probe", str(probe),
                        "--format", "json"], cwd),
        ]
        results = [_reap(c) for c in children]
    for (code, out, err, rss), name in zip(results, (ckpt, probe)):
        assert code == 2, (code, out, err)
        assert out == ""
        assert len(err.splitlines()) == 1 and str(name) in err, err
        assert "Traceback" not in err
        assert rss < 2**30, f"{name.name}: peak RSS {rss / 2**20:.0f} MiB"


# ----------------------------------------------------------------------------- properties
# Mutations of the healthy fixture's files. Structured edits of the parsed header (dtype,
# shape, key name, offsets, dropped entries) keep it JSON, so many mutants get past the header
# check into detection and the forward/backward pass; byte-level edits (bit flips anywhere,
# truncation, insertion) and special float values in the data cover the rest.

MODEL_BYTES = (HEALTHY / "model.safetensors").read_bytes()
PROBE_BYTES = (HEALTHY / "probe.safetensors").read_bytes()
DTYPES = ["F32", "I32", "U32", "F16", "BF16", "F64", "I64", "U8", "I8", "BOOL", "F8_E4M3", "U16",
          "C64", ""]
SPECIAL = [float("nan"), float("inf"), float("-inf"), 3.0e38, -3.0e38, 1e-45, 0.0, 1e4, -1e4]
NAME_CHARS = "abcdefghijklmnopqrstuvwxyz0123456789._"


def _mutations(blob: bytes) -> st.SearchStrategy[list[tuple[Any, ...]]]:
    (n,) = struct.unpack("<Q", blob[:8])
    head, size = 8 + n, len(blob)
    index = st.integers(0, 63)
    op = st.one_of(
        # structured header edits
        st.tuples(st.just("dtype"), index, st.sampled_from(DTYPES)),
        st.tuples(st.just("shape"), index, st.sampled_from(["reverse", "zero", "one", "flat",
                                                            "grow", "drop_dim"])),
        st.tuples(st.just("rename"), index, st.integers(0, 80), st.sampled_from(NAME_CHARS)),
        st.tuples(st.just("drop"), index),
        st.tuples(st.just("offsets"), index, st.integers(-64, 64)),
        st.tuples(st.just("meta"), st.sampled_from([[1], {"a": 1}, "x", None, {"format": "pt"}])),
        # data edits
        st.tuples(st.just("float"), st.integers(head, size - 4), st.sampled_from(SPECIAL)),
        st.tuples(st.just("flip"), st.integers(head, size - 1), st.integers(0, 7)),
        # byte-level edits anywhere
        st.tuples(st.just("flip"), st.integers(0, head - 1), st.integers(0, 7)),
        st.tuples(st.just("set"), st.integers(8, head - 1), st.integers(0x20, 0x7E)),
        st.tuples(st.just("truncate"), st.integers(0, size - 1)),
        st.tuples(st.just("insert"), st.integers(0, size), st.binary(min_size=1, max_size=16)),
    )
    return st.lists(op, min_size=1, max_size=3)


def _edit_header(b: bytearray, op: tuple[Any, ...]) -> None:
    """Apply one structured edit to the parsed header (skip when it does not parse)."""
    try:
        (n,) = struct.unpack("<Q", bytes(b[:8]))
        header = json.loads(bytes(b[8:8 + n]))
        assert isinstance(header, dict)
        keys = [k for k in header if k != "__metadata__" and isinstance(header[k], dict)]
    except Exception:
        return
    kind = op[0]
    if kind == "meta":
        header["__metadata__"] = op[1]
    elif keys:
        key = keys[op[1] % len(keys)]
        entry = header[key]
        shape = entry.get("shape")
        if kind == "dtype":
            entry["dtype"] = op[2]
        elif kind == "shape" and isinstance(shape, list) and shape:
            entry["shape"] = {"reverse": shape[::-1], "zero": [0, *shape[1:]],
                              "one": [1, *shape], "flat": [math.prod(shape)],
                              "grow": [shape[0] + 1, *shape[1:]],
                              "drop_dim": shape[1:]}[op[2]]
        elif kind == "rename":
            i = op[2] % len(key)
            header[key[:i] + op[3] + key[i + 1:]] = header.pop(key)
        elif kind == "drop":
            del header[key]
        elif kind == "offsets" and isinstance(entry.get("data_offsets"), list):
            entry["data_offsets"] = [o + op[2] if isinstance(o, int) else o
                                     for o in entry["data_offsets"]]
    text = json.dumps(header).encode()
    b[:8 + n] = struct.pack("<Q", len(text)) + text


def _apply(blob: bytes, ops: list[tuple[Any, ...]]) -> bytes:
    b = bytearray(blob)
    for op in ops:
        kind = op[0]
        if kind in ("dtype", "shape", "rename", "drop", "offsets", "meta"):
            _edit_header(b, op)
        elif kind == "float" and len(b) >= 4:
            i = min(op[1], len(b) - 4)
            b[i:i + 4] = struct.pack("<f", op[2])
        elif kind == "flip" and b:
            b[op[1] % len(b)] ^= 1 << op[2]
        elif kind == "set" and b:
            b[op[1] % len(b)] = op[2]
        elif kind == "truncate":
            del b[op[1]:]
        elif kind == "insert":
            i = op[1] % (len(b) + 1)
            b[i:i] = op[2]
    return bytes(b)


def _check_mutant(which: str, blob: bytes) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        d = copy_fixture(root)
        target = d / f"{which}.safetensors"
        target.write_bytes(blob)
        result = diagnose(d / "model.safetensors", d / "probe.safetensors", root)
        text = result.stdout + result.stderr
        assert "Traceback" not in text
        assert result.exit_code in (0, 1, 2), (result.exit_code, result.exception, text)
        if result.exit_code == 2:
            lines = result.stderr.splitlines()
            assert len(lines) == 1, result.stderr
            assert "internal error" not in lines[0], lines[0]
            assert str(target) in lines[0], lines[0]
        else:
            json.loads(result.stdout)  # a whole report
        assert target.read_bytes() == blob


PROPERTY = settings(max_examples=40, deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


@PROPERTY
@given(ops=_mutations(MODEL_BYTES))
def test_mutated_checkpoint_never_crashes(ops: list[tuple[Any, ...]]) -> None:
    _check_mutant("model", _apply(MODEL_BYTES, ops))


@settings(PROPERTY, max_examples=20)
@given(ops=_mutations(PROBE_BYTES))
def test_mutated_probe_never_crashes(ops: list[tuple[Any, ...]]) -> None:
    _check_mutant("probe", _apply(PROBE_BYTES, ops))


def test_probe_mask_hiding_every_key_is_exit_2(tmp_path: Path) -> None:
    """A mask of all zeros leaves nothing to measure: an input error, not a healthy report."""
    import torch
    from safetensors.torch import save_file

    probe = tmp_path / "p.safetensors"
    save_file({"hidden_states": torch.randn(2, 8, 32), "encoder_hidden_states": torch.randn(2, 16, 32),
               "encoder_attention_mask": torch.zeros(2, 16)}, str(probe))
    r = CliRunner().invoke(app, ["diagnose", str(FIXTURES / "healthy"), "--probe", str(probe)])
    assert r.exit_code == 2
    assert "hides every key" in r.stderr and len(r.stderr.strip().splitlines()) == 1
