"""The uniform block description every layout produces, and the helpers layouts share.

A layout reads only key names, shapes and config.json (never tensor data, never torch), and
describes each cross-attention block it recognises as a `BlockSpec`: which tensors are the
projections, which norms sit where, the gate, the temperature, the head geometry. One rebuilt
module (`xattn_doctor.attention`) runs every `BlockSpec`, whatever family it came from.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field, replace
from typing import Any, Literal, Protocol

# re-exported: every layout imports them from here
from xattn_doctor.layouts._index import KeyIndex as KeyIndex
from xattn_doctor.layouts._index import ModelConfig as ModelConfig

NormKind = Literal["layer", "rms"]
GateFn = Literal["tanh", "sigmoid", "identity"]
Role = Literal["cross", "ambiguous", "self"]
HeadsSource = Literal["config", "weights", "cli", "default"]


@dataclass(frozen=True)
class TensorRef:
    """A tensor of the checkpoint, or rows [start, stop) of it (packed q/k/v projections)."""

    key: str
    rows: tuple[int, int] | None = None


@dataclass(frozen=True)
class Linear:
    """y = x W^T + b, with W of shape [out, in]."""

    weight: TensorRef
    bias: TensorRef | None = None


@dataclass(frozen=True)
class Norm:
    """A LayerNorm or RMSNorm over the last `width` features (affine parts optional)."""

    kind: NormKind
    width: int
    weight: TensorRef | None = None
    bias: TensorRef | None = None
    eps: float = 1e-5
    weight_offset: float = 0.0  # Gemma-style RMSNorm multiplies by (offset + weight)


@dataclass(frozen=True)
class Gate:
    """A scalar or vector gate multiplying the attention output: fn(param) * out."""

    param: TensorRef
    fn: GateFn = "tanh"


@dataclass(frozen=True)
class BlockSpec:
    """Everything needed to rebuild and run one attention block.

    Order of operations (the rebuilt module follows it exactly):
    x_in = query_norm(x) if query_norm else x;  c_in = context_norm(c) if context_norm else c;
    kv_in = cat(c_in, x_in) along the sequence if kv_includes_queries else c_in;
    q = q_proj(x_in), k = k_proj(kv_in), v = v_proj(kv_in), split into heads (GQA: kv_heads;
    value heads v_head_dim wide when set, else head_dim);
    q, k = q_norm(q), k_norm(k) (per head when qk_norm_per_head, else over the full width);
    logits = q k^T * scale / clamp(temperature, temperature_min) (then softcap * tanh(l / softcap));
    out = o_proj(softmax(logits) v);  out = gate_fn(gate) * out;
    y = x + out if residual else out;  y = post_norm(y) if post_norm.
    """

    name: str
    layout: str
    heads: int
    kv_heads: int
    head_dim: int
    query_dim: int
    context_dim: int
    q: Linear
    k: Linear
    v: Linear
    o: Linear | None
    query_norm: Norm | None = None
    context_norm: Norm | None = None
    q_norm: Norm | None = None
    k_norm: Norm | None = None
    qk_norm_per_head: bool = True
    post_norm: Norm | None = None
    gate: Gate | None = None
    temperature: TensorRef | None = None
    temperature_min: float = 0.1
    scale: float | None = None
    softcap: float | None = None
    residual: bool = True
    learned_queries: TensorRef | None = None
    bias_k: TensorRef | None = None
    bias_v: TensorRef | None = None
    v_head_dim: int | None = None
    kv_includes_queries: bool = False
    role: Role = "cross"
    heads_source: HeadsSource = "weights"
    notes: tuple[str, ...] = ()
    extra_keys: tuple[str, ...] = field(default=())
    # Other module paths of this block (fnmatch patterns): a probe captured from the live
    # model under one of them still gives the block its own inputs.
    aliases: tuple[str, ...] = ()

    @property
    def softmax_scale(self) -> float:
        """The factor applied to q.k before the temperature (1/sqrt(head_dim) by default)."""
        return self.scale if self.scale is not None else self.head_dim**-0.5

    def refs(self) -> Iterator[tuple[str, TensorRef]]:
        """Every tensor the block uses, named by its role (e.g. 'q.weight', 'gate')."""
        for role, lin in (("q", self.q), ("k", self.k), ("v", self.v), ("o", self.o)):
            if lin is not None:
                yield f"{role}.weight", lin.weight
                if lin.bias is not None:
                    yield f"{role}.bias", lin.bias
        for role, norm in (
            ("query_norm", self.query_norm),
            ("context_norm", self.context_norm),
            ("q_norm", self.q_norm),
            ("k_norm", self.k_norm),
            ("post_norm", self.post_norm),
        ):
            if norm is not None:
                if norm.weight is not None:
                    yield f"{role}.weight", norm.weight
                if norm.bias is not None:
                    yield f"{role}.bias", norm.bias
        for role, ref in (
            ("gate", self.gate.param if self.gate else None),
            ("temperature", self.temperature),
            ("learned_queries", self.learned_queries),
            ("bias_k", self.bias_k),
            ("bias_v", self.bias_v),
        ):
            if ref is not None:
                yield role, ref

    def keys(self) -> set[str]:
        """The checkpoint keys this block reads."""
        return {ref.key for _, ref in self.refs()} | set(self.extra_keys)

    def shape_problem(self, index: KeyIndex) -> str | None:
        """Why the tensors' shapes in `index` cannot run as this block (None when they can)."""
        from xattn_doctor.layouts._shapes import shape_problem

        return shape_problem(self, index)

    def with_heads(self, heads: int, kv_heads: int, source: HeadsSource) -> BlockSpec:
        """The same block with another head split of the same widths."""
        inner = self.heads * self.head_dim
        v_head_dim = self.kv_heads * self.v_head_dim // kv_heads if self.v_head_dim else None
        return replace(self, heads=heads, kv_heads=kv_heads, head_dim=inner // heads,
                       v_head_dim=v_head_dim, heads_source=source)


