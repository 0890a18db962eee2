"""Run one rebuilt block on its inputs, forward and backward, and measure it.

Statistics come from the chunked pass (no gradients); gradient norms from the backward of a
proxy loss <y, g> / (B * Lq), with g a seeded standard normal: the gradient a
mean-reduced loss would send into the block's output. When the full backward would exceed the
memory budget, it runs on a seeded subsample of the queries (`backward_queries` says how many).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from xattn_doctor.attention import RebuiltBlock, key_mask
from xattn_doctor.findings import Metrics
from xattn_doctor.probe import BlockInputs
from xattn_doctor.spectral import bound
from xattn_doctor.stats import DEFAULT_BUDGET, attention_stats

ATTENTION_PATH = ("q.", "k.", "v.", "o.", "gate", "temperature", "q_norm", "k_norm",
                  "query_norm", "context_norm", "bias_k", "bias_v")


@dataclass(frozen=True)
class RunSettings:
    """How to run a block: device, dtype, memory budget for score tiles, seed."""

    device: torch.device
    dtype: torch.dtype
    budget: int = DEFAULT_BUDGET
    seed: int = 0


def measure(block: RebuiltBlock, inputs: BlockInputs, run: RunSettings) -> Metrics:
    """All metrics of one block (the block must already be on run.device in run.dtype).

    One forward through the key/value projections serves both the statistics (detached,
    chunked, every query) and the backward pass (all queries, or a subsample whose query
    rows alone are projected again with gradients).
    """
    x = inputs.x.to(run.device, run.dtype)
    c = inputs.c.to(run.device, run.dtype)
    mask = inputs.mask.to(run.device) if inputs.mask is not None else None
    m = Metrics()
    params = block.role_parameters()
    m.weight_norms = {r: _norm(p) for r, p in params.items()}
    m.nonfinite = {f"weight:{r}": n for r, p in params.items()
                   if not math.isfinite(m.weight_norms[r]) and (n := _nonfinite(p))}
    m.nonfinite.update({f"input:{n}": bad for n, t in (("hidden_states", x), ("context", c))
                        if (bad := _nonfinite(t))})
    learned = block.p("learned_queries")
    if inputs.x_source == "learned" and learned is not None:
        x = learned.reshape(1, -1, learned.shape[-1]).expand(x.shape[0], -1, -1)
    else:
        x = x.detach().requires_grad_(True)
    c = c.detach().requires_grad_(True)
    block.zero_grad(set_to_none=True)
    block.train(False)
    x_in, c_in = block.inputs(x, c)
    k, v = block.project_kv(x_in, c_in)
    valid = key_mask(mask, k.shape[-2], block.spec)
    idx = _query_subsample(block, x.shape[0], x.shape[1], k.shape[-2], run)
    if idx is None:
        q = q_all = block.project_q(x_in)
    else:
        with torch.no_grad():
            q_all = block.project_q(x_in)
        q = block.project_q(x_in.index_select(1, idx))
    with torch.no_grad():
        _forward_stats(block, x.detach(), c.detach(), mask,
                       (x_in, c_in, q_all, k, v), valid, run, m)
    del q_all
    _backward(block, (x, c), idx, (q, k, v), valid, run, m)
    return m


def _query_subsample(block: RebuiltBlock, b: int, lq: int, lk: int,
                     run: RunSettings) -> Tensor | None:
    """The sorted seeded query indices the backward runs on, or None for all of them: as
    many as keep its float32 score tiles and their gradients within the budget."""
    per_query = b * block.spec.heads * lk * 4 * 8
    keep = max(1, min(lq, run.budget // max(per_query, 1)))
    if keep >= lq:
        return None
    gen = torch.Generator().manual_seed(run.seed % 2**64)  # torch takes a uint64; any --seed
    return torch.randperm(lq, generator=gen)[:keep].sort().values.to(run.device)


Projected = tuple[Tensor, Tensor, Tensor, Tensor, Tensor]


def _forward_stats(block: RebuiltBlock, x: Tensor, c: Tensor, mask: Tensor | None,
                   proj: Projected, valid: Tensor | None, run: RunSettings, m: Metrics) -> None:
    x_in, c_in, q, k, v = (t.detach() for t in proj)
    m.query_rms = _rms(x_in)
    m.context_rms = _rms_of_rows(c_in, mask)
    m.scale_ratio = m.context_rms / m.query_rms if m.query_rms else math.inf
    raw_q, raw_c = _rms(x), _rms_of_rows(c, mask)
    m.scale_ratio_raw = raw_c / raw_q if raw_q else math.inf
    m.max_abs_activation = max(_absmax(t) for t in (x_in, c_in, q, k, v))
    st = attention_stats(q, k.contiguous(), block.logits, valid, run.budget)  # one copy, faster tiles
    m.max_logit = st.max_logit
    m.head_entropy, m.head_entropy_norm = st.head_entropy, st.head_entropy_norm
    m.entropy_mean = _mean(st.head_entropy)
    m.entropy_min_head = _min(st.head_entropy)
    m.entropy_norm_mean = _mean(st.head_entropy_norm)
    m.entropy_norm_min_head = _min(st.head_entropy_norm)
    m.max_attention_weight = st.max_weight
    m.saturated_query_share = st.saturated_share
    m.top_key_share, m.top_key_share_max_head = st.top_key_share, st.top_key_share_max_head
    m.top_key_index, m.valid_keys_mean = st.top_key_index, st.valid_keys_mean
    if st.nonfinite_logits:
        m.nonfinite["logits"] = st.nonfinite_logits
    g = block.gate_value()
    if g is not None:
        gf = g.detach().float()
        m.gate = float(gf.reshape(-1)[0]) if gf.numel() == 1 else float(gf.mean())
        m.gate_abs_max = float(gf.abs().max())
    t = block.p("temperature")
    if t is not None:
        m.temperature = float(t.detach().float().reshape(-1)[0])
    sb = bound(block, x_in, c_in)
    m.spectral_max_logit, m.spectral_bound_source = sb.max_logit, sb.source


def _backward(block: RebuiltBlock, xc: tuple[Tensor, Tensor], idx: Tensor | None,
              qkv: tuple[Tensor, Tensor, Tensor], valid: Tensor | None, run: RunSettings,
              m: Metrics) -> None:
    x, c = xc
    q, k, v = qkv
    xs = x if idx is None else x.index_select(1, idx)
    m.backward_queries = xs.shape[1]
    y = block.finish(xs, block.attend(q, k, v, valid))
    gen = torch.Generator().manual_seed(run.seed % 2**64)
    if idx is not None:  # the same stream position as when it drew the subsample
        torch.randperm(x.shape[1], generator=gen)
    cot = torch.randn(y.shape, generator=gen).to(y.device)
    loss = (y.float() * cot).sum() / (y.shape[0] * y.shape[1])
    torch.autograd.backward(loss)
    m.output_rms = _rms(y.detach())
    m.max_abs_activation = max(m.max_abs_activation or 0.0, _absmax(y))
    if (n := _nonfinite(y.detach())):
        m.nonfinite["output"] = n
    grads = {r: p.grad for r, p in block.role_parameters().items() if p.grad is not None}
    m.grad_norms = {r: _norm(g) for r, g in grads.items()}
    m.grad_norm = math.sqrt(sum(v * v for v in m.grad_norms.values()))
    m.input_grad_norms = {n: _norm(t.grad) for n, t in
                          (("hidden_states", x), ("encoder_hidden_states", c))
                          if t.is_leaf and t.grad is not None}
    path = [r for r in grads if r.startswith(ATTENTION_PATH)]
    # a norm of 0 is necessary for an all-zero gradient; only then look at every element
    m.zero_grad = bool(path) and all(m.grad_norms[r] == 0.0 and bool((grads[r] == 0).all())
                                     for r in path)
    for r, g in grads.items():
        if not math.isfinite(m.grad_norms[r]) and (n := _nonfinite(g)):
            m.nonfinite[f"grad:{r}"] = n
    block.zero_grad(set_to_none=True)


def _norm(t: Tensor) -> float:
    """The L2 norm in float32 without a float32 copy of the tensor."""
    return float(torch.linalg.vector_norm(t.detach(), dtype=torch.float32))


def _nonfinite(t: Tensor) -> int:
    """How many NaN/inf elements; one reduction when there are none (their sum is finite)."""
    t = t.detach()
    if not t.is_floating_point() or bool(torch.isfinite(t.sum(dtype=torch.float32))):
        return 0
    return int((~torch.isfinite(t)).sum())


def _absmax(t: Tensor) -> float:
    """Largest finite |value|: from min and max when both are finite, else elementwise
    (no boolean indexing: its index tensor is 8 bytes an element)."""
    t = t.detach()
    if not t.numel():
        return 0.0
    lo, hi = (float(v) for v in torch.aminmax(t))
    if math.isfinite(lo) and math.isfinite(hi):
        return max(-lo, hi)
    return float(torch.where(torch.isfinite(t), t.abs(), torch.zeros((), dtype=t.dtype,
                                                                     device=t.device)).amax())


def _rms(t: Tensor) -> float:
    return _norm(t) / math.sqrt(t.numel()) if t.numel() else math.nan


def _rms_of_rows(t: Tensor, keep: Tensor | None) -> float:
    """RMS over the kept rows of t [B, L, D] (keep [B, L]); NaN when none is kept."""
    if keep is None or bool(keep.all()):
        return _rms(t)
    return _rms(t[keep]) if bool(keep.any()) else math.nan


def _mean(v: list[float]) -> float:
    finite = [x for x in v if math.isfinite(x)]
    return sum(finite) / len(finite) if finite else math.nan


def _min(v: list[float]) -> float:
    finite = [x for x in v if math.isfinite(x)]
    return min(finite) if finite else math.nan
