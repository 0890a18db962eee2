"""Helpers for the family tests: open a saved checkpoint, rebuild its blocks, and read the
attention probabilities out of a library's own forward pass."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from xattn_doctor.attention import RebuiltBlock, key_mask
from xattn_doctor.checkpoint import open_checkpoint
from xattn_doctor.layouts import Detection, detect


def write_config(folder: Path, config: dict[str, Any]) -> None:
    """Write config.json beside the weights."""
    (folder / "config.json").write_text(json.dumps(config))


def rebuild(path: Path, heads: int | None = None) -> tuple[Detection, dict[str, RebuiltBlock]]:
    """Detect the blocks of a saved checkpoint and rebuild each in float32."""
    ckpt = open_checkpoint(path)
    det = detect(ckpt.index, ckpt.config, heads)
    blocks = {}
    for spec in det.blocks:
        tensors = ckpt.load(dict(spec.refs()))
        blocks[spec.name] = RebuiltBlock(spec, {k: v.float() for k, v in tensors.items()})
    return det, blocks


def probs(blk: RebuiltBlock, x: Tensor, c: Tensor, mask: Tensor | None = None) -> Tensor:
    """The rebuilt block's attention probabilities [B, H, Lq, Lk']."""
    with torch.no_grad():
        q, k, _ = blk.project(*blk.inputs(x, c))
        logits = blk.logits(q, k).float()
        valid = key_mask(mask, k.shape[-2], blk.spec)
        if valid is not None:
            logits = logits.masked_fill(~valid[:, None, None, :], float("-inf"))
        return logits.softmax(-1)


def max_logit(blk: RebuiltBlock, x: Tensor, c: Tensor) -> float:
    """The largest scaled pre-softmax score of the rebuilt block."""
    with torch.no_grad():
        q, k, _ = blk.project(*blk.inputs(x, c))
        return float(blk.logits(q, k).float().max())


def entropy(p: Tensor) -> Tensor:
    """Per-head entropy in nats, averaged over batch and queries: [H]."""
    return -(p * p.clamp_min(1e-30).log()).sum(-1).mean(dim=(0, 2))


@contextlib.contextmanager
def recorded_einsum(module: Any, is_attention: Callable[[tuple[Any, ...]], Tensor | None],
                    attr: str = "einsum") -> Iterator[list[Tensor]]:
    """Record the attention matrices a library passes to its `einsum` (patched in `module`)."""
    original = getattr(module, attr)
    seen: list[Tensor] = []

    def spy(*args: Any, **kwargs: Any) -> Any:
        attn = is_attention(args)
        if attn is not None:
            seen.append(attn.detach().clone())
        return original(*args, **kwargs)

    setattr(module, attr, spy)
    try:
        yield seen
    finally:
        setattr(module, attr, original)


@contextlib.contextmanager
def recorded_calls(model: torch.nn.Module, names: list[str]) -> Iterator[dict[str, Any]]:
    """Record (args, kwargs, output) of the first call of each named submodule."""
    calls: dict[str, Any] = {}
    handles = []
    for name in names:
        def hook(mod: Any, args: Any, kwargs: Any, out: Any, name: str = name) -> None:
            calls.setdefault(name, (args, kwargs, out))
        handles.append(model.get_submodule(name).register_forward_hook(hook, with_kwargs=True))
    try:
        yield calls
    finally:
        for h in handles:
            h.remove()