class Layout(Protocol):
    """A family of key layouts. Higher `priority` claims contested tensors first."""

    name: str
    priority: int

    def match(self, index: KeyIndex, config: ModelConfig) -> list[BlockSpec]:
        """Every block of this layout found in the checkpoint."""
        ...


class Capturing(Protocol):
    """Optional extra of a layout: pick a block's inputs out of a live forward call.

    `xattn_doctor.capture_probe` hooks the module whose path is the block's name; layouts
    whose module takes its inputs under other names implement this. Returns a dict with
    `hidden_states`, `encoder_hidden_states` and optionally `encoder_attention_mask`
    (True = may be attended to), or None to fall back to the generic guess.
    """

    def capture(self, spec: BlockSpec, args: tuple[Any, ...],
                kwargs: dict[str, Any]) -> dict[str, Any] | None:
        """The block's inputs in this call."""
        ...


CROSS_WORDS = re.compile(
    r"(cross|xattn|x_attn|encoder_attn|attn2|crossattention|enc_dec|context_attn|gated_x)",
    re.IGNORECASE)
SELF_WORDS = re.compile(r"(self_attn|self_attention|selfattention|attn1\b|\.attn1$)",
                        re.IGNORECASE)


def join(prefix: str, name: str) -> str:
    """`prefix` + '.' + `name`, or `name` alone when the prefix is empty."""
    return f"{prefix}.{name}" if prefix else name


def parent(prefix: str) -> str:
    """The module above `prefix` ('' at the root)."""
    return prefix.rsplit(".", 1)[0] if "." in prefix else ""


def linear(index: KeyIndex, module: str) -> Linear | None:
    """The nn.Linear at `module` (a `.weight` of rank 2 with no empty side, optional `.bias`),
    if any: a projection with no rows or no columns has no heads to split."""
    w = join(module, "weight")
    shape = index.shape(w)
    if shape is None or len(shape) != 2 or 0 in shape:
        return None
    b = join(module, "bias")
    return Linear(TensorRef(w), TensorRef(b) if b in index else None)


def norm(index: KeyIndex, module: str, kind: NormKind | None = None,
         eps: float = 1e-5) -> Norm | None:
    """The LayerNorm/RMSNorm at `module` (a rank-1 `.weight`), if any.

    Without a bias it is taken for an RMSNorm unless `kind` says otherwise: a LayerNorm saved
    with `bias=False` cannot be told apart from an RMSNorm by its keys alone.
    """
    w = join(module, "weight")
    shape = index.shape(w)
    if shape is None or len(shape) != 1:
        return None
    b = join(module, "bias")
    has_bias = b in index
    chosen: NormKind = kind or ("layer" if has_bias else "rms")
    return Norm(chosen, shape[0], TensorRef(w), TensorRef(b) if has_bias else None, eps)


def first(index: KeyIndex, module: str, names: Iterable[str],
          kind: NormKind | None = None, eps: float = 1e-5) -> Norm | None:
    """The first norm found among `module`.`name` for `names`."""
    for n in names:
        found = norm(index, join(module, n), kind, eps)
        if found is not None:
            return found
    return None


def common_prefix(keys: Iterable[str]) -> str:
    """The longest module path (whole dotted components) shared by all `keys`."""
    parts = [k.split(".")[:-1] for k in keys]
    if not parts:
        return ""
    out: list[str] = []
    for group in zip(*parts):
        if all(g == group[0] for g in group):
            out.append(group[0])
        else:
            break
    return ".".join(out)


def classify(name: str, query_dim: int, context_dim: int) -> Role:
    """Cross when the widths differ or the name says so; self when the name says so."""
    if query_dim != context_dim or CROSS_WORDS.search(name):
        return "cross"
    if SELF_WORDS.search(name):
        return "self"
    return "ambiguous"


DEFAULT_HEAD_DIM = 64


def default_heads(inner: int) -> int:
    """The documented fallback: 64-wide heads when the width allows, else 8, 4, 2 or 1 heads."""
    if inner % DEFAULT_HEAD_DIM == 0:
        return inner // DEFAULT_HEAD_DIM
    for h in (8, 4, 2):
        if inner % h == 0:
            return h
    return 1


def resolve_heads(inner: int, *, per_head_width: int | None = None,
                  config_heads: int | None = None) -> tuple[int, HeadsSource]:
    """Head count from a per-head norm's width, else config.json, else the default."""
    if per_head_width and inner % per_head_width == 0 and per_head_width < inner:
        return inner // per_head_width, "weights"
    if config_heads and inner % config_heads == 0:
        return config_heads, "config"
    return default_heads(inner), "default"
