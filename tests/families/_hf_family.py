"""Helpers shared by the family tests: save, rebuild, measure, and corrupt a saved checkpoint."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

from xattn_doctor.attention import RebuiltBlock, key_mask
from xattn_doctor.checkpoint import Checkpoint, open_checkpoint
from xattn_doctor.layouts import Detection, detect
from xattn_doctor.layouts._base import BlockSpec


def save(model: Any, path: Path, shard: str = "20KB") -> Path:
    """`save_pretrained` as safetensors, sharded small enough to split the model."""
    model.save_pretrained(path, max_shard_size=shard)
    return path


def detect_dir(path: Path) -> tuple[Checkpoint, Detection]:
    """Open a saved model folder and detect its blocks."""
    ckpt = open_checkpoint(path)
    return ckpt, detect(ckpt.index, ckpt.config)


def rebuild(ckpt: Checkpoint, spec: BlockSpec) -> RebuiltBlock:
    """The rebuilt float32 block."""
    tensors = ckpt.load(dict(spec.refs()))
    return RebuiltBlock(spec, {k: v.float() for k, v in tensors.items()})


def probs(blk: RebuiltBlock, x: torch.Tensor, c: torch.Tensor,
          mask: torch.Tensor | None = None) -> torch.Tensor:
    """Attention probabilities [B, H, Lq, Lk] of the rebuilt block (masked keys get 0)."""
    with torch.no_grad():
        q, k, _ = blk.project(*blk.inputs(x, c))
        logits = blk.logits(q, k).float()
        valid = key_mask(mask, k.shape[-2], blk.spec)
        if valid is not None:
            logits = logits.masked_fill(~valid[:, None, None, :], float("-inf"))
        return logits.softmax(-1)


def max_logit(blk: RebuiltBlock, x: torch.Tensor, c: torch.Tensor) -> float:
    """The largest scaled pre-softmax score."""
    with torch.no_grad():
        q, k, _ = blk.project(*blk.inputs(x, c))
        return float(blk.logits(q, k).max())


def patch(path: Path, key: str, fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
    """Rewrite one tensor of a saved (possibly sharded) model in place."""
    from safetensors.torch import load_file, save_file

    index = path / "model.safetensors.index.json"
    shard = json.loads(index.read_text())["weight_map"][key] if index.exists() \
        else "model.safetensors"
    tensors = load_file(str(path / shard))
    tensors[key] = fn(tensors[key])
    save_file(tensors, str(path / shard), metadata={"format": "pt"})


def shard_count(path: Path) -> int:
    """How many safetensors files the model was saved in."""
    return len(list(path.glob("*.safetensors")))


@contextlib.contextmanager
def recorded_layers(model: Any, blocks: list[str], attn: str) -> Iterator[dict[str, dict[str, Any]]]:
    """Per block (a layer path): the layer call's args and kwargs, and its `attn` submodule's
    output and attention weights (`attn_out`, `weights`), from the forward run inside."""
    seen: dict[str, dict[str, Any]] = {}
    hooks = []
    for name in blocks:
        mod = model.get_submodule(name)
        hooks += [
            mod.register_forward_pre_hook(
                lambda m, a, kw, n=name: seen.__setitem__(n, {"args": a, "kwargs": kw}),
                with_kwargs=True),
            getattr(mod, attn).register_forward_hook(
                lambda m, a, o, n=name: seen[n].update(attn_out=o[0], weights=o[1])),
        ]
    try:
        yield seen
    finally:
        for h in hooks:
            h.remove()
