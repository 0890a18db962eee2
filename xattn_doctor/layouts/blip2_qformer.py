"""The BLIP-2 / InstructBLIP Q-Former (transformers `Blip2QFormerModel`, `InstructBlipQFormerModel`,
`InstructBlipVideoQFormerModel`, and every model that holds one under `qformer.`).

Every `cross_attention_frequency`-th Q-Former layer has a `crossattention` sub-block, a post-LN
BERT attention: `y = LayerNorm(x + dense(attn(query(x), key(c), value(c))))`, saved as
`<layer>.crossattention.attention.{query,key,value}`, `<layer>.crossattention.output.dense` and
`<layer>.crossattention.output.LayerNorm`. The block is that `crossattention` module:

- `hidden_states` (x) is what enters it: the query-token part of the layer's self-attention
  sub-block output (already post-LayerNormed), of the Q-Former's width. It is not the raw
  `query_tokens`; those are only the layer-0 self-attention's input, after `qformer.layernorm`.
- `encoder_hidden_states` (c) are the vision encoder's features (`encoder_hidden_size` wide).

The learned `query_tokens` [1, num_query_tokens, hidden] are offered as `learned_queries` for a
probe without Q-Former-wide queries: a stand-in that skips the embedding LayerNorm and the
self-attention (and, past layer 0, the earlier layers). The self-attention sub-blocks
(`<layer>.attention`) are returned with role "self" so that no generic layout reports them.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from xattn_doctor.layouts import register
from xattn_doctor.layouts._base import (
    BlockSpec,
    KeyIndex,
    Linear,
    ModelConfig,
    Norm,
    TensorRef,
    join,
    linear,
    norm,
    parent,
    resolve_heads,
)
from xattn_doctor.layouts._hf_mask import key_mask

CROSS = "crossattention"
SELF = "attention"
DEFAULT_EPS = 1e-12  # Blip2QFormerConfig / InstructBlipQFormerConfig layer_norm_eps
QUERY_TOKENS = "query_tokens"
NOTE_X = ("hidden_states is the query stream entering the crossattention module: the query-token "
          "part of this layer's self-attention sub-block output (post-LayerNorm), not the raw "
          "query_tokens.")
NOTE_LEARNED = ("learned_queries are the raw query_tokens: a stand-in for the true queries, "
                "which pass qformer.layernorm and the self-attention (and earlier layers) first; "
                "capture a probe for exact inputs.")


@register
class Blip2QFormer:
    """Q-Former cross-attention (and self-attention, as role "self") of BLIP-2 and InstructBLIP."""

    name = "blip2_qformer"
    priority = 60

    def match(self, index: KeyIndex, config: ModelConfig) -> list[BlockSpec]:
        """Every `crossattention` and `attention` sub-block of a Q-Former layer."""
        settings = _QFormerSettings.read(config)
        found: list[BlockSpec] = []
        for role, own in (("cross", CROSS), ("self", SELF)):
            prefixes = sorted(index.with_suffix(f"{own}.attention.query.weight"), key=_natural)
            for prefix in prefixes:
                spec = _block(index, prefix + own, settings, role == "cross", self.name)
                if spec is not None:
                    found.append(_first_takes_queries(spec, found))
        return found

    def capture(self, spec: BlockSpec, args: tuple[Any, ...],
                kwargs: dict[str, Any]) -> dict[str, Any] | None:
        """The crossattention module's inputs (hidden_states may come positionally)."""
        x = kwargs.get("hidden_states", args[0] if args else None)
        c = kwargs.get("encoder_hidden_states", args[2] if len(args) > 2 else None)
        if x is None or c is None:
            return None
        out = {"hidden_states": x, "encoder_hidden_states": c}
        mask = key_mask(kwargs.get("encoder_attention_mask",
                                   args[3] if len(args) > 3 else None))
        if mask is not None:
            out["encoder_attention_mask"] = mask
        return out


class _QFormerSettings:
    """Head count, LayerNorm eps and model name from config.json."""

    def __init__(self, heads: int | None, eps: float, model: str) -> None:
        self.heads, self.eps, self.model = heads, eps, model

    @classmethod
    def read(cls, config: ModelConfig) -> _QFormerSettings:
        """From `qformer_config`, or from the top level of a stand-alone Q-Former's config."""
        section = config.section("qformer_config")
        data = section.data if section else config.data
        heads = data.get("num_attention_heads")
        eps = data.get("layer_norm_eps")
        model = str(config.data.get("model_type") or "")
        return cls(heads if isinstance(heads, int) and heads > 0 else None,
                   float(eps) if isinstance(eps, (int, float)) and eps > 0 else DEFAULT_EPS,
                   model)


