"""`capture_probe`: run the user's model once on a real batch and record what reaches each block.

The blocks are found exactly as `diagnose` finds them (from the model's own state dict and
config), so the probe's per-block keys carry the names the report uses. A transformers model
whose `save_pretrained` renames its keys (transformers 5 saves some under legacy prefixes) is
detected under the saved names, and each block is hooked at its live path. Hooks are removed
and the model's train/eval mode restored in `finally`.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from xattn_doctor.errors import ProbeError
from xattn_doctor.live.blocks import find_blocks
from xattn_doctor.live.tap import InputTap


def capture_probe(model: nn.Module, inputs: Mapping[str, Any] | tuple[Any, ...],
                  path: str | Path) -> Path:
    """Run `model(**inputs)` (or `model(*inputs)`) once; write the per-block probe to `path`."""
    specs = find_blocks(model)
    was_training = model.training
    try:
        model.eval()
        with InputTap(model, specs, to_cpu=True) as tap, torch.no_grad():
            if isinstance(inputs, Mapping):
                model(**inputs)
            else:
                model(*inputs)
    finally:
        model.train(was_training)
    if not tap.records:
        raise ProbeError(path, "no cross-attention block of the model received inputs in this "
                               f"forward pass (blocks: {', '.join(s.name for s in specs)})")
    tensors = {f"{name}.{key}" if name else key: t.contiguous()
               for name, rec in tap.records.items() for key, t in rec.items()}
    from safetensors.torch import save_file

    out = Path(path)
    save_file(tensors, str(out))
    return out
