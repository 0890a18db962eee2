"""Idefics2's Perceiver resampler (transformers `Idefics2ForConditionalGeneration`, `Idefics2Model`,
and a stand-alone `Idefics2PerceiverResampler`), saved as `model.connector.perceiver_resampler`.

Idefics2 feeds the resampled image tokens to its language model by concatenation, but the
resampler itself is cross-attention: each `Idefics2PerceiverLayer` (`layers.N`) opens with

    y = x + o_proj(attn(q_proj(rms_l(x)), k_proj(kv), v_proj(kv))),   kv = cat(rms_c(c), rms_l(x))

x: the running latents (layer 0: the learned `latents` [n, D]); c: the vision features after
`connector.modality_projection`, already D (text hidden size) wide; rms_l / rms_c:
`input_latents_norm` / `input_context_norm`, RMSNorms with perceiver_config.rms_norm_eps;
grouped-query attention (`resampler_n_heads` query heads, `num_key_value_heads` key/value heads,
`resampler_head_dim` wide), scale 1/sqrt(head_dim), no biases. Padded patches are masked, the
latents never. The module is called `self_attn`, yet only the latents are queries. The layer's
second half (post_attention_layernorm, MLP) is not rebuilt. No other transformers model uses
this layer (Idefics3 and SmolVLM dropped the resampler; Evolla's is lucidrains-style).

Heads and eps come from `perceiver_config` alone (a stand-alone resampler: config.json's top
level): `ModelConfig.get` would find text_config's `num_key_value_heads` and `rms_norm_eps` first.
"""

from __future__ import annotations

from typing import Any

from xattn_doctor.layouts import register
from xattn_doctor.layouts._base import (
    BlockSpec,
    HeadsSource,
    KeyIndex,
    Linear,
    ModelConfig,
    default_heads,
    join,
    linear,
    norm,
)
from xattn_doctor.layouts._hf_mask import key_mask
from xattn_doctor.layouts._lucidrains import first_layer, latents_above

LATENTS_NORM, CONTEXT_NORM = "input_latents_norm", "input_context_norm"
DEFAULT_EPS = 1e-6  # Idefics2PerceiverConfig.rms_norm_eps
Geometry = tuple[int, int, int, HeadsSource]  # heads, kv_heads, head_dim, source
NOTES = (
    ("Idefics2 Perceiver resampler layer: keys and values come from cat(input_context_norm("
     "context), input_latents_norm(latents)); y = latents + o_proj(attn). The layer's "
     "post_attention_layernorm and MLP that follow are not rebuilt."),
    ("encoder_hidden_states are the vision features after connector.modality_projection (text "
     "width); the captured mask drops padded patches, the latents are always attended."),
)
FIRST_NOTE = "learned_queries are the resampler's latents: this first layer's exact queries."
LATER_NOTE = ("Its queries are the latents as updated by the layers before it, not the learned "
              "latents: only a probe captured per block (capture_probe) gives them; otherwise a "
              "probe hidden_states of the resampler's width, or synthetic features, stand in.")


