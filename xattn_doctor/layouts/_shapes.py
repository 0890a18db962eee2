"""Do a block's tensor shapes fit its `BlockSpec`? Checked from the header, before loading.

The rebuilt module follows BlockSpec's order of operations exactly, so each tensor must have the
shape that order gives it; a file whose shapes were edited (or corrupted into another valid
header) is refused here, naming the tensor and the shape needed, instead of failing in torch.
"""

from __future__ import annotations

import math
from collections.abc import Callable

from xattn_doctor.layouts._base import BlockSpec, KeyIndex, TensorRef

Expected = list[tuple[TensorRef, tuple[int, ...]]]


def shape_problem(spec: BlockSpec, index: KeyIndex) -> str | None:
    """Why the tensors' shapes in `index` cannot run as `spec` (None when they can)."""
    split = _head_split(spec)
    if split:
        return split
    out_width = _out_width(spec, index)
    if spec.residual and out_width != spec.query_dim:
        return (f"the attention output has width {out_width} but the residual stream "
                f"{spec.query_dim}")
    for ref, want in _expected(spec, out_width):
        got = _shape(index, ref)
        if got != want:
            rows = f" rows {ref.rows[0]}..{ref.rows[1]}" if ref.rows else ""
            have = list(got) if got is not None else list(index.shape(ref.key) or ())
            return f"tensor {ref.key!r}{rows} has shape {have}, the block needs {list(want)}"
    return _loose(spec, index, out_width)


def _head_split(spec: BlockSpec) -> str | None:
    if min(spec.heads, spec.kv_heads, spec.head_dim, spec.query_dim, spec.context_dim) < 1 \
            or spec.heads % spec.kv_heads:
        return (f"no valid head split: {spec.heads} heads ({spec.kv_heads} key/value) of "
                f"width {spec.head_dim}, query width {spec.query_dim}, context width "
                f"{spec.context_dim}")
    return None


def _shape(index: KeyIndex, ref: TensorRef) -> tuple[int, ...] | None:
    """The shape of `ref` (its row range, for packed projections), or None."""
    s = index.shape(ref.key)
    if s is None or ref.rows is None:
        return None if s is None else tuple(s)
    lo, hi = ref.rows
    return (hi - lo, *s[1:]) if s and 0 <= lo <= hi <= s[0] else None


def _out_width(spec: BlockSpec, index: KeyIndex) -> int:
    """Width of the block's output: the residual stream, else what o_proj (or attention) gives."""
    attended = spec.heads * (spec.v_head_dim or spec.head_dim)
    if spec.o is None:
        return attended
    o_shape = _shape(index, spec.o.weight)
    return spec.query_dim if spec.residual or not o_shape else o_shape[0]


def _expected(spec: BlockSpec, out_width: int) -> Expected:
    """Exact shapes of the projections and norms."""
    inner, kv_inner = spec.heads * spec.head_dim, spec.kv_heads * spec.head_dim
    v_inner = spec.kv_heads * (spec.v_head_dim or spec.head_dim)
    attended = spec.heads * (spec.v_head_dim or spec.head_dim)
    checks: Expected = []
    for lin, out, width in ((spec.q, inner, spec.query_dim), (spec.k, kv_inner, spec.context_dim),
                            (spec.v, v_inner, spec.context_dim), (spec.o, out_width, attended)):
        if lin is not None:
            checks.append((lin.weight, (out, width)))
            if lin.bias is not None:
                checks.append((lin.bias, (out,)))
    per_head = spec.qk_norm_per_head
    for norm, width in ((spec.query_norm, spec.query_dim), (spec.context_norm, spec.context_dim),
                        (spec.q_norm, spec.head_dim if per_head else inner),
                        (spec.k_norm, spec.head_dim if per_head else kv_inner),
                        (spec.post_norm, out_width)):
        if norm is not None:
            checks += [(ref, (width,)) for ref in (norm.weight, norm.bias) if ref is not None]
    return checks


def _loose(spec: BlockSpec, index: KeyIndex, out_width: int) -> str | None:
    """Tensors whose shape may vary (a gate scalar or vector, a temperature, latents)."""
    kv_inner = spec.kv_heads * spec.head_dim
    rules: list[tuple[TensorRef | None, Callable[[tuple[int, ...]], bool], str]] = [
        (spec.gate.param if spec.gate else None,
         lambda s: math.prod(s) == 1 or (s[-1] == out_width and math.prod(s) == out_width),
         f"one value or {out_width}"),
        (spec.temperature, lambda s: math.prod(s) >= 1, "at least one value"),
        (spec.learned_queries, lambda s: len(s) >= 1 and s[-1] == spec.query_dim
         and math.prod(s) > 0, f"rows of width {spec.query_dim}"),
        (spec.bias_k, lambda s: math.prod(s) == kv_inner, f"{kv_inner} values"),
        (spec.bias_v, lambda s: math.prod(s) == kv_inner, f"{kv_inner} values"),
    ]
    for ref, ok, need in rules:
        if ref is None:
            continue
        got = _shape(index, ref)
        if got is None or not ok(got):
            return f"tensor {ref.key!r} has shape {list(got or ())}, the block needs {need}"
    return None
