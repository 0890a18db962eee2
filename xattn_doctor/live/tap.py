"""`InputTap`: forward pre-hooks on every block's hook points that record what reaches each
block in one forward pass (queries, context, key mask), for capture, model mode and the monitor.

Each hook point records the first call of an armed pass (a block called twice in one forward,
say by generation, keeps its first inputs). Hooks are removed on exit, whatever happened.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from types import TracebackType
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from xattn_doctor.layouts._base import BlockSpec
from xattn_doctor.layouts._hf_mask import keep_or_bias_mask
from xattn_doctor.layouts._livepath import live_path
from xattn_doctor.live.blocks import hook_points, layout_of, submodule

QUERY_KWARGS = ("hidden_states", "x", "query", "text_features", "latents", "lang_x")
CONTEXT_KWARGS = ("encoder_hidden_states", "cross_attention_states", "context", "key",
                  "visual_features", "media", "image_features", "image_hidden_states",
                  "encoder_outputs", "kv")
MASK_KWARGS = ("encoder_attention_mask", "cross_attention_mask", "key_padding_mask",
               "context_mask", "mask", "image_attention_mask")

Records = dict[str, dict[str, Tensor]]


class InputTap:
    """Records each block's inputs while armed (`with InputTap(model, specs) as tap:`).

    `to_cpu=True` stores float32 CPU copies (a probe file's form); otherwise detached copies
    stay on the model's device in its dtype (measured in place, then dropped).
    """

    def __init__(self, model: nn.Module, specs: Sequence[BlockSpec], to_cpu: bool = False,
                 live_keys: Collection[str] | None = None) -> None:
        self.model = model
        self.specs = list(specs)
        self.to_cpu = to_cpu
        self.records: Records = {}
        self._live = set(live_keys) if live_keys is not None else set(model.state_dict())
        self._handles: list[RemovableHandle] = []
        self._done: set[tuple[str, str]] = set()

    @property
    def hooked(self) -> list[str]:
        """Names of the blocks that have at least one hook point in the live model."""
        return [s.name for s in self.specs
                if any(self._module(s, p) is not None for p in hook_points(s))]

    def arm(self) -> None:
        """Register the hooks and forget earlier records."""
        self.disarm()
        self.records, self._done = {}, set()
        for spec in self.specs:
            for point in hook_points(spec):
                module = self._module(spec, point)
                if module is not None:
                    self._handles.append(module.register_forward_pre_hook(
                        self._hook(spec, point), with_kwargs=True))

    def disarm(self) -> None:
        """Remove every hook (idempotent)."""
        for h in self._handles:
            h.remove()
        self._handles = []

    def __enter__(self) -> InputTap:
        self.arm()
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.disarm()

    def _module(self, spec: BlockSpec, point: str) -> nn.Module | None:
        return submodule(self.model, live_path(self._live, spec, point))

    def _hook(self, spec: BlockSpec, point: str):  # type: ignore[no-untyped-def]
        layout = layout_of(spec)

        def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            if (spec.name, point) in self._done:
                return
            self._done.add((spec.name, point))
            got = None
            if layout is not None and hasattr(layout, "capture"):
                got = layout.capture(spec, args, kwargs)
            if got is None:
                got = generic_inputs(module, spec, args, kwargs)
            if got is not None:
                self.records.setdefault(spec.name, {}).update(
                    {k: self._keep(k, v) for k, v in got.items()})

        return hook

    def _keep(self, key: str, t: Tensor) -> Tensor:
        t = t.detach()
        if key == "encoder_attention_mask":
            return t.bool().cpu().clone() if self.to_cpu else t.bool().clone()
        return t.float().cpu().clone() if self.to_cpu else t.clone()


def generic_inputs(module: nn.Module, spec: BlockSpec, args: tuple[Any, ...],
                   kwargs: dict[str, Any]) -> dict[str, Tensor] | None:
    """Queries: first tensor argument (or a known keyword); context: the next one."""
    tensors = [a for a in args if isinstance(a, Tensor)]
    x = next((kwargs[k] for k in QUERY_KWARGS if isinstance(kwargs.get(k), Tensor)), None)
    if x is None and tensors:
        x = tensors.pop(0)
    elif x is not None and tensors and tensors[0] is x:
        tensors.pop(0)
    c = next((kwargs[k] for k in CONTEXT_KWARGS if isinstance(kwargs.get(k), Tensor)), None)
    if c is None and tensors:
        c = tensors[0]
    if x is None or c is None:
        return None
    if isinstance(module, nn.MultiheadAttention) and not module.batch_first:
        x, c = x.transpose(0, 1), c.transpose(0, 1)
    if x.dim() != 3 or c.dim() != 3 or x.shape[-1] != spec.query_dim \
            or c.shape[-1] != spec.context_dim:
        return None
    out = {"hidden_states": x, "encoder_hidden_states": c}
    mask = key_mask_of(kwargs, c)
    if mask is not None:
        out["encoder_attention_mask"] = mask
    return out


def key_mask_of(kwargs: dict[str, Any], c: Tensor) -> Tensor | None:
    """A [B, Lk] keep-mask from the usual conventions (bool keep, bool pad, 0/1, additive)."""
    for name in MASK_KWARGS:
        m = kwargs.get(name)
        if not isinstance(m, Tensor):
            continue
        if m.dim() < 2:
            continue
        if name == "key_padding_mask":  # torch's convention: True = ignore
            m = ~m.bool() if m.dtype == torch.bool else m == 0
        keep: Tensor = keep_or_bias_mask(m)
        if tuple(keep.shape) == tuple(c.shape[:2]):
            return keep
    return None
