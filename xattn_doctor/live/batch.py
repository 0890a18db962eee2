"""The batch model mode runs the model on: a .safetensors of the forward's keyword arguments,
checked against the forward's signature before anything runs."""

from __future__ import annotations

import inspect
import typing
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from xattn_doctor.checkpoint import read_tensor
from xattn_doctor.errors import UsageError
from xattn_doctor.st_header import read_header

# arguments that carry values (pixels, features, embeddings, latents), never ids or masks
FLOAT_ARGS = ("pixel_values", "sample", "encoder_hidden_states", "input_features",
              "inputs_embeds", "decoder_inputs_embeds", "image_embeds", "cross_attention_states",
              "vision_x", "media", "images", "image_features", "input_values", "latents",
              "flattened_patches", "context")


def forward_params(model: nn.Module) -> tuple[list[str], bool]:
    """The forward's parameter names, and whether it takes any keyword at all (a bare
    **kwargs; transformers' `**kwargs: Unpack[TypedDict]` takes only that dict's keys)."""
    try:
        sig = inspect.signature(model.forward, eval_str=True)
    except (NameError, TypeError, SyntaxError):
        sig = inspect.signature(model.forward)
    names = [n for n, p in sig.parameters.items()
             if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
    takes_any = False
    for p in sig.parameters.values():
        if p.kind is p.VAR_KEYWORD:
            typed = _unpacked_keys(p.annotation)
            if typed is None:
                takes_any = True
            else:
                names += [k for k in typed if k not in names]
    return names, takes_any


def _unpacked_keys(annotation: Any) -> list[str] | None:
    """The keys of `Unpack[SomeTypedDict]`, None for any other annotation."""
    if getattr(typing.get_origin(annotation), "__name__", "") != "Unpack" \
            and "Unpack" not in repr(annotation):
        return None
    args = typing.get_args(annotation)
    if not args:
        return None
    keys: list[str] = []
    for klass in reversed(getattr(args[0], "__mro__", (args[0],))):  # a TypedDict's bases
        keys += [k for k in getattr(klass, "__annotations__", {}) if k not in keys]
    return keys or None


def load_batch(path: Path, model: nn.Module, device: torch.device,
               dtype: torch.dtype) -> dict[str, Any]:
    """The batch's tensors by forward argument; floats cast to the run dtype, others kept."""
    header = read_header(path, UsageError)
    if not header.tensors:
        raise UsageError(path, "the batch holds no tensors")
    names, takes_any = forward_params(model)
    unknown = sorted(k for k in header.tensors if k not in names)
    if unknown and not takes_any:
        raise UsageError(path, f"batch key(s) {', '.join(unknown)} are not arguments of "
                               f"{type(model).__name__}.forward (it takes: {', '.join(names)})")
    out: dict[str, Any] = {}
    for key in header.tensors:
        t: Tensor = read_tensor(header, key)
        if key in FLOAT_ARGS and not t.is_floating_point():
            raise UsageError(path, f"batch tensor {key!r} has dtype "
                                   f"{str(t.dtype).replace('torch.', '')}; the model takes "
                                   "floating-point values there")
        out[key] = t.to(device, dtype) if t.is_floating_point() else t.to(device)
    return out
