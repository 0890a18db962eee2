"""IDEFICS (transformers `IdeficsModel` / `IdeficsForVisionText2Text`): the gated cross-attention
layers `gated_cross_attn_layers.<i>` inserted before every `cross_layer_interval`-th decoder layer.

One `IdeficsGatedCrossAttentionLayer` computes
`h = x + tanh(alpha_cross_attn) * o_proj(attn(q_proj(rms(x)), k_proj(c), v_proj(c)))`
and then a gated MLP, `y = h + tanh(alpha_dense) * mlp(rms(h))`. The block is the first half:
`input_layernorm` is the query pre-norm (RMSNorm, `rms_norm_eps`), the image features `c` reach
k_proj/v_proj without a norm of this layer (they come normalised upstream only when the Perceiver
resampler, whose last op is a LayerNorm, is on), `q_layer_norm`/`k_layer_norm` (with
`qk_layer_norms`) are per-head RMSNorms, and `alpha_cross_attn` ((1,) for `alpha_type` "float",
(1, 1, hidden) for "vector") is the tanh gate. The MLP half and its `alpha_dense` gate are not run;
`alpha_dense` is listed among the block's keys. No projection has a bias, so text tokens that may
attend to no image (zeroed by IDEFICS' `cross_attention_gate`) get a zero update here too.
The Perceiver resampler's attention blocks (`perceiver_resampler.blocks.N.0`, keys and values
over cat(context, latents)) are the `idefics_perceiver` layout's (idefics_perceiver.py).
"""

from __future__ import annotations

from typing import Any

from xattn_doctor.layouts import register
from xattn_doctor.layouts._base import (
    BlockSpec,
    Gate,
    KeyIndex,
    Linear,
    ModelConfig,
    TensorRef,
    join,
    linear,
    norm,
    resolve_heads,
)
from xattn_doctor.layouts._hf_mask import key_mask

GATE = "alpha_cross_attn"
DENSE_GATE = "alpha_dense"
DEFAULT_EPS = 1e-6  # IdeficsConfig.rms_norm_eps
NOTES = (
    ("hidden_states is the text stream entering the gated cross-attention layer (before its "
     "input_layernorm); the block's output is the hidden state after the gated attention "
     "residual, before the layer's gated MLP (alpha_dense, not measured)."),
    ("IDEFICS masks image tokens per text token; a captured mask keeps a key when any text "
     "token may attend to it."),
)


@register
class Idefics:
    """IDEFICS gated cross-attention layers."""

    name = "idefics"
    priority = 60

    def match(self, index: KeyIndex, config: ModelConfig) -> list[BlockSpec]:
        """Every layer holding `alpha_cross_attn` beside a `cross_attn` with q/k/v/o_proj."""
        eps = _eps(config)
        heads = config.get_int("num_attention_heads")
        found = []
        for prefix in index.with_suffix(GATE):
            spec = self._block(index, prefix.rstrip("."), eps, heads)
            if spec is not None:
                found.append(spec)
        return found

    def capture(self, spec: BlockSpec, args: tuple[Any, ...],
                kwargs: dict[str, Any]) -> dict[str, Any] | None:
        """The layer's `hidden_states` and `image_hidden_states` (positional 0 and 2)."""
        x = kwargs.get("hidden_states", args[0] if args else None)
        c = kwargs.get("image_hidden_states", args[2] if len(args) > 2 else None)
        if x is None or c is None:
            return None
        out = {"hidden_states": x, "encoder_hidden_states": c}
        mask = key_mask(kwargs.get("image_attention_mask", args[3] if len(args) > 3 else None))
        if mask is not None:
            out["encoder_attention_mask"] = mask
        return out

    def _block(self, index: KeyIndex, layer: str, eps: float,
               config_heads: int | None) -> BlockSpec | None:
        attn = join(layer, "cross_attn")
        projs = _projections(index, attn)
        pre = norm(index, join(layer, "input_layernorm"), kind="rms", eps=eps)
        if projs is None or pre is None:
            return None
        q, k, v, o = projs
        inner, query_dim = _shape(index, q)
        gate_shape = index.shape(join(layer, GATE)) or ()
        if pre.width != query_dim or gate_shape[-1:] not in ((1,), (query_dim,)):
            return None
        q_norm = norm(index, join(attn, "q_layer_norm"), kind="rms", eps=eps)
        k_norm = norm(index, join(attn, "k_layer_norm"), kind="rms", eps=eps)
        per_head = q_norm.width if q_norm is not None else None
        heads, source = resolve_heads(inner, per_head_width=per_head, config_heads=config_heads)
        dense = join(layer, DENSE_GATE)
        return BlockSpec(
            name=layer, layout=self.name, heads=heads, kv_heads=heads,
            head_dim=inner // heads, query_dim=query_dim, context_dim=_shape(index, k)[1],
            q=q, k=k, v=v, o=o, query_norm=pre, q_norm=q_norm, k_norm=k_norm,
            qk_norm_per_head=True, gate=Gate(TensorRef(join(layer, GATE)), "tanh"),
            residual=True, role="cross", heads_source=source, notes=NOTES,
            extra_keys=(dense,) if dense in index else (),
        )


def _eps(config: ModelConfig) -> float:
    value = config.data.get("rms_norm_eps")
    return float(value) if isinstance(value, (int, float)) and value > 0 else DEFAULT_EPS


def _projections(index: KeyIndex, attn: str) -> tuple[Linear, Linear, Linear, Linear] | None:
    """q/k/v/o_proj of `attn`, when their shapes agree."""
    q, k, v, o = (linear(index, join(attn, f"{n}_proj")) for n in "qkvo")
    if q is None or k is None or v is None or o is None:
        return None
    inner, query_dim = _shape(index, q)
    if _shape(index, k)[0] != inner or _shape(index, v) != _shape(index, k) \
            or _shape(index, o) != (query_dim, inner):
        return None
    return q, k, v, o


def _shape(index: KeyIndex, lin: Linear) -> tuple[int, int]:
    shape = index.shape(lin.weight.key) or (0, 0)
    return shape[0], shape[1]
