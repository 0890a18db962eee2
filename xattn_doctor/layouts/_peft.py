"""LoRA checkpoints, which hold no weights the tool could run as they stand.

A PEFT-wrapped model saved before merging keeps each adapted linear as `<m>.base_layer.weight`
beside `<m>.lora_A[.<adapter>].weight` / `lora_B`: the weight the model runs is
base + (alpha / r) * B @ A, and alpha lives in adapter_config.json, not in the file. An adapter
file alone (PEFT's lora_A/lora_B, kohya's lora_down/lora_up) has no base weights at all.
Diagnosing either as found would measure the wrong block, so both are named and refused (LoRA
elsewhere in a model, e.g. on its text encoder, does not stop the blocks that have none).
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from xattn_doctor.layouts._base import BlockSpec
from xattn_doctor.layouts._index import KeyIndex

LORA = re.compile(r"(?:^|[._])(?:lora_[AB]|lora_down|lora_up|lora_embedding_[AB])"
                  r"(?:\.[^.]+)?\.weight$")
MERGE = ("merge the adapter into its base model (PEFT: `model.merge_and_unload()`, then "
         "`save_pretrained`) and diagnose the merged checkpoint")


def describe_lora(index: KeyIndex) -> str | None:
    """What kind of LoRA checkpoint this is, with what to do, or None for a plain one."""
    lora = [k for k in index.shapes if LORA.search(k)]
    if not lora:
        return None
    base = sum(1 for k in index.shapes if k.endswith(".base_layer.weight"))
    if base:
        return (f"a model with unmerged PEFT LoRA layers ({base} `base_layer` weights beside "
                f"{len(lora)} LoRA factors): the weights it runs are base + (alpha/r) B A, "
                f"and alpha is not in the file; {MERGE}")
    return (f"a LoRA adapter ({len(lora)} LoRA factors, e.g. `{sorted(lora)[0]}`) without the "
            f"base model's weights; {MERGE}")


def lora_under(index: KeyIndex, blocks: Iterable[BlockSpec]) -> bool:
    """Whether a LoRA factor or base_layer sits inside one of `blocks`' modules."""
    heads = tuple(b.name + "." for b in blocks if b.name)
    if not heads:
        return True  # a block at the root owns every key
    return any(k.startswith(heads) and (LORA.search(k) or k.endswith(".base_layer.weight"))
               for k in index.shapes)
