"""diffusers cross-attention: `attn2` of a `BasicTransformerBlock` (UNet2DConditionModel,
Transformer2DModel, PixArtTransformer2DModel and the like).

The block modelled is the transformer block's cross-attention sub-block:

    y = x + to_out.0(attn(to_q(norm2(x)), to_k(norm_cross(c)), to_v(norm_cross(c))))

`norm2` is a LayerNorm of the query stream at the transformer-block level (affine or not per
`norm_elementwise_affine`); PixArt (`norm_type` "ada_norm_single") feeds `attn2` the raw
hidden states and keeps its `norm2` for the MLP. `norm_cross` (on the context) and the qk
norms `norm_q`/`norm_k` are optional parts of `Attention`. `attn1` is self-attention and is
never reported here. SD3.5's dual-attention `attn2` (beside a joint `attn`) is self-attention.

Heads: a UNet's `attention_head_dim` historically means the number of heads (when
`num_attention_heads` is null), per down block, reversed for up blocks, last for the mid
block; transformers' `num_attention_heads` means what it says. A single-file Stable Diffusion
checkpoint (`model.diffusion_model.input_blocks...`, the same `attn2`/`norm2` names, no
config.json) takes its heads from the model version its context width gives away.
"""

from __future__ import annotations

import re
from dataclasses import replace
from typing import Any

from xattn_doctor.layouts import register
from xattn_doctor.layouts._base import (
    BlockSpec,
    HeadsSource,
    KeyIndex,
    Linear,
    ModelConfig,
    Norm,
    TensorRef,
    common_prefix,
    join,
    linear,
    norm,
    parent,
    resolve_heads,
)
from xattn_doctor.layouts._hf_mask import keep_or_bias_mask

UNET_BLOCK = re.compile(r"(?:^|\.)(down_blocks|up_blocks)\.(\d+)\.|(?:^|\.)mid_block\.")
# the original (CompVis / Stability) UNet naming of single-file checkpoints
LDM_UNET = re.compile(r"(?:^|\.)diffusion_model\.(?:input_blocks|middle_block|output_blocks)\.")
LAYER_EPS = 1e-5  # nn.LayerNorm default; Attention's eps for norm_cross and qk-norms
ADA_NOTE = ("norm2 is timestep-conditioned (AdaLayerNorm) in the library; modelled as a plain "
            "LayerNorm without its scale and shift.")


