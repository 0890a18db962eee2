"""Blocks written in Phil Wang's (lucidrains) style, shared by the Flamingo and Perceiver layouts:
a packed `to_kv` (rows [0, inner) are the keys, [inner, 2 inner) the values, as `chunk(2, -1)`
splits its output), `to_q`, `to_out`, `dim_head ** -0.5` scaling, LayerNorm pre-norms.

`gated_xattn` reads a Flamingo `GatedCrossAttentionBlock` (flamingo-pytorch, OpenFlamingo);
`resampler_attention` a Flamingo `PerceiverAttention` (the Perceiver resampler, whose keys and
values are computed from the media *and* the normed latents).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

from xattn_doctor.layouts._base import (
    BlockSpec,
    Gate,
    HeadsSource,
    KeyIndex,
    Linear,
    ModelConfig,
    TensorRef,
    default_heads,
    join,
    linear,
    norm,
    parent,
)

HeadsFn = Callable[[int], tuple[int, HeadsSource]]

GATED_NOTES = (
    ("Flamingo GatedCrossAttentionBlock: y = x + tanh(attn_gate) * attn(norm(x), media); the "
     "feed-forward half that follows (ff, gated by tanh(ff_gate)) is not rebuilt."),
    ("Media-location masking is per text token (each token sees the media before it; with "
     "only_attend_immediate_media, only the latest one). The probe's encoder_attention_mask is "
     "one mask per media token for all queries, i.e. only_attend_immediate_media=False with all "
     "media before the text; with several media per sample the measured entropy can be higher "
     "than in training (more keys visible)."),
)
LATER_LAYER_NOTE = (
    "Its queries are the latents as updated by the layers before it (the learned latents "
    "drive only the first layer); without a captured probe they are synthetic.")
RESAMPLER_NOTES = (
    ("Perceiver resampler attention: keys and values come from cat(norm_media(media), "
     "norm_latents(latents)); y = latents + attn (the residual is added by the resampler loop)."),
)


def config_heads(config: ModelConfig, heads_keys: tuple[str, ...],
                 dim_keys: tuple[str, ...]) -> HeadsFn:
    """Heads from config.json `heads_keys`, else inner // a `dim_keys` width (the model's
    constructor arguments saved as config.json), else the library's 64-wide heads."""
    heads = config.get_int(*heads_keys)
    dim_head = config.get_int(*dim_keys)

    def resolve(inner: int) -> tuple[int, HeadsSource]:
        if heads and inner % heads == 0:
            return heads, "config"
        if dim_head and inner % dim_head == 0:
            return inner // dim_head, "config"
        return default_heads(inner), "default"

    return resolve


def first_layer(module: str) -> bool:
    """Whether `module` is the first of a `layers.N` stack (or not in one): only there are the
    model's learned latents the block's actual queries."""
    layer = re.search(r"(?:^|\.)layers\.(\d+)(?:\.|$)", module)
    return layer is None or layer.group(1) == "0"


def packed_kv(index: KeyIndex, module: str) -> tuple[Linear, Linear, int] | None:
    """The key and value halves of a packed `to_kv` linear, and its input width."""
    lin = linear(index, module)
    shape = index.shape(lin.weight.key) if lin is not None else None
    if lin is None or shape is None or shape[0] % 2:
        return None
    inner = shape[0] // 2
    bias = lin.bias.key if lin.bias is not None else None
    halves = [(0, inner), (inner, 2 * inner)]
    k, v = (Linear(TensorRef(lin.weight.key, r), TensorRef(bias, r) if bias else None)
            for r in halves)
    return k, v, shape[1]


def latents_above(index: KeyIndex, module: str, width: int) -> TensorRef | None:
    """The nearest `latents` parameter ([n, width] or [1, n, width]) in `module`'s ancestors."""
    place = parent(module)
    while True:
        key = join(place, "latents")
        shape = index.shape(key)
        if shape is not None and shape[-1] == width and (
                len(shape) == 2 or len(shape) == 3 and shape[0] == 1):
            return TensorRef(key)
        if not place:
            return None
        place = parent(place)


