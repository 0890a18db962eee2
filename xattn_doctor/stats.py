"""Attention statistics over key chunks with an exact online log-sum-exp.

Memory is bounded by a budget, not by heads x queries x keys: for each query chunk the keys
are swept in chunks while a running max m, a running sum s = sum exp(l - m) and a running
t = sum exp(l - m) (l - m) are kept. Then, per query, entropy = log s - t / s and the largest
softmax weight = 1 / s, exactly as the full softmax would give them. Accumulated in float32.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from xattn_doctor.findings import SATURATED_WEIGHT as SATURATED

DEFAULT_BUDGET = 64 * 2**20


@dataclass
class AttentionStats:
    """Block-level summaries of the attention distribution (float32)."""

    max_logit: float
    nonfinite_logits: int
    head_entropy: list[float]
    head_entropy_norm: list[float]
    max_weight: float
    saturated_share: float
    top_key_share: float
    top_key_share_max_head: float
    top_key_index: int | None
    valid_keys_mean: float


def chunk_sizes(batch: int, heads: int, lq: int, lk: int, budget: int) -> tuple[int, int]:
    """Query and key chunk lengths whose float32 score tiles (with temporaries) fit `budget`."""
    kc = min(lk, 4096)
    per_query = batch * heads * kc * 4 * 6
    return max(1, min(lq, budget // max(per_query, 1))), kc


def attention_stats(q: Tensor, k: Tensor, logits: Callable[[Tensor, Tensor], Tensor],
                    valid: Tensor | None, budget: int = DEFAULT_BUDGET) -> AttentionStats:
    """Statistics of softmax(logits(q, k)) over valid keys; q [B,H,Lq,d], k [B,H,Lk,d].

    `logits` must return a new tensor: its float32 result is reused in place.
    """
    b, h, lq, _ = q.shape
    lk = k.shape[-2]
    if valid is None:
        valid = torch.ones(b, lk, dtype=torch.bool, device=q.device)
    qc, kc = chunk_sizes(b, h, lq, lk, budget)
    buf = torch.empty(b * h * min(qc, lq) * kc, dtype=torch.float32, device=q.device)
    sweep = _Sweep(k, logits, valid, kc, buf)
    ent, maxw, arg, maxl, bad = [], [], [], [], 0
    for q0 in range(0, lq, qc):
        e, w, a, ml, nb = sweep(q[:, :, q0:q0 + qc])
        ent.append(e)
        maxw.append(w)
        arg.append(a)
        maxl.append(ml)
        bad += nb
    return _summarise(torch.cat(ent, -1), torch.cat(maxw, -1), torch.cat(arg, -1),
                      max(maxl), bad, valid)


# exp(d) is exactly 0 in float32 for every d below this, so clamping there changes no sum,
# and it turns the -inf of masked keys into a finite number whose product with 0 is 0.
UNDERFLOW = -200.0


class _Sweep:
    """One pass over the keys for a chunk of queries, reusing one exp(.) buffer throughout
    (fresh multi-MB tensors cost a page fault per 4 KiB, more than the arithmetic on them)."""

    def __init__(self, k: Tensor, logits: Callable[[Tensor, Tensor], Tensor], valid: Tensor,
                 kc: int, buf: Tensor) -> None:
        self.k, self.logits, self.valid, self.kc, self.buf = k, logits, valid, kc, buf
        self.all_valid = bool(valid.all())

    def __call__(self, q: Tensor) -> tuple[Tensor, Tensor, Tensor, float, int]:
        b, h, n, _ = q.shape
        dev = q.device
        m = torch.full((b, h, n), -math.inf, device=dev)
        s = torch.zeros(b, h, n, device=dev)
        t = torch.zeros(b, h, n, device=dev)
        idx = torch.zeros(b, h, n, dtype=torch.long, device=dev)
        bad = 0
        for k0 in range(0, self.k.shape[-2], self.kc):
            lg, nb = self._chunk_logits(q, k0)
            bad += nb
            cm, ci = lg.max(-1)
            m_new = torch.maximum(m, cm)
            idx = torch.where(cm > m, ci + k0, idx)
            base = torch.where(torch.isfinite(m_new), m_new, torch.zeros_like(m_new))
            shift = torch.where(s > 0, m - base, torch.zeros_like(m))
            decay = torch.exp(shift) * (s > 0)
            d = lg.sub_(base[..., None]).clamp_(min=UNDERFLOW)
            ex = torch.exp(d, out=self.buf[:d.numel()].view(d.shape))
            t = decay * (t + shift * s) + torch.einsum("...k,...k->...", ex, d)
            s = decay * s + ex.sum(-1)
            m = m_new
        has = s > 0
        safe_s = torch.where(has, s, torch.ones_like(s))
        ent = torch.where(has, torch.log(safe_s) - t / safe_s, torch.full_like(s, math.nan))
        maxw = torch.where(has, 1.0 / safe_s, torch.full_like(s, math.nan))
        top = m[has].max().item() if bool(has.any()) else math.nan
        return ent, maxw, idx, top, bad

    def _chunk_logits(self, q: Tensor, k0: int) -> tuple[Tensor, int]:
        """float32 logits of one key chunk, -inf where masked or not finite; and how many
        valid ones were not finite (counted only when their sum says there are any)."""
        ok = self.valid[:, None, None, k0:k0 + self.kc]
        raw = self.logits(q, self.k[:, :, k0:k0 + self.kc]).float()
        if bool(torch.isfinite(raw.sum())):  # no NaN or inf anywhere: the cheap path
            return (raw if self.all_valid else raw.masked_fill_(~ok, -math.inf)), 0
        finite = torch.isfinite(raw)
        return raw.masked_fill_(~(finite & ok), -math.inf), int((~finite & ok).sum())


def _summarise(ent: Tensor, maxw: Tensor, arg: Tensor, max_logit: float, bad: int,
               valid: Tensor) -> AttentionStats:
    b, h, lq = ent.shape
    n_valid = valid.sum(-1).float()  # [B]
    live = torch.isfinite(ent)
    log_n = torch.log(n_valid.clamp(min=1))[:, None, None].expand_as(ent)
    norm_ok = live & (log_n > 0)
    head_ent = _masked_mean(ent, live, dims=(0, 2))
    head_norm = _masked_mean(ent / torch.where(log_n > 0, log_n, torch.ones_like(log_n)),
                             norm_ok, dims=(0, 2))
    shares, keys = [], []
    for bi in range(b):
        for hi in range(h):
            sel = arg[bi, hi][live[bi, hi]]
            if sel.numel():
                counts = torch.bincount(sel)
                shares.append((hi, counts.max().item() / sel.numel()))
                keys.append(int(counts.argmax()))
    per_head = [max((s for hh, s in shares if hh == hi), default=0.0) for hi in range(h)]
    return AttentionStats(
        max_logit=max_logit,
        nonfinite_logits=bad,
        head_entropy=head_ent,
        head_entropy_norm=head_norm,
        max_weight=float(maxw[live].max()) if bool(live.any()) else math.nan,
        saturated_share=float((maxw[live] > SATURATED).float().mean()) if bool(live.any())
        else math.nan,
        top_key_share=sum(s for _, s in shares) / len(shares) if shares else math.nan,
        top_key_share_max_head=max(per_head) if per_head else math.nan,
        top_key_index=max(set(keys), key=keys.count) if keys else None,
        valid_keys_mean=float(n_valid.mean()),
    )


def _masked_mean(x: Tensor, keep: Tensor, dims: tuple[int, ...]) -> list[float]:
    total = torch.where(keep, x, torch.zeros_like(x)).sum(dims)
    count = keep.sum(dims)
    out = torch.where(count > 0, total / count.clamp(min=1), torch.full_like(total, math.nan))
    return [float(v) for v in out]
