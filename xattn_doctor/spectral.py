"""A worst-case bound on any attention logit, from the weights alone (Zhai et al. 2023).

For head h, logit = x~^T Wq~_h^T Wk~_h c~ * scale / temperature, where ~ appends the bias
as a column (and a 1 to the input). So |logit| <= sigma_max(Wq~_h^T Wk~_h) |x~| |c~| * scale / T.
sigma_max^2 is the top eigenvalue of (Wq~ Wq~^T)(Wk~ Wk~^T), a head_dim x head_dim product,
found by power iteration (no SVD of the full-width map). The input radii come from the
pre-norms when the block has them (|LN(x)| <= sqrt(D) max|g| + |b|), else from the probe.
With qk-norm the bound is on the normed q and k directly.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from xattn_doctor.attention import RebuiltBlock
from xattn_doctor.layouts._base import Norm

ITERATIONS = 64


@dataclass(frozen=True)
class SpectralBound:
    """The largest logit any input of the stated radii could produce, and how it was bounded."""

    max_logit: float
    source: str  # "norms" | "probe" | "qk-norm"


def top_singular(wq: Tensor, wk: Tensor, iterations: int = ITERATIONS) -> Tensor:
    """sigma_max(wq[h]^T wk[h]) per head; wq [H,d,Dq], wk [H,d,Dk] in float64."""
    return top_singular_of_grams(wq @ wq.transpose(-1, -2), wk @ wk.transpose(-1, -2), iterations)


def top_singular_of_grams(gq: Tensor, gk: Tensor, iterations: int = ITERATIONS) -> Tensor:
    """sigma_max per head from the Gram matrices W W^T [H, d, d] of the two maps."""
    v = torch.ones(gq.shape[0], gq.shape[1], 1, dtype=gq.dtype, device=gq.device)
    lam = torch.zeros(gq.shape[0], dtype=gq.dtype, device=gq.device)
    for _ in range(iterations):
        w = gq @ (gk @ v)
        lam = w.norm(dim=(-2, -1)) / v.norm(dim=(-2, -1)).clamp(min=1e-300)
        v = w / w.norm(dim=(-2, -1), keepdim=True).clamp(min=1e-300)
    return lam.clamp(min=0).sqrt()


def _grams(block: RebuiltBlock, role: str, heads: int) -> Tensor:
    """W~_h W~_h^T per head, [H, d, d] in float64, W~ the projection with its bias column.

    Built one head at a time, so only one head's rows are ever held in float64.
    """
    w = block.p(f"{role}.weight")
    assert w is not None
    b = block.p(f"{role}.bias")
    d = w.shape[0] // heads
    out = []
    for h in range(heads):
        rows = w.detach()[h * d:(h + 1) * d].double()
        g = rows @ rows.T
        if b is not None:
            bh = b.detach()[h * d:(h + 1) * d].double()
            g = g + torch.outer(bh, bh)
        out.append(g)
    return torch.stack(out)


def _norm_radius(block: RebuiltBlock, norm: Norm, role: str, width: int) -> float:
    """Largest output norm of a LayerNorm/RMSNorm over `width` features."""
    w, b = block.p(f"{role}.weight"), block.p(f"{role}.bias")
    g = (w.detach().double().abs() + 0.0) if w is not None else None
    gmax = float((g + norm.weight_offset).abs().max()) if g is not None else 1.0
    bias = float(b.detach().double().norm()) if b is not None else 0.0
    return math.sqrt(width) * gmax + bias


def bound(block: RebuiltBlock, x_in: Tensor, c_in: Tensor) -> SpectralBound:
    """The worst-case logit of `block`; x_in/c_in are the probe as it reaches the projections."""
    s = block.spec
    scale = block.logit_scale()
    factor = float(scale) if not isinstance(scale, float) else scale
    if s.q_norm is not None or s.k_norm is not None:
        rq = _side(block, "q", s.q_norm, s.query_norm, "query_norm", x_in, s.heads)
        rk = _side(block, "k", s.k_norm, s.context_norm, "context_norm", c_in, s.kv_heads)
        if s.kv_includes_queries and s.k_norm is None:  # keys also from the normed queries
            rk = max(rk, _side(block, "k", None, s.query_norm, "query_norm", x_in, s.kv_heads))
        return SpectralBound(_cap(rq * rk * factor, s.softcap), "qk-norm")
    rx, sx = _radius(block, s.query_norm, "query_norm", x_in)
    rc, sc = _radius(block, s.context_norm, "context_norm", c_in)
    if s.kv_includes_queries:  # keys also come from the normed queries
        rc, sc = max(rc, rx), sc if sc == sx else "probe"
    gq = _grams(block, "q", s.heads)
    gk = _grams(block, "k", s.kv_heads)
    if s.kv_heads != s.heads:
        gk = gk.repeat_interleave(s.heads // s.kv_heads, dim=0)
    sigma = float(top_singular_of_grams(gq, gk).max())
    value = sigma * math.sqrt(rx**2 + 1) * math.sqrt(rc**2 + 1) * factor
    return SpectralBound(_cap(value, s.softcap), "norms" if sx == sc == "norms" else "probe")


def _side(block: RebuiltBlock, role: str, qk: Norm | None, pre: Norm | None, pre_role: str,
          seen: Tensor, heads: int) -> float:
    """Largest per-head q (or k) norm: from its qk-norm, else sigma(W_h) times the input radius."""
    s = block.spec
    if qk is not None:
        width = s.head_dim if s.qk_norm_per_head else heads * s.head_dim
        return _norm_radius(block, qk, f"{role}_norm", width)
    g = _grams(block, role, heads)
    eye = torch.eye(g.shape[1], dtype=g.dtype, device=g.device).expand(heads, -1, -1)
    r, _ = _radius(block, pre, pre_role, seen)
    return float(top_singular_of_grams(g, eye).max()) * math.sqrt(r**2 + 1)


def _radius(block: RebuiltBlock, norm: Norm | None, role: str, seen: Tensor) -> tuple[float, str]:
    if norm is not None:
        return _norm_radius(block, norm, role, norm.width), "norms"
    return float(seen.detach().double().norm(dim=-1).max()), "probe"


def _cap(value: float, softcap: float | None) -> float:
    return min(value, softcap) if softcap else value
