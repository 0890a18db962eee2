"""The one rebuilt attention module that runs every `BlockSpec`, whatever its family.

It follows `BlockSpec`'s documented order of operations exactly, and exposes the pieces
(`inputs`, `project`, `logits`) so that statistics can be computed in chunks without the
full attention matrix, while `forward` is the plain path used for the backward pass.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from xattn_doctor.layouts._base import BlockSpec, Norm


def _pname(role: str) -> str:
    return role.replace(".", "__")


class RebuiltBlock(nn.Module):
    """A cross-attention block rebuilt from a `BlockSpec` and its tensors (keyed by role)."""

    def __init__(self, spec: BlockSpec, tensors: Mapping[str, Tensor]) -> None:
        super().__init__()
        self.spec = spec
        for role, t in tensors.items():
            self.register_parameter(_pname(role), nn.Parameter(t.detach(), requires_grad=True))

    def p(self, role: str) -> Tensor | None:
        """The parameter for a role such as 'q.weight' (None when the block has none)."""
        return getattr(self, _pname(role), None)

    def role_parameters(self) -> dict[str, Tensor]:
        """Parameters by role name."""
        return {n.replace("__", "."): p for n, p in self.named_parameters()}

    # --- pieces -----------------------------------------------------------------------
    def _norm(self, x: Tensor, norm: Norm | None, role: str) -> Tensor:
        if norm is None:
            return x
        w, b = self.p(f"{role}.weight"), self.p(f"{role}.bias")
        if w is not None and norm.weight_offset:
            w = w + norm.weight_offset
        if norm.kind == "layer":
            return F.layer_norm(x, (x.shape[-1],), w, b, norm.eps)
        xf = x.float()
        y = (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + norm.eps)).to(x.dtype)
        if w is not None:
            y = y * w
        return y + b if b is not None else y

    def _linear(self, x: Tensor, role: str) -> Tensor:
        w = self.p(f"{role}.weight")
        assert w is not None, role
        return F.linear(x, w, self.p(f"{role}.bias"))

    def inputs(self, x: Tensor, c: Tensor) -> tuple[Tensor, Tensor]:
        """The query and context streams as they reach the projections (after pre-norms)."""
        return (self._norm(x, self.spec.query_norm, "query_norm"),
                self._norm(c, self.spec.context_norm, "context_norm"))

    def project(self, x_in: Tensor, c_in: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """q [B,H,Lq,d], k and v [B,H,Lk',d] (GQA-expanded, qk-normed, bias_k/v appended)."""
        return (self.project_q(x_in), *self.project_kv(x_in, c_in))

    def project_q(self, x_in: Tensor) -> Tensor:
        """q [B,H,Lq,d]: one row per query, so a subsample of x_in gives those queries' rows."""
        s = self.spec
        q = self._linear(x_in, "q")
        if not s.qk_norm_per_head:
            q = self._norm(q, s.q_norm, "q_norm")
        q = q.reshape(*q.shape[:-1], s.heads, s.head_dim).transpose(1, 2)
        return self._norm(q, s.q_norm, "q_norm") if s.qk_norm_per_head else q

    def project_kv(self, x_in: Tensor, c_in: Tensor) -> tuple[Tensor, Tensor]:
        """k and v [B,H,Lk',d] (GQA-expanded, k-normed, bias_k/v appended)."""
        s = self.spec
        kv_in = torch.cat([c_in, x_in], dim=-2) if s.kv_includes_queries else c_in
        k, v = self._linear(kv_in, "k"), self._linear(kv_in, "v")
        bk, bv = self.p("bias_k"), self.p("bias_v")
        if bk is not None and bv is not None:
            k = torch.cat([k, bk.reshape(1, 1, -1).expand(k.shape[0], 1, -1)], dim=1)
            v = torch.cat([v, bv.reshape(1, 1, -1).expand(v.shape[0], 1, -1)], dim=1)
        if not s.qk_norm_per_head:
            k = self._norm(k, s.k_norm, "k_norm")
        k = k.reshape(*k.shape[:-1], s.kv_heads, s.head_dim).transpose(1, 2)
        v = v.reshape(*v.shape[:-1], s.kv_heads, s.v_head_dim or s.head_dim).transpose(1, 2)
        if s.qk_norm_per_head:
            k = self._norm(k, s.k_norm, "k_norm")
        if s.kv_heads != s.heads:
            rep = s.heads // s.kv_heads
            k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        return k, v

    def logit_scale(self) -> Tensor | float:
        """scale / clamp(temperature): the factor between q.k and the logit."""
        t = self.p("temperature")
        if t is None:
            return self.spec.softmax_scale
        return self.spec.softmax_scale / t.float().clamp(min=self.spec.temperature_min).reshape(-1)[0]

    def logits(self, q: Tensor, k: Tensor) -> Tensor:
        """Scaled (and soft-capped) scores, in q's dtype: [B,H,Lq,Lk]."""
        scale = self.logit_scale()  # applied to q: Lq x d products, not Lq x Lk
        out = (q * (scale.to(q.dtype) if isinstance(scale, Tensor) else scale)) @ k.transpose(-1, -2)
        if self.spec.softcap:
            out = self.spec.softcap * torch.tanh(out / self.spec.softcap)
        return out

    def gate_value(self) -> Tensor | None:
        """fn(gate parameter), or None for an ungated block."""
        g = self.p("gate")
        if g is None or self.spec.gate is None:
            return None
        fn = self.spec.gate.fn
        return torch.tanh(g) if fn == "tanh" else torch.sigmoid(g) if fn == "sigmoid" else g

    def finish(self, x: Tensor, attended: Tensor) -> Tensor:
        """From softmax(l) v [B,H,Lq,d] to the block output: o_proj, gate, residual, post-norm."""
        out = attended.transpose(1, 2).flatten(-2)
        if self.spec.o is not None:
            out = self._linear(out, "o")
        g = self.gate_value()
        if g is not None:
            out = g.to(out.dtype) * out
        y = x + out if self.spec.residual else out
        return self._norm(y, self.spec.post_norm, "post_norm")

    def attend(self, q: Tensor, k: Tensor, v: Tensor, valid: Tensor | None) -> Tensor:
        """softmax(logits) v over valid keys, the softmax in float32: [B,H,Lq,dv]."""
        logits = self.logits(q, k).float()
        probs = torch.softmax(logits if valid is None else
                              logits.masked_fill(~valid[:, None, None, :], float("-inf")), dim=-1)
        if valid is not None:  # a query with every key masked attends to nothing (not NaN)
            probs = probs.masked_fill(~valid.any(-1)[:, None, None, None], 0.0)
        return probs.to(v.dtype) @ v

    def forward(self, x: Tensor, c: Tensor, mask: Tensor | None = None) -> Tensor:
        """The block's output for queries x [B,Lq,Dq], context c [B,Lk,Dk], mask [B,Lk] (True=keep)."""
        x_in, c_in = self.inputs(x, c)
        q, k, v = self.project(x_in, c_in)
        return self.finish(x, self.attend(q, k, v, key_mask(mask, k.shape[-2], self.spec)))


def key_mask(mask: Tensor | None, n_keys: int, spec: BlockSpec) -> Tensor | None:
    """The boolean [B, Lk'] key mask, extended for keys that are always valid: the queries
    themselves (kv_includes_queries) and an appended bias_k key."""
    if mask is None:
        return None
    valid = mask.bool()
    pad = n_keys - valid.shape[-1]
    if pad > 0 and (spec.kv_includes_queries or (spec.bias_k is not None and pad == 1)):
        valid = torch.cat([valid, valid.new_ones(valid.shape[0], pad)], dim=-1)
    return valid
