"""A block's tensors and gradients read from the live model, by role, without copies.

A block's `TensorRef`s name tensors as the checkpoint saves them; the live model may hold them
under other prefixes (transformers 5's renaming on save), and packed projections are rows of one
tensor. `LiveWeights` maps each role to its live parameter (and rows) once, then serves the
weights for measurement and the real gradients the model's own loss left in `.grad`.
"""

from __future__ import annotations

import math
from collections.abc import Collection
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from xattn_doctor.errors import UsageError
from xattn_doctor.layouts._base import BlockSpec
from xattn_doctor.layouts._livepath import live_path


@dataclass(frozen=True)
class LiveRef:
    """Where one role of a block lives: a live tensor name and optional rows [start, stop)."""

    key: str
    rows: tuple[int, int] | None


class LiveWeights:
    """Every block's roles resolved to live tensors of `model` (parameters and buffers)."""

    def __init__(self, model: nn.Module, specs: list[BlockSpec],
                 live_keys: Collection[str] | None = None) -> None:
        self.tensors: dict[str, Tensor] = dict(model.named_parameters(remove_duplicate=False))
        buffers = model.named_buffers(remove_duplicate=False)
        self.tensors.update({k: v for k, v in buffers if k not in self.tensors})
        keys = set(live_keys) if live_keys is not None else set(model.state_dict())
        self.refs: dict[str, dict[str, LiveRef]] = {
            s.name: self._resolve(s, keys) for s in specs}

    def _resolve(self, spec: BlockSpec, keys: set[str]) -> dict[str, LiveRef]:
        out = {}
        for role, ref in spec.refs():
            key = _live_key(keys, spec, ref.key)
            if key is None or key not in self.tensors:
                raise UsageError(None, f"block {spec.name or '<root>'}: tensor {ref.key!r} "
                                       "(its " + role + ") has no counterpart in the live model")
            out[role] = LiveRef(key, ref.rows)
        return out

    def block_tensors(self, spec: BlockSpec) -> dict[str, Tensor]:
        """The block's tensors by role, detached views of the live ones (no copy)."""
        return {role: _rows(self.tensors[r.key].detach(), r.rows)
                for role, r in self.refs[spec.name].items()}

    def grad_norms(self, spec: BlockSpec) -> dict[str, float]:
        """The L2 norm of each role's real gradient (roles without a gradient are left out)."""
        out = {}
        for role, r in self.refs[spec.name].items():
            g = getattr(self.tensors[r.key], "grad", None)
            if g is not None:
                out[role] = _norm(_rows(g, r.rows))
        return out


def total_norm(norms: dict[str, float]) -> float:
    """The L2 norm of a set of parameters from their own norms."""
    return math.sqrt(sum(v * v for v in norms.values()))


def global_grad_norm(model: nn.Module) -> float | None:
    """The whole model's gradient norm (pre-clip), None when no parameter has a gradient."""
    grads = [p.grad.detach() for p in model.parameters() if p.grad is not None]
    if not grads:
        return None
    return total_norm({str(i): _norm(g) for i, g in enumerate(grads)})


def _live_key(keys: set[str], spec: BlockSpec, saved: str) -> str | None:
    if saved in keys:
        return saved
    module, _, leaf = saved.rpartition(".")
    path = live_path(keys, spec, module) if module else None
    if path is None:
        return None
    return f"{path}.{leaf}" if path else leaf


def _rows(t: Tensor, rows: tuple[int, int] | None) -> Tensor:
    return t if rows is None else t[rows[0]:rows[1]]


def _norm(t: Tensor) -> float:
    return float(torch.linalg.vector_norm(t.detach(), dtype=torch.float32))
