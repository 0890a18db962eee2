"""perceiver-pytorch (lucidrains): Perceiver and PerceiverIO.

Every attention is `PreNorm(Attention)`: `norm` (pre-norm on the queries), `norm_context`
(pre-norm on the context; present only for cross-attention), `fn.to_q`, packed `fn.to_kv`,
`fn.to_out` (with bias), scores scaled by dim_head**-0.5. Cross-attention: Perceiver's
`layers.N.cross_attn` (queries: the learned `latents` in the first layer), PerceiverIO's
`cross_attend_block.cross_attn` and `decoder_cross_attn` (queries: the caller's decoder
queries; no residual). The latent self-attention (`self_attns.M.0`) is reported as such.

Heads: config.json `cross_heads` / `latent_heads` (or `cross_dim_head` / `latent_dim_head`), the
constructor's own argument names, else the library's 64-wide heads.
"""

from __future__ import annotations

from typing import Any

from xattn_doctor.layouts import register
from xattn_doctor.layouts._base import BlockSpec, KeyIndex, ModelConfig, join, linear, norm
from xattn_doctor.layouts._lucidrains import (
    LATER_LAYER_NOTE,
    config_heads,
    first_layer,
    latents_above,
    packed_kv,
)

DECODER = "decoder_cross_attn"
NOTES = (("Perceiver's inverted_cross_attn (softmax over the latents) and PerceiverBlock's "
          "queries_contribute_kv are constructor options the weights do not show; diagnosed as "
          "the default softmax over the context."),)


@register
class PerceiverPytorch:
    """PreNorm-wrapped Attention modules of perceiver-pytorch (cross and self)."""

    name = "perceiver_pytorch"
    priority = 55

    def match(self, index: KeyIndex, config: ModelConfig) -> list[BlockSpec]:
        """Every PreNorm(Attention): cross-attention with norm_context, else self-attention."""
        found = (self._block(index, config, p.rstrip("."))
                 for p in index.with_suffix("fn.to_kv.weight"))
        return [s for s in found if s is not None]

    def _block(self, index: KeyIndex, config: ModelConfig, module: str) -> BlockSpec | None:
        q, o = linear(index, join(module, "fn.to_q")), linear(index, join(module, "fn.to_out"))
        kv = packed_kv(index, join(module, "fn.to_kv"))
        x_norm = norm(index, join(module, "norm"), "layer")
        if q is None or o is None or kv is None or x_norm is None:
            return None
        k, v, context_dim = kv
        inner, query_dim = index.shape(q.weight.key) or (0, 0)
        c_norm = norm(index, join(module, "norm_context"), "layer")
        if k.weight.rows != (0, inner) or x_norm.width != query_dim or \
                (c_norm is not None and c_norm.width != context_dim):
            return None
        cross = c_norm is not None
        heads = (config_heads(config, ("cross_heads",), ("cross_dim_head",)) if cross else
                 config_heads(config, ("latent_heads",), ("latent_dim_head",)))(inner)
        decoder = module.rsplit(".", 1)[-1] == DECODER
        first = first_layer(module)
        return BlockSpec(
            name=module, layout=self.name, heads=heads[0], kv_heads=heads[0],
            head_dim=inner // heads[0], query_dim=query_dim, context_dim=context_dim, q=q, k=k,
            v=v, o=o, query_norm=x_norm, context_norm=c_norm, residual=not decoder,
            learned_queries=latents_above(index, module, query_dim)
            if cross and first and not decoder else None,
            role="cross" if cross else "self", heads_source=heads[1],
            notes=NOTES + (() if first or not cross else (LATER_LAYER_NOTE,)),
        )

    def capture(self, spec: BlockSpec, args: tuple[Any, ...],
                kwargs: dict[str, Any]) -> dict[str, Any] | None:
        """PreNorm.forward(x, context=..., mask=...): mask [B, ...] flattened (True = keep)."""
        x = args[0] if args else kwargs.get("x")
        c = kwargs.get("context")
        if x is None or c is None:
            return None
        out = {"hidden_states": x, "encoder_hidden_states": c}
        mask = kwargs.get("mask")
        if mask is not None:
            out["encoder_attention_mask"] = mask.reshape(mask.shape[0], -1).bool()
        return out
