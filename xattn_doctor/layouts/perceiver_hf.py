"""transformers' Perceiver (PerceiverModel and the Perceiver* task models).

Each attention is `PerceiverAttention`: `self.layernorm1` (pre-norm on the queries),
`self.layernorm2` (pre-norm on the inputs; present only for cross-attention), `self.query`,
`self.key`, `self.value` (q/k `qk_channels` wide, v `v_channels` wide, which may differ),
`output.dense`, scores scaled by 1/sqrt(qk head width), and the residual to the raw queries when
`use_query_residual`. Cross-attention: the encoder's `encoder.cross_attention.attention`
(queries: the learned `embeddings.latents`) and a decoder's
`decoding_cross_attention.attention` (queries: its `output_position_encodings`, when trainable).
The latent self-attention layers are reported as self-attention.
"""

from __future__ import annotations

from typing import Any

from xattn_doctor.layouts import register
from xattn_doctor.layouts._base import (
    BlockSpec,
    HeadsSource,
    KeyIndex,
    ModelConfig,
    Norm,
    TensorRef,
    join,
    linear,
    norm,
    parent,
)

ENCODER_TAIL = "encoder.cross_attention.attention"
DECODER_TAIL = "decoding_cross_attention.attention"
# Decoder heads and query residual are constructor arguments of each task model, not config.
DECODERS: dict[str, tuple[int, bool]] = {
    "PerceiverForMaskedLM": (8, False),
    "PerceiverForSequenceClassification": (1, True),
    "PerceiverForImageClassificationLearned": (1, True),
    "PerceiverForImageClassificationFourier": (1, True),
    "PerceiverForImageClassificationConvProcessing": (1, True),
    "PerceiverForOpticalFlow": (1, False),
    "PerceiverForMultimodalAutoencoding": (1, False),
}
DECODER_DEFAULT = (1, False)  # PerceiverBasicDecoder's defaults


@register
class HFPerceiver:
    """transformers PerceiverAttention modules (cross and self)."""

    name = "hf_perceiver"
    priority = 60

    def match(self, index: KeyIndex, config: ModelConfig) -> list[BlockSpec]:
        """Every PerceiverAttention: encoder/decoder cross-attention, latent self-attention."""
        found = (self._block(index, config, p.rstrip("."))
                 for p in index.with_suffix("self.layernorm1.weight"))
        return [s for s in found if s is not None]

    def _block(self, index: KeyIndex, config: ModelConfig, module: str) -> BlockSpec | None:
        own = join(module, "self")
        q, k, v = (linear(index, join(own, n)) for n in ("query", "key", "value"))
        o = linear(index, join(module, "output.dense"))
        x_norm = norm(index, join(own, "layernorm1"), "layer")
        if q is None or k is None or v is None or o is None or x_norm is None:
            return None
        qk, query_dim = index.shape(q.weight.key) or (0, 0)
        v_width, context_dim = index.shape(v.weight.key) or (0, 0)
        c_norm = norm(index, join(own, "layernorm2"), "layer")
        heads, residual, source, notes = self._geometry(config, module, c_norm is not None)
        if qk % heads or v_width % heads:
            heads, source = 1, "default"
        return BlockSpec(
            name=module, layout=self.name, heads=heads, kv_heads=heads, head_dim=qk // heads,
            v_head_dim=v_width // heads if v_width != qk else None, query_dim=query_dim,
            context_dim=context_dim, q=q, k=k, v=v, o=o, query_norm=x_norm, context_norm=c_norm,
            residual=residual, learned_queries=self._queries(index, module, x_norm),
            role="cross" if c_norm is not None else "self", heads_source=source, notes=notes,
        )

    @staticmethod
    def _geometry(config: ModelConfig, module: str,
                  cross: bool) -> tuple[int, bool, HeadsSource, tuple[str, ...]]:
        """Heads, query residual, where the heads came from, notes."""
        if not cross:
            heads = config.get_int("num_self_attention_heads")
            return heads or 1, True, "config" if heads else "default", ()
        if module == DECODER_TAIL or module.endswith("." + DECODER_TAIL):
            arch = next(iter(config.get("architectures", default=None) or []), None)
            heads, residual = DECODERS.get(arch or "", DECODER_DEFAULT)
            note = ((f"Decoder heads ({heads}) and query residual ({residual}) are what "
                     f"{arch or 'PerceiverBasicDecoder (by default)'} builds; they are not in "
                     "config.json."),)
            return heads, residual, "config" if arch in DECODERS else "default", note
        heads = config.get_int("num_cross_attention_heads")
        residual = config.get("use_query_residual", default=True) is not False
        return heads or 1, residual, "config" if heads else "default", ()

    @staticmethod
    def _queries(index: KeyIndex, module: str, x_norm: Norm) -> TensorRef | None:
        """The encoder's latents, or a decoder's trainable output position encodings."""
        if module == ENCODER_TAIL or module.endswith("." + ENCODER_TAIL):
            key = join(module[: -len(ENCODER_TAIL)].rstrip("."), "embeddings.latents")
        elif module == DECODER_TAIL or module.endswith("." + DECODER_TAIL):
            key = join(parent(parent(module)), "output_position_encodings.position_embeddings")
        else:
            return None
        shape = index.shape(key)
        return TensorRef(key) if shape is not None and len(shape) == 2 and \
            shape[-1] == x_norm.width else None

    def capture(self, spec: BlockSpec, args: tuple[Any, ...],
                kwargs: dict[str, Any]) -> dict[str, Any] | None:
        """PerceiverAttention(hidden_states, attention_mask, inputs, inputs_mask, ...), called
        positionally; the additive [B, 1, Lq, Lk] inputs mask becomes a [B, Lk] key mask."""
        def arg(i: int, name: str) -> Any:
            return args[i] if len(args) > i else kwargs.get(name)

        x, c, mask = arg(0, "hidden_states"), arg(2, "inputs"), arg(3, "inputs_mask")
        if x is None or c is None:
            return None
        out = {"hidden_states": x, "encoder_hidden_states": c}
        if mask is not None:
            while mask.dim() > 2:
                mask = mask[:, 0]
            out["encoder_attention_mask"] = mask == 0 if mask.dtype.is_floating_point else mask
        return out
