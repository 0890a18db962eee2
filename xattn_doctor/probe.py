"""The probe batch: loaded from a file (validated) or synthesised, then fitted to each block.

Per CONTRACT.md: `hidden_states` [B,Lq,Dq], `encoder_hidden_states` [B,Lk,Dk], optional
`encoder_attention_mask` [B,Lk], and per-block overrides `{block}.<key>`. A block whose
queries are learned parameters uses them when the probe has no queries of its width.
"""

from __future__ import annotations

import fnmatch
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from xattn_doctor.errors import ProbeError
from xattn_doctor.layouts._base import BlockSpec
from xattn_doctor.st_header import FLOAT_DTYPES, read_header

if TYPE_CHECKING:
    from torch import Tensor

KEYS = ("hidden_states", "encoder_hidden_states", "encoder_attention_mask")
MAX_PROBE_BYTES = 4 * 1024**3
SYNTH_BATCH, SYNTH_QUERIES, SYNTH_KEYS = 2, 32, 64


@dataclass
class BlockInputs:
    """What one block runs on, and where each part came from."""

    x: Tensor
    c: Tensor
    mask: Tensor | None
    x_source: str  # "probe" | "probe:block" | "learned" | "synthetic"
    c_source: str

    @property
    def label(self) -> str:
        """'probe' when both streams came from the probe file, else what was used."""
        if self.x_source.startswith("probe") and self.c_source.startswith("probe"):
            return "probe"
        return f"queries={self.x_source}, context={self.c_source}"


@dataclass
class Probe:
    """A loaded or synthetic probe; `inputs_for` fits it to a block."""

    source: str  # "file" | "synthetic"
    path: Path | None
    tensors: dict[str, Tensor]
    seed: int = 0
    used: set[str] = field(default_factory=set)

    def inputs_for(self, spec: BlockSpec, learned: Tensor | None) -> BlockInputs:
        """The block's x, c and mask: per-block keys first; then, for queries, the block's
        learned queries (a resampler's latents are its queries even when the text has the same
        width); then global keys of the right width; then seeded synthetic features."""
        x, xs = self._stream(spec, "hidden_states", spec.query_dim, own_only=learned is not None)
        c, cs = self._stream(spec, "encoder_hidden_states", spec.context_dim)
        if x is None and learned is not None:
            q = learned.reshape(-1, learned.shape[-1])[None]
            x, xs = q.expand(c.shape[0] if c is not None else SYNTH_BATCH, -1, -1), "learned"
        batch = x.shape[0] if x is not None else c.shape[0] if c is not None else SYNTH_BATCH
        # mod 2**64: torch takes a uint64 (a negative seed already wraps so); any --seed works
        seed = (self.seed * 1_000_003 + zlib.crc32(spec.name.encode())) % 2**64
        import torch

        gen = torch.Generator().manual_seed(seed)
        if x is None:
            x, xs = torch.randn(batch, SYNTH_QUERIES, spec.query_dim, generator=gen), "synthetic"
        if c is None:
            c, cs = torch.randn(batch, SYNTH_KEYS, spec.context_dim, generator=gen), "synthetic"
        if x.shape[0] != c.shape[0]:
            raise ProbeError(self.path, f"block {spec.name}: query batch {x.shape[0]} and "
                                        f"context batch {c.shape[0]} differ")
        mask = self._mask(spec, c) if cs.startswith("probe") else None
        return BlockInputs(x, c, mask, xs, cs)

    def _own_key(self, spec: BlockSpec, key: str) -> str:
        """The probe's per-block name for `key`: under the block's name, else the one name
        that one of its aliases matches."""
        own = f"{spec.name}.{key}"
        if own in self.tensors or not spec.aliases:
            return own
        for alias in spec.aliases:
            hits = [n for n in self.tensors if fnmatch.fnmatchcase(n, f"{alias}.{key}")]
            if len(hits) == 1:
                return hits[0]
        return own

    def _stream(self, spec: BlockSpec, key: str, width: int,
                own_only: bool = False) -> tuple[Tensor | None, str]:
        own = self._own_key(spec, key)
        if own in self.tensors:
            t = self.tensors[own]
            if t.shape[-1] != width:
                raise ProbeError(self.path, f"{own} has width {t.shape[-1]}, the block expects "
                                            f"{width}")
            self.used.add(own)
            return t, "probe:block"
        shared = None if own_only else self.tensors.get(key)
        if shared is not None and shared.shape[-1] == width:
            self.used.add(key)
            return shared, "probe"
        return None, ""

    def _mask(self, spec: BlockSpec, c: Tensor) -> Tensor | None:
        for key in (self._own_key(spec, "encoder_attention_mask"), "encoder_attention_mask"):
            m = self.tensors.get(key)
            if m is not None and tuple(m.shape) == tuple(c.shape[:2]):
                return m.bool()
        return None

    def check_fits(self, blocks: list[BlockSpec]) -> None:
        """A probe file none of whose streams fit any block is an input error."""
        if self.source != "file" or self.used:
            return
        have = ", ".join(f"{k} width {t.shape[-1]}" for k, t in self.tensors.items()
                         if t.dim() == 3)
        want = "; ".join(f"{b.name or '<root>'}: queries {b.query_dim}, context {b.context_dim}"
                         for b in blocks[:6])
        more = f" (and {len(blocks) - 6} more)" if len(blocks) > 6 else ""
        raise ProbeError(self.path, f"probe widths fit no block ({have or 'no 3-D tensors'}); "
                                    f"expected {want}{more}")