def gated_xattn(index: KeyIndex, module: str, layout: str, heads: HeadsFn) -> BlockSpec | None:
    """The GatedCrossAttentionBlock at `module` (`attn.{norm,to_q,to_kv,to_out}`, `attn_gate`)."""
    attn = join(module, "attn")
    gate_key = join(module, "attn_gate")
    q, o = linear(index, join(attn, "to_q")), linear(index, join(attn, "to_out"))
    kv = packed_kv(index, join(attn, "to_kv"))
    x_norm = norm(index, join(attn, "norm"), "layer")
    gate_shape = index.shape(gate_key)
    if q is None or o is None or kv is None or x_norm is None or gate_shape is None:
        return None
    k, v, context_dim = kv
    inner, query_dim = index.shape(q.weight.key) or (0, 0)
    if k.weight.rows != (0, inner) or x_norm.width != query_dim:
        return None
    n_heads, source = heads(inner)
    ff_gate = join(module, "ff_gate")
    return BlockSpec(
        name=module, layout=layout, heads=n_heads, kv_heads=n_heads, head_dim=inner // n_heads,
        query_dim=query_dim, context_dim=context_dim, q=q, k=k, v=v, o=o, query_norm=x_norm,
        gate=Gate(TensorRef(gate_key), "tanh"), residual=True, role="cross",
        heads_source=source, notes=GATED_NOTES,
        extra_keys=(ff_gate,) if ff_gate in index else (),
    )


def resampler_attention(index: KeyIndex, module: str, layout: str,
                        heads: HeadsFn) -> BlockSpec | None:
    """The resampler's PerceiverAttention at `module` (`norm_media`, `norm_latents`, `to_q`,
    `to_kv`, `to_out`), with the resampler's `latents` as its learned queries."""
    q, o = linear(index, join(module, "to_q")), linear(index, join(module, "to_out"))
    kv = packed_kv(index, join(module, "to_kv"))
    media = norm(index, join(module, "norm_media"), "layer")
    lat = norm(index, join(module, "norm_latents"), "layer")
    if q is None or o is None or kv is None or media is None or lat is None:
        return None
    k, v, context_dim = kv
    inner, dim = index.shape(q.weight.key) or (0, 0)
    if k.weight.rows != (0, inner) or not media.width == lat.width == dim == context_dim:
        return None
    n_heads, source = heads(inner)
    first = first_layer(module)
    return BlockSpec(
        name=module, layout=layout, heads=n_heads, kv_heads=n_heads, head_dim=inner // n_heads,
        query_dim=dim, context_dim=dim, q=q, k=k, v=v, o=o, query_norm=lat, context_norm=media,
        residual=True, learned_queries=latents_above(index, module, dim) if first else None,
        kv_includes_queries=True, role="cross", heads_source=source,
        notes=RESAMPLER_NOTES + (() if first else (LATER_LAYER_NOTE,)),
    )


def gated_modules(index: KeyIndex) -> list[str]:
    """Every module holding `attn.to_q`, `attn.to_kv` and `attn_gate` (candidate gated blocks)."""
    return [p.rstrip(".") for p in index.with_suffix("attn.to_kv.weight")
            if join(p.rstrip("."), "attn_gate") in index]


def resampler_modules(index: KeyIndex) -> list[str]:
    """Every module holding `norm_media`, `norm_latents` and a packed `to_kv`."""
    return [p.rstrip(".") for p in index.with_suffix("norm_latents.weight")
            if join(p.rstrip("."), "norm_media.weight") in index
            and join(p.rstrip("."), "to_kv.weight") in index]


def _arg(args: tuple[Any, ...], kwargs: dict[str, Any], i: int, name: str) -> Any:
    return args[i] if len(args) > i else kwargs.get(name)


def capture_gated(args: tuple[Any, ...], kwargs: dict[str, Any]) -> dict[str, Any] | None:
    """GatedCrossAttentionBlock.forward(x, media, media_locations): media [B, T, n, D] is
    flattened to [B, T*n, D]; media locations are not kept (see GATED_NOTES)."""
    x, media = _arg(args, kwargs, 0, "x"), _arg(args, kwargs, 1, "media")
    if x is None or media is None:
        return None
    if media.dim() == 4:
        media = media.flatten(1, 2)
    return {"hidden_states": x, "encoder_hidden_states": media}


def capture_resampler(args: tuple[Any, ...], kwargs: dict[str, Any]) -> dict[str, Any] | None:
    """PerceiverAttention.forward(x=media, latents): [b, T, n, D] each, with the media index T
    folded into the batch (each media item is resampled on its own)."""
    media, latents = _arg(args, kwargs, 0, "x"), _arg(args, kwargs, 1, "latents")
    if media is None or latents is None:
        return None
    return {"hidden_states": latents.reshape(-1, *latents.shape[-2:]),
            "encoder_hidden_states": media.reshape(-1, *media.shape[-2:])}
