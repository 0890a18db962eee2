"""Decoder cross-attention of transformers' encoder-decoder models.

The generic layout mis-rebuilds these: it takes BART's `encoder_attn_layer_norm` for a pre-norm
(BART normalises after the residual) and scales T5's scores by 1/sqrt(d) (T5 does not).

BART style, `...layers.N.encoder_attn.{q,k,v,out}_proj` beside `encoder_attn_layer_norm`
(a LayerNorm, eps 1e-5 unless noted): whether that norm comes before the attention or after the
residual differs between models with the same keys, so it is read from `model_type` (checked in
each model's `modeling_*.py`, transformers 5.24); scale 1/sqrt(head_dim).

    post: y = LN(x + attn(x, c))        pre: y = x + attn(LN(x), c)

An unlisted model_type keeps the generic reading (a pre-norm) and says so in the block's notes.

T5 style, `...layer.1.EncDecAttention.{q,k,v,o}` with the sub-layer's `layer_norm`, and
Pix2Struct's `...encoder_decoder_attention.attention.{query,key,value,output}` with
`encoder_decoder_attention.layer_norm`: y = x + o(attn(RMS(x), c)), the RMS norm without mean
or bias (eps `layer_norm_epsilon`), scores q.k unscaled, no position bias in cross-attention.
"""

from __future__ import annotations

from collections.abc import Collection
from typing import Any, Literal

from xattn_doctor.layouts import register
from xattn_doctor.layouts._base import (
    BlockSpec,
    KeyIndex,
    Linear,
    ModelConfig,
    Norm,
    NormKind,
    TensorRef,
    join,
    linear,
    norm,
    parent,
    resolve_heads,
)
from xattn_doctor.layouts._hf_mask import key_mask

Place = Literal["pre", "post"]
# model_type -> where encoder_attn_layer_norm sits (file: models/<type>/modeling_<type>.py)
NORM_PLACE: dict[str, Place] = {
    **dict.fromkeys(("bart", "blenderbot-small", "marian", "plbart", "mvp", "trocr", "fsmt",
                     "led", "speecht5", "informer", "time_series_transformer"), "post"),
    **dict.fromkeys(("mbart", "pegasus", "pegasus_x", "bigbird_pegasus", "blenderbot",
                     "m2m_100", "speech_to_text", "whisper", "musicgen_decoder", "xglm",
                     "pp_formulanet_text"), "pre"),
}
EPS_FROM_CONFIG = ("speecht5",)  # LayerNorm(eps=config.layer_norm_eps); others: the default
LAYER_EPS = 1e-5
T5_TYPES = ("t5", "mt5", "umt5", "longt5", "switch_transformers", "pop2piano", "udop",
            "pix2struct_text_model")
T5_EPS = 1e-6  # T5Config.layer_norm_epsilon
BART_HEADS = ("decoder_attention_heads", "attention_heads", "num_attention_heads")
T5_HEADS = ("num_heads", "num_attention_heads")
# attention module (its parent, the sub-layer, holds `layer_norm`) and its q/k/v/o names
T5_SHAPES = (("EncDecAttention", ("q", "k", "v", "o")),
             ("encoder_decoder_attention.attention", ("query", "key", "value", "output")))
NOT_SOFTMAX = {"autoformer": "Autoformer's encoder_attn is auto-correlation (period discovery and "
               "time-delay aggregation), not softmax attention: this rebuild does not describe it."}
MVP_NOTE = ("MVP's cross-attention prompts (use_prompt: learned keys and values prepended to "
            "the encoder's) are left out.")


