"""IDEFICS' Perceiver resampler (transformers `IdeficsModel` / `IdeficsForVisionText2Text` with
`use_resampler=True`, as in the released idefics-9b and idefics-80b): `model.perceiver_resampler`.

Each `blocks.N.0` is an `IdeficsPerceiverAttention`, called as `attn(context, latents)`:

    y = x + output_proj(attn(q_proj(ln_l(x)), k_proj(kv), v_proj(kv))),   kv = cat(ln_c(c), ln_l(x))

x: the running latents (block 0: the learned `latents` [n, D]); c: one image's vision-encoder
`last_hidden_state` (D = vision_config.embed_dim); ln_l / ln_c: `latents_layer_norm` /
`context_layer_norm`, LayerNorms with torch's default eps 1e-5 (no config value reaches them);
`resampler_n_heads` heads of `resampler_head_dim` (perceiver_config), q scaled by
1/sqrt(head_dim); with `qk_layer_norms_perceiver`, `q_layer_norm`/`k_layer_norm` are per-head
LayerNorms (eps 1e-5) applied before the scaling. No biases, no mask. The residual is added by
the resampler's loop, not the module. `blocks.N.1` (the MLP) and the final `layer_norm` are not
rebuilt. The gated cross-attention layers that read the resampler's output are `idefics`.
"""

from __future__ import annotations

import re
from typing import Any

from xattn_doctor.layouts import register
from xattn_doctor.layouts._base import (
    BlockSpec,
    HeadsSource,
    KeyIndex,
    Linear,
    ModelConfig,
    join,
    linear,
    norm,
    resolve_heads,
)
from xattn_doctor.layouts._lucidrains import latents_above

LATENTS_NORM, CONTEXT_NORM = "latents_layer_norm", "context_layer_norm"
EPS = 1e-5  # nn.LayerNorm's default: IdeficsPerceiverAttention passes none
NOTES = (
    ("IDEFICS Perceiver resampler attention: keys and values come from cat(context_layer_norm("
     "context), latents_layer_norm(latents)); y = latents + output_proj(attn), the residual "
     "being added by the resampler loop. The MLP that follows (blocks.N.1) and the resampler's "
     "final layer_norm are not rebuilt."),
    ("encoder_hidden_states are one image's vision-encoder last_hidden_state (class token and "
     "patches, no final norm): each image is resampled on its own and no key is masked."),
)
FIRST_NOTE = "learned_queries are the resampler's latents: this first block's exact queries."
LATER_NOTE = ("Its queries are the latents as updated by the blocks before it (attention and "
              "MLP), not the learned latents: only a probe captured per block (capture_probe) "
              "gives them; otherwise a probe hidden_states of the resampler's width, or "
              "synthetic features, stand in.")


@register
class IdeficsPerceiver:
    """The attention of each IDEFICS Perceiver resampler block."""

    name = "idefics_perceiver"
    priority = 60

    def match(self, index: KeyIndex, config: ModelConfig) -> list[BlockSpec]:
        """Every module holding both resampler LayerNorms beside q/k/v/output_proj."""
        config_heads = _config_heads(config.section("perceiver_config"))
        found = (self._block(index, p.rstrip("."), config_heads)
                 for p in index.with_suffix(f"{LATENTS_NORM}.weight"))
        return [s for s in found if s is not None]

    def _block(self, index: KeyIndex, module: str,
               config_heads: tuple[int | None, int | None]) -> BlockSpec | None:
        q, k, v = (linear(index, join(module, f"{r}_proj")) for r in "qkv")
        o = linear(index, join(module, "output_proj"))
        lat = norm(index, join(module, LATENTS_NORM), "layer", EPS)
        ctx = norm(index, join(module, CONTEXT_NORM), "layer", EPS)
        if q is None or k is None or v is None or o is None or lat is None or ctx is None:
            return None
        inner, dim = _shape(index, q)
        if not _shape(index, k) == _shape(index, v) == (inner, dim) \
                or _shape(index, o) != (dim, inner) or not lat.width == ctx.width == dim:
            return None
        q_norm = norm(index, join(module, "q_layer_norm"), "layer", EPS)
        k_norm = norm(index, join(module, "k_layer_norm"), "layer", EPS)
        source: HeadsSource
        if q_norm is not None or k_norm is not None:  # per head: their width is head_dim
            if q_norm is None or k_norm is None or q_norm.width != k_norm.width \
                    or inner % q_norm.width:
                return None
            heads, source = inner // q_norm.width, "weights"
        else:
            heads, source = resolve_heads(inner, config_heads=_heads_for(inner, config_heads))
        first = _first_block(module)
        learned = latents_above(index, module, dim) if first else None
        return BlockSpec(
            name=module, layout=self.name, heads=heads, kv_heads=heads, head_dim=inner // heads,
            query_dim=dim, context_dim=dim, q=q, k=k, v=v, o=o, query_norm=lat,
            context_norm=ctx, q_norm=q_norm, k_norm=k_norm, qk_norm_per_head=True,
            residual=True, learned_queries=learned, kv_includes_queries=True, role="cross",
            heads_source=source,
            notes=NOTES + ((FIRST_NOTE,) if learned is not None else () if first else
                           (LATER_NOTE,)),
        )

    def capture(self, spec: BlockSpec, args: tuple[Any, ...],
                kwargs: dict[str, Any]) -> dict[str, Any] | None:
        """IdeficsPerceiverAttention(context, latents): the context comes first."""
        c = args[0] if args else kwargs.get("context")
        x = args[1] if len(args) > 1 else kwargs.get("latents")
        if x is None or c is None:
            return None
        return {"hidden_states": x, "encoder_hidden_states": c}


def _config_heads(section: ModelConfig) -> tuple[int | None, int | None]:
    """perceiver_config's (resampler_n_heads, resampler_head_dim); read from that section only,
    as the top level's `num_attention_heads` is the text model's."""
    return section.get_int("resampler_n_heads"), section.get_int("resampler_head_dim")


def _heads_for(inner: int, config: tuple[int | None, int | None]) -> int | None:
    """The config's head count when it agrees with the weights' width (None when it does not)."""
    heads, head_dim = config
    if heads and head_dim:
        return heads if heads * head_dim == inner else None
    if head_dim:
        return inner // head_dim if inner % head_dim == 0 else None
    return heads


def _first_block(module: str) -> bool:
    """Whether `module` is in the first of the resampler's `blocks.N` (or in no such stack): only
    there are the learned latents the block's actual queries."""
    block = re.search(r"(?:^|\.)blocks\.(\d+)\.\d+$", module)
    return block is None or block.group(1) == "0"


def _shape(index: KeyIndex, lin: Linear) -> tuple[int, int]:
    shape = index.shape(lin.weight.key) or (0, 0)
    return shape[0], shape[1]