@register
class DiffusersAttn2:
    """`attn2` (to_q/to_k/to_v/to_out.0) with the transformer block's `norm2`."""

    name = "diffusers_attn2"
    priority = 55

    def match(self, index: KeyIndex, config: ModelConfig) -> list[BlockSpec]:
        """Every `attn2` module with separate to_q/to_k/to_v projections."""
        found = []
        for prefix in index.with_suffix("attn2.to_q.weight"):
            spec = self._block(index, config, prefix.rstrip("."))
            if spec is not None:
                found.append(spec)
        return found

    def _block(self, index: KeyIndex, config: ModelConfig, block: str) -> BlockSpec | None:
        attn = join(block, "attn2")
        q, k, v = (linear(index, join(attn, f"to_{r}")) for r in "qkv")
        if q is None or k is None or v is None:
            return None
        inner, query_dim = _shape(index, q)
        kv_inner, context_dim = _shape(index, k)
        if _shape(index, v)[1] != context_dim:
            return None
        heads, source, heads_note = _heads(config, block, inner, context_dim)
        head_dim = inner // heads
        if kv_inner % head_dim or heads % (kv_inner // head_dim):
            return None
        q_norm, k_norm = (norm(index, join(attn, n), eps=LAYER_EPS) for n in ("norm_q", "norm_k"))
        query_norm, notes = _query_norm(index, config, block, query_dim)
        notes += (heads_note,) if heads_note else ()
        context_norm = norm(index, join(attn, "norm_cross"), "layer", LAYER_EPS)
        if context_norm is not None and config.get("cross_attention_norm") == "group_norm":
            notes += ("norm_cross is a GroupNorm in the library; modelled as a LayerNorm.",)
        if join(attn, "add_k_proj.weight") in index:
            notes += ("The added key/value projections (add_k_proj/add_v_proj) are left out.",)
        self_attn = join(block, "attn.add_k_proj.weight") in index
        spec = BlockSpec(
            name="", layout=self.name, heads=heads, kv_heads=kv_inner // head_dim,
            head_dim=head_dim, query_dim=query_dim, context_dim=context_dim, q=q, k=k, v=v,
            o=linear(index, join(attn, "to_out.0")), query_norm=query_norm,
            context_norm=context_norm, q_norm=q_norm, k_norm=k_norm,
            qk_norm_per_head=q_norm is None or q_norm.width == head_dim != inner,
            residual=True, role="self" if self_attn else "cross", heads_source=source,
            notes=notes,
        )
        return replace(spec, name=common_prefix(spec.keys()))

    def capture_modules(self, spec: BlockSpec) -> tuple[str, ...]:
        """Modules to hook (saved-key paths): the query stream enters `norm2`, the context `attn2`.

        Hooked whole, a transformer block would show `attn1`'s input; the cross-attention
        sub-block's query stream is what enters `norm2` (PixArt, without one: `attn2`).
        """
        attn = spec.name if spec.name.endswith("attn2") else join(spec.name, "attn2")
        return (attn,) if spec.query_norm is None else (join(parent(attn), "norm2"), attn)

    def capture(self, spec: BlockSpec, args: tuple[Any, ...],
                kwargs: dict[str, Any]) -> dict[str, Any] | None:
        """What one hooked call saw: `norm2(x[, timestep])` gives the query stream,
        `attn2(hidden_states, encoder_hidden_states, attention_mask)` the context and mask
        (and the query stream when there is no `norm2`)."""
        x = kwargs.get("hidden_states", args[0] if args else None)
        c = kwargs.get("encoder_hidden_states", args[1] if len(args) > 1 else None)
        if getattr(c, "ndim", 0) != 3:  # a norm2 call (its second argument: a timestep)
            return {"hidden_states": x} if x is not None else None
        out: dict[str, Any] = {"encoder_hidden_states": c}
        if spec.query_norm is None:
            out["hidden_states"] = x
        mask = kwargs.get("attention_mask", args[2] if len(args) > 2 else None)
        if mask is not None:
            # the UNet and PixArt turn a keep mask into a (1 - m) * -10000 bias
            out["encoder_attention_mask"] = keep_or_bias_mask(mask)
        return out


def _shape(index: KeyIndex, lin: Linear) -> tuple[int, int]:
    shape = index.shape(lin.weight.key)
    assert shape is not None
    return shape[0], shape[1]


def _query_norm(index: KeyIndex, config: ModelConfig, block: str,
                width: int) -> tuple[Norm | None, tuple[str, ...]]:
    """norm2 as the cross-attention sub-block sees it, with notes on what is approximated."""
    if config.get("norm_type") == "ada_norm_single":
        return None, ()  # PixArt: attn2 gets the raw hidden states
    eps = _norm_eps(config)
    found = norm(index, join(block, "norm2"), "layer", eps)
    if found is not None:
        return (found, ()) if found.width == width else (None, ())
    weight = join(block, "norm2.weight")
    if weight in index:  # not a vector: kept, so that the shape check refuses the file
        return Norm("layer", width, TensorRef(weight), eps=eps), ()
    if index.under(join(block, "norm2.")):
        return Norm("layer", width, eps=eps), (ADA_NOTE,)
    if config.get("norm_type") == "layer_norm" and config.get("norm_elementwise_affine") is False:
        return Norm("layer", width, eps=eps), ()
    return None, ()


def _norm_eps(config: ModelConfig) -> float:
    """Transformer2DModel's `norm_eps`; a UNet's `norm_eps` is for its resnets, not norm2."""
    if str(config.get("_class_name", default="")).startswith("UNet"):
        return LAYER_EPS
    eps = config.get("norm_eps")
    return float(eps) if isinstance(eps, (int, float)) and eps > 0 else LAYER_EPS


def _heads(config: ModelConfig, block: str, inner: int,
           context_dim: int) -> tuple[int, HeadsSource, str | None]:
    """Head count of the `attn2` under `block` from config.json, else, for a single-file
    Stable Diffusion UNet, from its model version; else the default. The str is a note."""
    configured = _unet_heads(config, block)
    if configured is None and not config.get("down_block_types"):
        configured = config.get_int("num_attention_heads")
        if configured is None and isinstance(config.get("attention_head_dim"), int):
            configured = _as_heads(inner, config.get("attention_head_dim"))
    if configured is None and not config and LDM_UNET.search(block):
        configured, note = _ldm_heads(inner, context_dim)
        if configured is not None:
            heads, source = resolve_heads(inner, config_heads=configured)
            return heads, source, note
    heads, source = resolve_heads(inner, config_heads=configured)
    return heads, source, None


def _ldm_heads(inner: int, context_dim: int) -> tuple[int | None, str | None]:
    """A single-file SD UNet (`model.diffusion_model.`, no config.json): SD 1.x (CLIP ViT-L
    context, 768 wide) has 8 heads in every block (v1-inference.yaml `num_heads: 8`); SD 2.x
    (1024) and SDXL (2048) have 64-wide heads (`num_head_channels: 64`)."""
    if context_dim == 768:
        return 8, ("Single-file SD 1.x UNet (context 768 wide): 8 heads, as its "
                   "v1-inference.yaml sets; --heads overrides.")
    if context_dim in (1024, 2048) and inner % 64 == 0:
        version = "SD 2.x" if context_dim == 1024 else "SDXL"
        return inner // 64, (f"Single-file {version} UNet (context {context_dim} wide): heads "
                             "64 wide, as its config's num_head_channels sets; --heads overrides.")
    return None, None


def _unet_heads(config: ModelConfig, block: str) -> int | None:
    """UNet2DConditionModel: per-block heads from num_attention_heads or attention_head_dim."""
    downs = config.get("down_block_types")
    m = UNET_BLOCK.search(block)
    if not isinstance(downs, list) or m is None:
        return None
    value = config.get("num_attention_heads") or config.get("attention_head_dim")
    per_block = [value] * len(downs) if isinstance(value, int) else value
    if not isinstance(per_block, list) or len(per_block) != len(downs) or not per_block:
        return None
    kind, i = m.group(1), int(m.group(2) or 0)
    chosen = per_block[-1] if kind is None else per_block[i] if kind == "down_blocks" \
        else per_block[::-1][i] if i < len(per_block) else None
    return chosen if isinstance(chosen, int) and chosen > 0 else None


def _as_heads(inner: int, head_dim: Any) -> int | None:
    """Heads from a true per-head width."""
    return inner // head_dim if isinstance(head_dim, int) and head_dim > 0 and \
        inner % head_dim == 0 else None
