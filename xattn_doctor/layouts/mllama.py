"""Llama 3.2 Vision (transformers `MllamaForConditionalGeneration`, `MllamaForCausalLM`).

Each layer listed in `text_config.cross_attention_layers` is a
`MllamaCrossAttentionDecoderLayer`:

    y = x + tanh(cross_attn_attn_gate) * o_proj(attn(q_norm(q_proj(input_layernorm(x))),
                                                     k_norm(k_proj(c)), v_proj(c)))

with RMSNorm pre-norm of the query stream (`input_layernorm`, full width), per-head RMSNorm
`q_norm`/`k_norm` (width head_dim), grouped-query attention, softmax scale 1/sqrt(head_dim),
and no norm on the context (the vision features arrive already projected to the text width
by `multi_modal_projector`). The layer's MLP has its own gate, `cross_attn_mlp_gate`.

transformers 5 saves `MllamaForConditionalGeneration` under the legacy prefixes
(`language_model.model.layers.N...`, `vision_model...`) while the live module is
`model.language_model.layers.N`; the block is found by its own keys, whatever the prefix.
"""

from __future__ import annotations

from typing import Any

from xattn_doctor.layouts import register
from xattn_doctor.layouts._base import (
    BlockSpec,
    Gate,
    HeadsSource,
    KeyIndex,
    Linear,
    ModelConfig,
    Norm,
    TensorRef,
    join,
    linear,
    norm,
    resolve_heads,
)

GATE = "cross_attn_attn_gate"
MLP_GATE = "cross_attn_mlp_gate"
DEFAULT_EPS = 1e-5  # MllamaTextConfig.rms_norm_eps
MLP_NOTE = ("The layer's MLP is gated separately by tanh(cross_attn_mlp_gate); it is not part "
            "of this block's output.")
MASK_NOTE = ("Llama 3.2 Vision masks per text token (cross_attention_mask [B, Lq, images, "
             "tiles]); a probe mask is per key. Text rows that may see no image get uniform "
             "attention from the library and a zeroed MLP output.")
NOTES = (MLP_NOTE, MASK_NOTE)


@register
class Mllama:
    """`MllamaCrossAttentionDecoderLayer` (tanh-gated, qk-normed, GQA cross-attention)."""

    name = "mllama"
    priority = 60

    def match(self, index: KeyIndex, config: ModelConfig) -> list[BlockSpec]:
        """Every layer holding `cross_attn_attn_gate` beside a `cross_attn` module."""
        found = []
        for prefix in index.with_suffix(GATE):
            spec = self._block(index, config, prefix.rstrip("."))
            if spec is not None:
                found.append(spec)
        return found

    def _block(self, index: KeyIndex, config: ModelConfig, layer: str) -> BlockSpec | None:
        attn = join(layer, "cross_attn")
        projs = [linear(index, join(attn, f"{r}_proj")) for r in "qkvo"]
        if any(p is None for p in projs):
            return None
        q, k, v, o = projs
        assert q is not None and k is not None and v is not None
        inner, query_dim = _shape(index, q)
        kv_inner, context_dim = _shape(index, k)
        eps = _eps(config)
        q_norm = norm(index, join(attn, "q_norm"), "rms", eps)
        k_norm = norm(index, join(attn, "k_norm"), "rms", eps)
        heads, source = _heads(config, inner, q_norm)
        head_dim = inner // heads
        if kv_inner % head_dim or heads % (kv_inner // head_dim):
            return None
        mlp_gate = join(layer, MLP_GATE)
        return BlockSpec(
            name=layer, layout=self.name, heads=heads, kv_heads=kv_inner // head_dim,
            head_dim=head_dim, query_dim=query_dim, context_dim=context_dim, q=q, k=k, v=v,
            o=o, query_norm=norm(index, join(layer, "input_layernorm"), "rms", eps),
            q_norm=q_norm, k_norm=k_norm, qk_norm_per_head=True,
            gate=Gate(TensorRef(join(layer, GATE)), "tanh"), residual=True,
            role="cross", heads_source=source, notes=NOTES,
            extra_keys=(mlp_gate,) if mlp_gate in index else (),
        )

    def capture(self, spec: BlockSpec, args: tuple[Any, ...],
                kwargs: dict[str, Any]) -> dict[str, Any] | None:
        """The decoder layer's input, its `cross_attention_states` and a per-key mask."""
        x = kwargs.get("hidden_states", args[0] if args else None)
        c = kwargs.get("cross_attention_states", args[1] if len(args) > 1 else None)
        if x is None or c is None:
            return None
        out: dict[str, Any] = {"hidden_states": x, "encoder_hidden_states": c}
        mask = key_mask(kwargs.get("cross_attention_mask"),
                        kwargs.get("full_text_row_masked_out_mask"))
        if mask is not None:
            out["encoder_attention_mask"] = mask
        return out


def key_mask(additive: Any, rows: Any) -> Any:
    """[B, Lk] bool: keys that some text row with an image may attend to (all, where none).

    `additive` is the library's [B, 1, Lq, Lk] mask (0 or the dtype's min; rows that see no
    image already zeroed), `rows` its [B, 1, Lq, 1] row mask (1 where a row sees an image).
    """
    if additive is None or getattr(additive, "dim", lambda: 0)() != 4:
        return None
    import torch

    allowed = additive[:, 0] > torch.finfo(additive.dtype).min / 2  # [B, Lq, Lk]
    if rows is not None:
        live = rows[:, 0, :, 0].bool()  # [B, Lq]
        allowed = allowed & live[:, :, None]
        allowed = allowed | ~live.any(-1)[:, None, None]
    return allowed.any(1)


def _shape(index: KeyIndex, lin: Linear) -> tuple[int, int]:
    shape = index.shape(lin.weight.key)
    assert shape is not None
    return shape[0], shape[1]


def _eps(config: ModelConfig) -> float:
    eps = config.section("text_config").get("rms_norm_eps") or config.get("rms_norm_eps")
    return float(eps) if isinstance(eps, (int, float)) and eps > 0 else DEFAULT_EPS


def _heads(config: ModelConfig, inner: int, q_norm: Norm | None) -> tuple[int, HeadsSource]:
    """config.json's text heads when they agree with the per-head q-norm, else the norm."""
    text = config.section("text_config")
    configured = text.get_int("num_attention_heads") or config.get_int("num_attention_heads")
    if configured and inner % configured == 0 and (
            q_norm is None or q_norm.width == inner // configured):
        return configured, "config"
    return resolve_heads(inner, per_head_width=q_norm.width if q_norm else None)