def _block(index: KeyIndex, module: str, settings: _QFormerSettings, cross: bool,
           layout: str) -> BlockSpec | None:
    """The sub-block at `module` (`<layer>.crossattention` or `<layer>.attention`)."""
    spec = block(index, module, "attention", heads=settings.heads, eps=settings.eps,
                 layout=layout, cross=cross)
    if spec is None or not cross:
        return spec
    learned = _query_tokens(index, module, spec.query_dim)
    notes = (NOTE_X,) + ((NOTE_LEARNED,) if learned is not None else ())
    if settings.model.startswith("instructblip"):
        notes += (("InstructBLIP Q-Former: the instruction tokens only self-attend; the "
                   "cross-attention sees the query tokens alone."),)
    return replace(spec, learned_queries=learned, notes=notes)


def block(index: KeyIndex, module: str, inner: str, *, heads: int | None, eps: float,
          layout: str, cross: bool) -> BlockSpec | None:
    """The post-LN BERT attention sub-block at `module`, y = LayerNorm(x + dense(attn)):
    q/k/v under `module.inner` ("attention" in the Q-Former, "self" in BERT and BLIP text),
    `module.output.dense` and `module.output.LayerNorm`. Shared with `bert_crossattention`."""
    found = parts(index, module, inner)
    if found is None:
        return None
    q, k, v, o, post = found
    width, query_dim = _shape(index, q)
    context_dim = _shape(index, k)[1]
    count, source = resolve_heads(width, config_heads=heads)
    return BlockSpec(
        name=module, layout=layout, heads=count, kv_heads=count, head_dim=width // count,
        query_dim=query_dim, context_dim=context_dim, q=q, k=k, v=v, o=o,
        post_norm=Norm("layer", post.width, post.weight, post.bias, eps),
        residual=True, role="cross" if cross else "self", heads_source=source,
    )


def parts(index: KeyIndex, module: str,
          inner: str) -> tuple[Linear, Linear, Linear, Linear, Norm] | None:
    """query, key, value (under `module.inner`), output.dense and output.LayerNorm, when their
    shapes agree."""
    attn = join(module, inner)
    q, k, v = (linear(index, join(attn, n)) for n in ("query", "key", "value"))
    o = linear(index, join(module, "output.dense"))
    post = norm(index, join(module, "output.LayerNorm"), kind="layer")
    if q is None or k is None or v is None or o is None or post is None:
        return None
    width, query_dim = _shape(index, q)
    if _shape(index, k)[0] != width or _shape(index, v) != _shape(index, k):
        return None
    if _shape(index, o) != (query_dim, width) or post.width != query_dim:
        return None
    return q, k, v, o, post


def _first_takes_queries(spec: BlockSpec, earlier: list[BlockSpec]) -> BlockSpec:
    """Only the first block keeps a shared `query_tokens`: `detect` drops blocks whose keys
    another block already claimed, and past the first layer the raw tokens say even less."""
    ref = spec.learned_queries
    if ref is None or not any(e.learned_queries == ref for e in earlier):
        return spec
    return replace(spec, learned_queries=None,
                   notes=tuple(n for n in spec.notes if n != NOTE_LEARNED))


def _natural(name: str) -> list[tuple[int, int, str]]:
    """Sort key that puts layer.10 after layer.9."""
    return [(0, int(p), "") if p.isdigit() else (1, 0, p) for p in name.split(".")]


def _shape(index: KeyIndex, lin: Linear) -> tuple[int, int]:
    shape = index.shape(lin.weight.key) or (0, 0)
    return shape[0], shape[1]


def _query_tokens(index: KeyIndex, module: str, width: int) -> TensorRef | None:
    """The nearest `query_tokens` [1, n, width] (or [n, width]) above `module`."""
    place = parent(module)
    while True:
        key = join(place, QUERY_TOKENS)
        shape = index.shape(key)
        if shape is not None and 2 <= len(shape) <= 3 and shape[-1] == width \
                and all(d == 1 for d in shape[:-2]):
            return TensorRef(key)
        if not place:
            return None
        place = parent(place)