@register
class Idefics2Perceiver:
    """The cross-attention half of each Idefics2 Perceiver resampler layer."""

    name = "idefics2_perceiver"
    priority = 60

    def match(self, index: KeyIndex, config: ModelConfig) -> list[BlockSpec]:
        """Every layer holding both resampler norms beside `self_attn.{q,k,v,o}_proj`."""
        settings = _Settings.read(config)
        found = (self._block(index, settings, p.rstrip("."))
                 for p in index.with_suffix(f"{LATENTS_NORM}.weight"))
        return [s for s in found if s is not None]

    def _block(self, index: KeyIndex, settings: _Settings, layer: str) -> BlockSpec | None:
        attn = join(layer, "self_attn")
        q, k, v, o = (linear(index, join(attn, f"{r}_proj")) for r in "qkvo")
        lat = norm(index, join(layer, LATENTS_NORM), "rms", settings.eps)
        ctx = norm(index, join(layer, CONTEXT_NORM), "rms", settings.eps)
        if q is None or k is None or v is None or o is None or lat is None or ctx is None:
            return None
        inner, dim = _shape(index, q)
        kv_inner = _shape(index, k)[0]
        if _shape(index, k) != _shape(index, v) or _shape(index, k)[1] != dim \
                or _shape(index, o) != (dim, inner) or not lat.width == ctx.width == dim:
            return None
        geometry = settings.geometry(inner, kv_inner)
        if geometry is None:
            return None
        heads, kv_heads, head_dim, source = geometry
        first = first_layer(layer)
        learned = latents_above(index, layer, dim) if first else None
        return BlockSpec(
            name=layer, layout=self.name, heads=heads, kv_heads=kv_heads, head_dim=head_dim,
            query_dim=dim, context_dim=dim, q=q, k=k, v=v, o=o, query_norm=lat,
            context_norm=ctx, residual=True, learned_queries=learned, kv_includes_queries=True,
            role="cross", heads_source=source,
            notes=NOTES + ((FIRST_NOTE,) if learned is not None else () if first else
                           (LATER_NOTE,)),
        )

    def capture(self, spec: BlockSpec, args: tuple[Any, ...],
                kwargs: dict[str, Any]) -> dict[str, Any] | None:
        """Idefics2PerceiverLayer(latents, context, attention_mask=...): the mask over
        cat(context, latents) becomes a [B, Lctx] key mask (the latents' keys are always kept)."""
        x = args[0] if args else kwargs.get("latents")
        c = args[1] if len(args) > 1 else kwargs.get("context")
        if x is None or c is None:
            return None
        out = {"hidden_states": x, "encoder_hidden_states": c}
        mask = key_mask(kwargs.get("attention_mask", args[2] if len(args) > 2 else None))
        if mask is not None and mask.shape[-1] == c.shape[-2] + x.shape[-2]:
            out["encoder_attention_mask"] = mask[:, : c.shape[-2]]
        return out


class _Settings:
    """Head geometry and RMSNorm eps of the resampler, from its own config section."""

    def __init__(self, data: dict[str, Any]) -> None:
        self.heads = _positive(data.get("resampler_n_heads"))
        self.kv_heads = _positive(data.get("num_key_value_heads"))
        self.head_dim = _positive(data.get("resampler_head_dim"))
        eps = data.get("rms_norm_eps")
        self.eps = float(eps) if isinstance(eps, (int, float)) and eps > 0 else DEFAULT_EPS

    @classmethod
    def read(cls, config: ModelConfig) -> _Settings:
        """`perceiver_config`, else the top level (a stand-alone resampler's config.json)."""
        section = config.section("perceiver_config")
        return cls(section.data if section else config.data)

    def geometry(self, inner: int, kv_inner: int) -> Geometry | None:
        """The config's split when the weights agree with it, else the default head width (or
        one key/value head), else None (the widths cannot be split into heads)."""
        head_dim = self.head_dim or (inner // self.heads if self.heads else None)
        if head_dim and _fits(inner, kv_inner, head_dim) \
                and self.heads in (None, inner // head_dim) \
                and self.kv_heads in (None, kv_inner // head_dim):
            return inner // head_dim, kv_inner // head_dim, head_dim, "config"
        for head_dim in (inner // default_heads(inner), kv_inner):
            if _fits(inner, kv_inner, head_dim):
                return inner // head_dim, kv_inner // head_dim, head_dim, "default"
        return None


def _fits(inner: int, kv_inner: int, head_dim: int) -> bool:
    """Whether `head_dim` splits both widths, with whole query groups per key/value head."""
    return 0 < head_dim <= kv_inner and inner % head_dim == 0 and kv_inner % head_dim == 0 \
        and (inner // head_dim) % (kv_inner // head_dim) == 0


def _positive(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 \
        else None


def _shape(index: KeyIndex, lin: Linear) -> tuple[int, int]:
    shape = index.shape(lin.weight.key) or (0, 0)
    return shape[0], shape[1]
