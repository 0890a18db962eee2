"""The batch model mode runs the model on: a .safetensors of the forward's keyword arguments,
checked against the forward's signature before anything runs."""

from __future__ import annotations

import inspect
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
    """The forward's parameter names, and whether it takes **kwargs."""
    sig = inspect.signature(model.forward)
    names = [n for n, p in sig.parameters.items()
             if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
    takes_any = any(p.kind is p.VAR_KEYWORD for p in sig.parameters.values())
    return names, takes_any


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