@register
class HFSeq2Seq:
    """BART-, T5- and Pix2Struct-style decoder cross-attention, named by the attention module."""

    name = "hf_seq2seq"
    priority = 20

    def match(self, index: KeyIndex, config: ModelConfig) -> list[BlockSpec]:
        """Every `encoder_attn`, `EncDecAttention` and Pix2Struct cross-attention module."""
        found = [self._bart(index, config, p + "encoder_attn")
                 for p in index.with_suffix("encoder_attn.q_proj.weight")]
        for module, names in T5_SHAPES:
            found += [self._t5(index, config, p + module, names)
                      for p in index.with_suffix(f"{module}.{names[0]}.weight")]
        return [s for s in found if s is not None]

    def _bart(self, index: KeyIndex, config: ModelConfig, attn: str) -> BlockSpec | None:
        model_type, section = _model_type(config, NORM_PLACE)
        place = NORM_PLACE.get(model_type or "")
        eps = section.get("layer_norm_eps") if model_type in EPS_FROM_CONFIG else None
        ln = _norm(index, join(parent(attn), "encoder_attn_layer_norm"), "layer",
                  float(eps) if isinstance(eps, (int, float)) else LAYER_EPS)
        notes: tuple[str, ...] = ()
        if place is None and ln is not None:
            notes = (f"model_type {model_type or '(none)'} is not among the encoder-decoder "
                     "models checked: whether encoder_attn_layer_norm comes before the attention "
                     "or after the residual is unknown; read as a pre-norm.",)
        if model_type in NOT_SOFTMAX:
            notes += (NOT_SOFTMAX[model_type],)
        if model_type == "mvp" and section.get("use_prompt"):
            notes += (MVP_NOTE,)
        heads = section.get_int(*BART_HEADS) or config.get_int(*BART_HEADS)
        return _spec(self.name, index, attn, ("q_proj", "k_proj", "v_proj", "out_proj"), heads,
                     ln if place != "post" else None, ln if place == "post" else None, None,
                     notes)

    def _t5(self, index: KeyIndex, config: ModelConfig, attn: str,
            names: tuple[str, ...]) -> BlockSpec | None:
        model_type, section = _model_type(config, T5_TYPES)
        eps = section.get("layer_norm_epsilon") or config.get("layer_norm_epsilon")
        ln = _norm(index, join(parent(attn), "layer_norm"), "rms",
                  float(eps) if isinstance(eps, (int, float)) else T5_EPS)
        notes: tuple[str, ...] = ()
        if model_type not in T5_TYPES:
            notes = (f"model_type {model_type or '(none)'} is not among the T5-style models "
                     "checked; read as T5 (RMS pre-norm, unscaled q.k).",)
        heads = section.get_int(*T5_HEADS) or config.get_int(*T5_HEADS)
        return _spec(self.name, index, attn, names, heads, ln, None, 1.0, notes)

    def capture_modules(self, spec: BlockSpec) -> tuple[str, ...]:
        """Saved-key paths to hook. T5 and Pix2Struct: the sub-layer (it takes the raw query
        stream and the encoder output). BART style: the attention module, and for a pre-norm
        also the norm, whose input is the query stream (the module's is already normalised)."""
        if not spec.name.endswith("encoder_attn"):
            return (parent(spec.name),)
        if spec.query_norm is None:
            return (spec.name,)
        return (join(parent(spec.name), "encoder_attn_layer_norm"), spec.name)

    def capture(self, spec: BlockSpec, args: tuple[Any, ...],
                kwargs: dict[str, Any]) -> dict[str, Any] | None:
        """The query stream, encoder output and key mask one hooked call saw."""
        if "query" in kwargs and "key" in kwargs:  # FSMT: time-major, key_padding_mask = pad
            pad = kwargs.get("key_padding_mask")
            out = {"hidden_states": kwargs["query"].transpose(0, 1),
                   "encoder_hidden_states": kwargs["key"].transpose(0, 1)}
            if pad is not None and getattr(pad, "dim", lambda: 0)() == 2:
                out["encoder_attention_mask"] = ~pad.bool()
            return out
        x = kwargs.get("hidden_states", args[0] if args else None)
        c = kwargs.get("key_value_states", args[1] if len(args) > 1 else None)
        if c is None:  # the pre-norm's call
            return {"hidden_states": x} if x is not None else None
        out = {"encoder_hidden_states": c}
        if x is not None and (spec.query_norm is None or not spec.name.endswith("encoder_attn")):
            out["hidden_states"] = x
        mask = key_mask(kwargs.get("attention_mask"))
        if mask is not None and tuple(mask.shape) == tuple(c.shape[:2]):
            out["encoder_attention_mask"] = mask
        return out


def _model_type(config: ModelConfig,
                known: Collection[str]) -> tuple[str | None, ModelConfig]:
    """The first model_type found in `known` (top level, then the decoder and text configs of
    wrappers such as VisionEncoderDecoder or Florence-2) and its config section; else the
    top-level model_type (or None) and the whole config."""
    sections = (config, config.section("decoder"), config.section("text_config"))
    types = [s.data.get("model_type") for s in sections]
    for model_type, section in zip(types, sections):
        if isinstance(model_type, str) and model_type in known:
            return model_type, section
    first = next((t for t in types if isinstance(t, str)), None)
    return first, config


def _spec(layout: str, index: KeyIndex, attn: str, names: tuple[str, ...], heads: int | None,
          query_norm: Norm | None, post_norm: Norm | None, scale: float | None,
          notes: tuple[str, ...]) -> BlockSpec | None:
    """The block at `attn` with q/k/v/o linears `names` (None without all four, or without a
    head split); other misfits (v, o, a norm's width) are left to the block's shape check."""
    lins = [linear(index, join(attn, n)) for n in names]
    q, k, v, o = lins
    if q is None or k is None or v is None or o is None:
        return None
    inner, query_dim = _shape(index, q)
    kv_inner, context_dim = _shape(index, k)
    if inner < 1 or kv_inner < 1:
        return None
    count, source = resolve_heads(inner, config_heads=heads)
    head_dim = inner // count
    if kv_inner % head_dim or count % max(kv_inner // head_dim, 1):
        return None
    return BlockSpec(
        name=attn, layout=layout, heads=count, kv_heads=kv_inner // head_dim, head_dim=head_dim,
        query_dim=query_dim, context_dim=context_dim, q=q, k=k, v=v, o=o, query_norm=query_norm,
        post_norm=post_norm, scale=scale, residual=True, role="cross", heads_source=source,
        notes=notes)


def _norm(index: KeyIndex, module: str, kind: NormKind, eps: float) -> Norm | None:
    """The norm at `module`; one whose weight is not a vector is kept (width unknown: 0) so
    that the shape check refuses the file rather than the block running without it."""
    found = norm(index, module, kind, eps)
    key = join(module, "weight")
    if found is None and key in index:
        return Norm(kind, 0, TensorRef(key), eps=eps)
    return found


def _shape(index: KeyIndex, lin: Linear) -> tuple[int, int]:
    shape = index.shape(lin.weight.key)
    assert shape is not None
    return shape[0], shape[1]
