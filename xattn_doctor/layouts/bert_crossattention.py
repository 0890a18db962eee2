"""BERT-named cross-attention: `<layer>.crossattention.self.{query,key,value}` and
`<layer>.crossattention.output.{dense,LayerNorm}`.

Saved this way by BLIP's text model (transformers `BlipForConditionalGeneration`,
`BlipForQuestionAnswering`, `BlipForImageTextRetrieval`: `text_decoder.bert.encoder.layer.N`,
`text_encoder.encoder.layer.N`) and by BERT-like decoders built with `add_cross_attention`
(`BertLMHeadModel`, RoBERTa, ELECTRA, ... alone or as the decoder of `EncoderDecoderModel` /
`VisionEncoderDecoderModel`). The generic layout would name the block `...crossattention.self`
and miss both `output.dense` and the post-LayerNorm; this is the Q-Former's block (its building
code is shared with `blip2_qformer`) with the projections under `self`:

    y = LayerNorm(x + dense(softmax(q k^T / sqrt(head_dim)) v)),  eps `layer_norm_eps`

checked in transformers 5.24 `modeling_bert.py` (`BertAttention`, `BertCrossAttention`,
`BertSelfOutput`; RoBERTa and the others are "Copied from" it) and `modeling_blip_text.py`.
Pre-LN relatives with the same q/k/v names (RoBERTa-PreLayerNorm, Megatron-BERT, ESM,
XLM-RoBERTa-XL) have no `output.LayerNorm` and are not matched; X-MOD's `pre_norm` moves that
LayerNorm before the attention, which is read from the config.

The self-attention sub-blocks (`<layer>.attention`) are returned with role "self", but only when
the checkpoint has cross-attention: a plain BERT encoder is left to the generic layout.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from xattn_doctor.layouts import register
from xattn_doctor.layouts._base import BlockSpec, KeyIndex, ModelConfig, join
from xattn_doctor.layouts._hf_mask import key_mask
from xattn_doctor.layouts.blip2_qformer import block

CROSS = "crossattention"
SELF = "attention"
INNER = "self"
DEFAULT_EPS = 1e-12  # BertConfig and BlipTextConfig layer_norm_eps
RELATIVE = ("relative_key", "relative_key_query")
NOTE_X = ("hidden_states is the query stream entering the crossattention module: this layer's "
          "self-attention sub-block output (post-LayerNorm), not the layer's input.")
NOTE_RELATIVE = ("position_embedding_type {kind}: the original BERT code (and transformers 4) "
                 "adds a learned relative-position term (distance_embedding) to these scores; "
                 "transformers 5 and this rebuild leave it out, so scores differ from the model "
                 "as trained.")
# model_type -> the layer whose call loses the encoder mask (transformers 5.24): it passes the
# mask as `attention_mask`, which the inner attention replaces by its `encoder_attention_mask`
# (never passed) whenever it cross-attends.
MASK_DROPPED = {"blip_text_model": "BlipTextLayer", "big_bird": "BigBirdLayer"}
NOTE_MASK = ("transformers (checked 5.24) drops the encoder mask in this cross-attention: "
             "{layer} passes it as attention_mask, which the inner attention replaces by its "
             "never-passed encoder_attention_mask. The library attends to padded keys; this "
             "rebuild masks the keys the probe marks invalid.")


@register
class BertCrossAttention:
    """BLIP text and BERT-family decoder cross-attention (self-attention as role "self")."""

    name = "bert_crossattention"
    priority = 50

    def match(self, index: KeyIndex, config: ModelConfig) -> list[BlockSpec]:
        """Every `crossattention` module; then, only if there was one, every `attention`."""
        section = _section(config)
        found = [self._block(index, p + CROSS, section, True)
                 for p in index.with_suffix(f"{CROSS}.{INNER}.query.weight")]
        cross = [s for s in found if s is not None]
        if not cross:
            return []
        found = [self._block(index, p + SELF, section, False)
                 for p in index.with_suffix(f"{SELF}.{INNER}.query.weight")]
        return cross + [s for s in found if s is not None]

    def _block(self, index: KeyIndex, module: str, section: ModelConfig,
               cross: bool) -> BlockSpec | None:
        heads = section.get_int("num_attention_heads")
        eps = section.get("layer_norm_eps")
        spec = block(index, module, INNER, heads=heads, layout=self.name, cross=cross,
                     eps=float(eps) if isinstance(eps, (int, float)) and eps > 0 else DEFAULT_EPS)
        if spec is None:
            return None
        model_type = section.data.get("model_type")
        if model_type == "xmod" and section.data.get("pre_norm") is True:  # XmodAttention
            spec = replace(spec, query_norm=spec.post_norm, post_norm=None)
        if not cross:
            return spec
        notes: tuple[str, ...] = (NOTE_X,)
        kind = section.data.get("position_embedding_type")
        if kind in RELATIVE or join(module, f"{INNER}.distance_embedding.weight") in index:
            notes += (NOTE_RELATIVE.format(kind=kind if kind in RELATIVE else "relative"),)
        if isinstance(model_type, str) and model_type in MASK_DROPPED:
            notes += (NOTE_MASK.format(layer=MASK_DROPPED[model_type]),)
        return replace(spec, notes=notes)

    def capture(self, spec: BlockSpec, args: tuple[Any, ...],
                kwargs: dict[str, Any]) -> dict[str, Any] | None:
        """The crossattention module's inputs. BERT and its copies call it positionally,
        `(x, None, encoder_hidden_states, encoder_attention_mask)`; BLIP, RemBERT, RoFormer,
        BigBird pass `attention_mask=<encoder mask>, encoder_hidden_states=...`; BridgeTower
        passes both masks by name (its `attention_mask` is then the text's own)."""
        x = kwargs.get("hidden_states", args[0] if args else None)
        c = kwargs.get("encoder_hidden_states", args[2] if len(args) > 2 else None)
        if x is None or c is None:
            return None
        out = {"hidden_states": x, "encoder_hidden_states": c}
        if "encoder_attention_mask" in kwargs or len(args) > 3:
            given = kwargs.get("encoder_attention_mask", args[3] if len(args) > 3 else None)
        else:
            given = kwargs.get("attention_mask", args[1] if len(args) > 1 else None)
        mask = key_mask(given)
        if mask is not None and tuple(mask.shape) == tuple(c.shape[:2]):
            out["encoder_attention_mask"] = mask
        return out


def _section(config: ModelConfig) -> ModelConfig:
    """The text model's config: BLIP's `text_config`, an encoder-decoder wrapper's `decoder`,
    else the top level (a stand-alone `BertLMHeadModel`)."""
    for name in ("text_config", "decoder"):
        sub = config.section(name)
        if sub:
            return sub
    return config
