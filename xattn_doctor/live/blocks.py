"""Which cross-attention blocks a live model has, found exactly as `diagnose` finds them in a
checkpoint (from the model's state-dict names and shapes and its config), and where to hook them."""

from __future__ import annotations

import sys
from typing import Any

from torch import nn

from xattn_doctor.errors import ProbeError
from xattn_doctor.layouts import all_layouts, detect
from xattn_doctor.layouts._base import BlockSpec, KeyIndex, Layout, ModelConfig


def find_blocks(model: nn.Module, heads: int | None = None) -> list[BlockSpec]:
    """The model's cross-attention blocks, named as `save_pretrained` would save them."""
    found = detect(KeyIndex(saved_shapes(model)), ModelConfig(config_dict(model)), heads)
    if not found.blocks:
        raise ProbeError(None, "no cross-attention block recognised in the model")
    return found.blocks


def config_dict(model: nn.Module) -> dict[str, Any]:
    """The model's config as a plain dict (transformers and diffusers models carry one)."""
    cfg = getattr(model, "config", None)
    if cfg is None:
        return {}
    if hasattr(cfg, "to_dict"):
        return dict(cfg.to_dict())
    return dict(cfg) if isinstance(cfg, dict) else {}


def saved_shapes(model: nn.Module) -> dict[str, tuple[int, ...]]:
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


def layout_of(spec: BlockSpec) -> Layout | None:
    """The layout that described `spec`."""
    return next((lay for lay in all_layouts() if lay.name == spec.layout), None)


def hook_points(spec: BlockSpec) -> tuple[str, ...]:
    """Where to hook a block: its layout's `capture_modules`, else the block's own module."""
    points = getattr(layout_of(spec), "capture_modules", None)
    return tuple(points(spec)) if points is not None else (spec.name,)


def submodule(model: nn.Module, name: str | None) -> nn.Module | None:
    """The module at dotted path `name` ('' is the model itself; None or absent: None)."""
    if name is None:
        return None
    if not name:
        return model
    try:
        return model.get_submodule(name)
    except AttributeError:
        return None
