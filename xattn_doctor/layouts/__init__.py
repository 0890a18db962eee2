"""Layout registry: every module in this package registers its layouts with `@register`.

`detect()` runs them from the highest priority down; a block whose tensors were already
claimed by a higher-priority layout is dropped, so a bare `in_proj_weight` inside a
Flamingo block is never reported twice.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import TypeVar

from xattn_doctor._plugins import load
from xattn_doctor.layouts._base import BlockSpec, KeyIndex, Layout, ModelConfig, common_prefix

_LAYOUTS: dict[str, Layout] = {}
T = TypeVar("T")


def register(cls: type[T]) -> type[T]:
    """Class decorator: instantiate the layout and add it to the registry."""
    inst = cls()
    name: str = getattr(inst, "name")  # noqa: B009  (T is any layout class)
    if name in _LAYOUTS:
        raise ValueError(f"layout {name!r} registered twice")
    _LAYOUTS[name] = inst  # type: ignore[assignment]
    return cls


def _load() -> None:
    load(__name__, __path__)


def all_layouts() -> list[Layout]:
    """Every registered layout, highest priority first (ties by name)."""
    _load()
    return sorted(_LAYOUTS.values(), key=lambda lay: (-lay.priority, lay.name))


@dataclass
class Detection:
    """What `detect` found: blocks to diagnose, and blocks seen but left out (with why)."""

    blocks: list[BlockSpec] = field(default_factory=list)
    skipped: list[dict[str, str]] = field(default_factory=list)
    tried: list[str] = field(default_factory=list)


def detect(index: KeyIndex, config: ModelConfig, heads: int | None = None) -> Detection:
    """Find every cross-attention block; `heads` (the --heads option) overrides head counts."""
    out = Detection()
    claimed: set[str] = set()
    ambiguous: list[BlockSpec] = []
    for layout in all_layouts():
        out.tried.append(layout.name)
        for spec in _unique_names(layout.match(index, config)):
            shared = {spec.learned_queries.key} if spec.learned_queries else set()
            keys = spec.keys() - shared  # learned queries may feed several blocks
            if keys & claimed:
                continue
            claimed |= keys
            if spec.role == "self":
                out.skipped.append({"name": spec.name, "layout": spec.layout,
                                    "reason": "self-attention (query and key/value from one stream)"})
            elif spec.role == "ambiguous":
                ambiguous.append(spec)
            else:
                out.blocks.append(spec)
    if out.blocks:
        out.skipped.extend({"name": s.name, "layout": s.layout,
                            "reason": "not named or shaped as cross-attention, while other "
                                      "blocks are; include it with `blocks.include` in the config"}
                           for s in ambiguous)
    else:
        out.blocks = [replace(s, notes=s.notes + (
            "Could not tell self- from cross-attention (equal widths, neutral name); "
            "diagnosed as cross-attention.",)) for s in ambiguous]
    if heads is not None:
        out.blocks = [_override_heads(s, heads) for s in out.blocks]
    out.blocks.sort(key=lambda s: _natural(s.name))
    return out


def _unique_names(specs: list[BlockSpec]) -> list[BlockSpec]:
    """A layer holding two attention modules (self- and cross-attention, each with its own
    norm beside it) would name both blocks by the layer: name those by their own module, the
    path their q/k/v/o projections share."""
    counts: dict[str, int] = {}
    for s in specs:
        counts[s.name] = counts.get(s.name, 0) + 1
    out = []
    for s in specs:
        if counts[s.name] > 1:
            lins = [lin.weight.key for lin in (s.q, s.k, s.v, s.o) if lin is not None]
            own = common_prefix(lins)
            if own.startswith(s.name + ".") or (not s.name and own):
                s = replace(s, name=own)
        out.append(s)
    return out


def _override_heads(spec: BlockSpec, heads: int) -> BlockSpec:
    inner = spec.heads * spec.head_dim
    kv_inner = spec.kv_heads * spec.head_dim
    if inner % heads:
        raise ValueError(f"--heads {heads} does not divide block {spec.name or '<root>'}'s "
                         f"attention width {inner}")
    head_dim = inner // heads
    if spec.q_norm is not None and spec.qk_norm_per_head and spec.q_norm.width != head_dim:
        raise ValueError(f"--heads {heads} contradicts block {spec.name or '<root>'}'s per-head "
                         f"q-norm of width {spec.q_norm.width}")
    if kv_inner % head_dim:
        raise ValueError(f"--heads {heads} gives head width {head_dim}, which does not divide "
                         f"block {spec.name or '<root>'}'s key/value width {kv_inner}")
    kv_heads = kv_inner // head_dim
    v_inner = spec.kv_heads * spec.v_head_dim if spec.v_head_dim else 0
    if v_inner % kv_heads:
        raise ValueError(f"--heads {heads} does not divide block {spec.name or '<root>'}'s "
                         f"value width {v_inner}")
    return replace(spec, heads=heads, kv_heads=kv_heads, head_dim=head_dim,
                   v_head_dim=v_inner // kv_heads if v_inner else None, heads_source="cli")


def _natural(name: str) -> list[object]:
    """Sort key that puts layers.10 after layers.9."""
    return [(0, int(p), "") if p.isdigit() else (1, 0, p) for p in name.split(".")]


__all__ = ["BlockSpec", "Detection", "KeyIndex", "ModelConfig", "all_layouts", "detect",
           "register"]
