"""What sits around a plain attention module in its layer: pre-norms, post-norm, gate, temperature.

Only explicit names count. A layer also holds its self-attention and MLP norms, so a bare
`norm1` beside `cross_attn` says nothing about which stream it normalises; the names below do.
Inside the attention module itself, a norm is a qk-norm (applied after the projections).
"""

from __future__ import annotations

from dataclasses import dataclass

from xattn_doctor.layouts._base import (
    Gate,
    KeyIndex,
    Norm,
    TensorRef,
    first,
    join,
    parent,
)

QUERY_PRE = ("query_norm", "norm_query", "q_pre_norm", "ln_query", "norm_q_in", "x_norm",
             "norm_x", "text_norm")
CONTEXT_PRE = ("key_norm", "context_norm", "norm_context", "kv_norm", "norm_kv", "ln_kv",
               "norm_cross", "encoder_norm", "media_norm", "norm_media", "visual_norm",
               "c_norm", "norm_c", "ln_context")
POST = ("post_norm", "norm_post", "post_ln", "ln_post", "norm_out", "out_norm",
        "residual_norm", "post_layernorm")
QK_Q = ("q_norm", "norm_q", "q_layernorm", "query_layernorm", "q_ln", "ln_q")
QK_K = ("k_norm", "norm_k", "k_layernorm", "key_layernorm", "k_ln", "ln_k")
GATES = ("gate", "attn_gate", "gate_attn", "cross_attn_gate", "xattn_gate", "alpha",
         "alpha_attn", "alpha_xattn", "alpha_cross_attn")
TEMPERATURES = ("temperature", "temp", "tau", "attn_temperature")


@dataclass(frozen=True)
class Surroundings:
    """The parts found around (and inside) an attention module."""

    layer: str
    query_norm: Norm | None
    context_norm: Norm | None
    post_norm: Norm | None
    q_norm: Norm | None
    k_norm: Norm | None
    gate: Gate | None
    temperature: TensorRef | None

    @property
    def has_layer_parts(self) -> bool:
        """True when the layer around the module contributes anything."""
        return any((self.query_norm, self.context_norm, self.post_norm, self.gate,
                    self.temperature))


def surroundings(index: KeyIndex, module: str, query_dim: int, context_dim: int) -> Surroundings:
    """Collect the named parts of `module`'s layer and its own qk-norms."""
    layer = parent(module)
    own = module.rsplit(".", 1)[-1]
    q_names = QUERY_PRE + (f"{own}_norm", f"norm_{own}", f"{own}_layer_norm", f"{own}_ln")
    query_norm = _at(index, module, layer, q_names, query_dim)
    context_norm = _at(index, module, layer, CONTEXT_PRE, context_dim)
    post_norm = _at(index, module, layer, POST, query_dim, inside=False)
    return Surroundings(
        layer=layer,
        query_norm=query_norm,
        context_norm=context_norm,
        post_norm=post_norm,
        q_norm=first(index, module, QK_Q),
        k_norm=first(index, module, QK_K),
        gate=_gate(index, module, layer, query_dim),
        temperature=_scalar(index, module, layer, TEMPERATURES),
    )


def _at(index: KeyIndex, module: str, layer: str, names: tuple[str, ...], width: int,
        inside: bool = True) -> Norm | None:
    """A norm of the right width, by name, in the layer (or, for pre-norms, in the module)."""
    places = [layer] if module else []
    if inside:
        places.append(module)
    for place in places:
        found = first(index, place, names)
        if found is not None and found.width == width:
            return found
        broken = _misshapen(index, place, names, width)
        if broken is not None:
            return broken
    return None


def _misshapen(index: KeyIndex, place: str, names: tuple[str, ...], width: int) -> Norm | None:
    """A norm under one of `names` whose weight is not a vector: kept, at the width it should
    have, so the block's shape check refuses the file instead of dropping the norm."""
    for n in names:
        key = join(join(place, n), "weight")
        shape = index.shape(key)
        if shape is not None and len(shape) != 1:
            return Norm("layer", width, TensorRef(key))
    return None


def _gate(index: KeyIndex, module: str, layer: str, width: int) -> Gate | None:
    for place in ([layer] if module else []) + [module]:
        for n in GATES:
            key = join(place, n)
            shape = index.shape(key)
            if shape is not None and (shape == () or shape[-1] in (1, width)) and \
                    len(shape) <= 3:
                return Gate(TensorRef(key), "tanh")
    return None


def _scalar(index: KeyIndex, module: str, layer: str, names: tuple[str, ...]) -> TensorRef | None:
    for place in ([layer] if module else []) + [module]:
        for n in names:
            key = join(place, n)
            shape = index.shape(key)
            if shape is not None and all(d == 1 for d in shape):
                return TensorRef(key)
    return None
