"""Tiny seed-style checkpoints, healthy and sick, for suggest-config and simulation tests.

A layer is the seed playbook's `StableCrossAttentionLayer`: `layers.N.{query_norm, key_norm,
cross_attn.(in_proj_weight, in_proj_bias, out_proj.weight, out_proj.bias), gate}`, saved with
safetensors beside a `config.json` {"num_attention_heads": 4}. Seeded, so every run is equal.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

DIM, HEADS = 64, 4
KINDS = ("healthy", "logit_explosion", "entropy_collapse", "dead", "scale_mismatch",
         "temperature_floor")


def layer(seed: int, *, qk_scale: float = 1.0, dead: bool = False,
          key_norm: bool = True, gate: float = 0.5,
          temperature: float | None = None) -> dict[str, torch.Tensor]:
    """One layer's state dict (keys without the `layers.N.` prefix)."""
    torch.manual_seed(seed)
    mha = torch.nn.MultiheadAttention(DIM, HEADS, batch_first=True)
    sd = {f"cross_attn.{k}": v.detach().clone() for k, v in mha.state_dict().items()}
    sd["cross_attn.in_proj_weight"][: 2 * DIM] *= qk_scale  # q and k rows
    sd["query_norm.weight"], sd["query_norm.bias"] = torch.ones(DIM), torch.zeros(DIM)
    if key_norm:
        sd["key_norm.weight"], sd["key_norm.bias"] = torch.ones(DIM), torch.zeros(DIM)
    sd["gate"] = torch.full((1,), 0.0 if dead else gate)
    if temperature is not None:
        sd["temperature"] = torch.full((1,), temperature)
    if dead:
        sd["cross_attn.out_proj.weight"].zero_()
        sd["cross_attn.out_proj.bias"].zero_()
    return sd


def spec(kind: str) -> dict[str, object]:
    """The layer options for a kind of checkpoint."""
    return {
        "healthy": {},
        "logit_explosion": {"qk_scale": 30.0},
        "entropy_collapse": {"qk_scale": 6.0},
        "dead": {"dead": True},
        "scale_mismatch": {"key_norm": False},
        "temperature_floor": {"qk_scale": 2.0, "temperature": 0.1},
    }[kind]


def make(folder: Path, kind: str, layers: int = 1, dtype: torch.dtype = torch.float32,
         sick_layers: tuple[int, ...] | None = None) -> Path:
    """Write `folder/model.safetensors` (+ config.json); `sick_layers` default: all of them."""
    folder.mkdir(parents=True, exist_ok=True)
    sick = set(range(layers)) if sick_layers is None else set(sick_layers)
    sd: dict[str, torch.Tensor] = {}
    for i in range(layers):
        opts = spec(kind) if i in sick else {}
        for k, v in layer(i, **opts).items():  # type: ignore[arg-type]
            sd[f"layers.{i}.{k}"] = v.to(dtype).contiguous()
    path = folder / "model.safetensors"
    save_file(sd, str(path))
    (folder / "config.json").write_text(json.dumps({"num_attention_heads": HEADS}))
    return path


def probe(folder: Path, context_scale: float = 50.0, seed: int = 0) -> Path:
    """A probe file whose context is `context_scale` times larger than the queries."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 16, DIM, generator=gen)
    c = torch.randn(2, 32, DIM, generator=gen) * context_scale
    path = folder / "probe.safetensors"
    save_file({"hidden_states": x, "encoder_hidden_states": c}, str(path))
    return path
