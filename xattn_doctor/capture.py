"""`capture_probe`: run the user's model once on a real batch and record what reaches each block.

The blocks are found exactly as `diagnose` finds them (from the model's own state dict and
config), so the probe's per-block keys carry the names the report uses. A transformers model
whose `save_pretrained` renames its keys (transformers 5 saves some under legacy prefixes) is
detected under the saved names, and each block is hooked at its live path. Hooks are removed
and the model's train/eval mode restored in `finally`.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from xattn_doctor.errors import ProbeError
from xattn_doctor.layouts import all_layouts, detect
from xattn_doctor.layouts._base import BlockSpec, KeyIndex, ModelConfig
from xattn_doctor.layouts._hf_mask import keep_or_bias_mask
from xattn_doctor.layouts._livepath import live_path

QUERY_KWARGS = ("hidden_states", "x", "query", "text_features", "latents", "lang_x")
CONTEXT_KWARGS = ("encoder_hidden_states", "cross_attention_states", "context", "key",
                  "visual_features", "media", "image_features", "image_hidden_states",
                  "encoder_outputs", "kv")
MASK_KWARGS = ("encoder_attention_mask", "cross_attention_mask", "key_padding_mask",
               "context_mask", "mask", "image_attention_mask")


def capture_probe(model: nn.Module, inputs: Mapping[str, Any] | tuple[Any, ...],
                  path: str | Path) -> Path:
    """Run `model(**inputs)` (or `model(*inputs)`) once; write the per-block probe to `path`."""
    specs = _blocks(model)
    records: dict[str, dict[str, Tensor]] = {}
    hooks = []
    was_training = model.training
    try:
        live = set(model.state_dict())
        for spec in specs:
            for point in _points(spec):
                module = _module(model, live_path(live, spec, point))
                if module is not None:
                    hooks.append(module.register_forward_pre_hook(
                        _recorder(spec, point, records), with_kwargs=True))
        model.eval()
        with torch.no_grad():
            if isinstance(inputs, Mapping):
                model(**inputs)
            else:
                model(*inputs)
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    if not records:
        raise ProbeError(path, "no cross-attention block of the model received inputs in this "
                               f"forward pass (blocks: {', '.join(s.name for s in specs)})")
    tensors = {f"{name}.{key}" if name else key: t.contiguous()
               for name, rec in records.items() for key, t in rec.items()}
    from safetensors.torch import save_file

    out = Path(path)
    save_file(tensors, str(out))
    return out


def _blocks(model: nn.Module) -> list[BlockSpec]:
    index = KeyIndex(_saved_shapes(model))
    cfg = getattr(model, "config", None)
    data = cfg.to_dict() if cfg is not None and hasattr(cfg, "to_dict") else {}
    found = detect(index, ModelConfig(data))
    if not found.blocks:
        raise ProbeError(None, "no cross-attention block recognised in the model")
    return found.blocks


def _saved_shapes(model: nn.Module) -> dict[str, tuple[int, ...]]:
    """Key shapes as `save_pretrained` writes them (transformers' reverse key renaming, run on
    meta tensors), else as the live state dict has them."""
    state = model.state_dict()
    shapes = {k: tuple(v.shape) for k, v in state.items()}
    tf = sys.modules.get("transformers")
    if tf is None or not isinstance(model, tf.PreTrainedModel):
        return shapes
    try:
        from transformers.core_model_loading import revert_weight_conversion

        saved = revert_weight_conversion(model, {k: v.to("meta") for k, v in state.items()})
    except Exception:  # a private transformers API: fall back to the live names
        return shapes
    return {k: tuple(v.shape) for k, v in saved.items()}


def _points(spec: BlockSpec) -> tuple[str, ...]:
    """Where to hook a block: its layout's `capture_modules`, else the block's own module."""
    layout = next((lay for lay in all_layouts() if lay.name == spec.layout), None)
    points = getattr(layout, "capture_modules", None)
    return tuple(points(spec)) if points is not None else (spec.name,)


def _module(model: nn.Module, name: str | None) -> nn.Module | None:
    if name is None:
        return None
    if not name:
        return model
    try:
        return model.get_submodule(name)
    except AttributeError:
        return None


def _recorder(spec: BlockSpec, point: str,  # type: ignore[no-untyped-def]
              records: dict[str, dict[str, Tensor]]):
    layout = next((lay for lay in all_layouts() if lay.name == spec.layout), None)
    done: list[bool] = []

    def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        if done:
            return  # the first call (at each hook point) is the one the probe records
        done.append(True)
        got = None
        if layout is not None and hasattr(layout, "capture"):
            got = layout.capture(spec, args, kwargs)
        if got is None:
            got = _generic(module, spec, args, kwargs)
        if got is not None:
            records.setdefault(spec.name, {}).update(
                {k: v.detach().float().cpu().clone() if k != "encoder_attention_mask"
                 else v.detach().bool().cpu().clone() for k, v in got.items()})

    return hook


def _generic(module: nn.Module, spec: BlockSpec, args: tuple[Any, ...],
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
    mask = _mask(kwargs, c)
    if mask is not None:
        out["encoder_attention_mask"] = mask
    return out


def _mask(kwargs: dict[str, Any], c: Tensor) -> Tensor | None:
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