def synthetic(seed: int) -> Probe:
    """A probe with no tensors: every block gets seeded N(0, 1) features."""
    return Probe("synthetic", None, {}, seed)


def load_probe(path: Path, seed: int = 0) -> Probe:
    """Read and validate a probe file (floating tensors of the contract's ranks)."""
    if not path.is_file():
        raise ProbeError(path, "probe is not a regular file" if path.exists()
                         else "no such probe file")
    header = read_header(path, ProbeError)
    size = sum(t.end - t.start for t in header.tensors.values())
    if size > MAX_PROBE_BYTES:
        raise ProbeError(path, f"probe holds {size / 2**30:.1f} GiB of tensors; the limit is "
                               f"{MAX_PROBE_BYTES // 2**30} GiB")
    for key, t in header.tensors.items():
        _check_entry(path, key, t.dtype, t.shape)
    if not any(k.rsplit(".", 1)[-1] in KEYS[:2] for k in header.tensors):
        raise ProbeError(path, "probe has neither `hidden_states` nor `encoder_hidden_states`")
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError, RuntimeError) as e:
        raise ProbeError(path, f"cannot read probe: {e}") from e
    _check_batches(path, tensors)
    return Probe("file", path, {k: _as_float(k, v) for k, v in tensors.items()}, seed)


def _check_batches(path: Path, tensors: dict[str, Tensor]) -> None:
    """Within each prefix (global, or one block), batch and key lengths must agree."""
    groups: dict[str, dict[str, Tensor]] = {}
    for key, t in tensors.items():
        prefix, _, leaf = key.rpartition(".") if key not in KEYS else ("", "", key)
        groups.setdefault(prefix, {})[leaf] = t
    for prefix, g in groups.items():
        batches = {k: t.shape[0] for k, t in g.items()}
        if len(set(batches.values())) > 1:
            raise ProbeError(path, f"batch sizes differ{' under ' + prefix if prefix else ''}: "
                                   + ", ".join(f"{k} {b}" for k, b in batches.items()))
        m, c = g.get("encoder_attention_mask"), g.get("encoder_hidden_states")
        if m is not None and c is not None and m.shape[1] != c.shape[1]:
            raise ProbeError(path, f"encoder_attention_mask covers {m.shape[1]} keys but "
                                   f"encoder_hidden_states has {c.shape[1]}")
        if m is not None and not bool(m.bool().any()):
            where = f"{prefix}." if prefix else ""
            raise ProbeError(path, f"{where}encoder_attention_mask hides every key: there is "
                                   "no attention to measure")


def _check_entry(path: Path, key: str, dtype: str, shape: tuple[int, ...]) -> None:
    leaf = key.rsplit(".", 1)[-1] if key not in KEYS else key
    if leaf not in KEYS:
        raise ProbeError(path, f"unexpected probe key {key!r}; expected {', '.join(KEYS)} or "
                               "`{block}.<one of those>`")
    rank = 2 if leaf == "encoder_attention_mask" else 3
    if len(shape) != rank:
        raise ProbeError(path, f"{key} has shape {list(shape)}; expected rank {rank}")
    if any(d == 0 for d in shape):
        raise ProbeError(path, f"{key} has an empty dimension: shape {list(shape)}")
    if leaf != "encoder_attention_mask" and dtype not in FLOAT_DTYPES:
        raise ProbeError(path, f"{key} has dtype {dtype}; probe features must be floating point")


def _as_float(key: str, t: Tensor) -> Tensor:
    return t if key.endswith("encoder_attention_mask") else t.float()
