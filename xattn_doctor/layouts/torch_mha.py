"""`nn.MultiheadAttention` (packed `in_proj_weight`, or `q/k/v_proj_weight` when kdim differs),
alone or inside a layer with named pre-norms, post-norm, gate and temperature (the seed
playbook's `StableCrossAttentionLayer`)."""

from __future__ import annotations

from dataclasses import replace

from xattn_doctor.layouts import register
from xattn_doctor.layouts._base import (
    BlockSpec,
    KeyIndex,
    Linear,
    ModelConfig,
    TensorRef,
    classify,
    common_prefix,
    join,
    resolve_heads,
)
from xattn_doctor.layouts._surround import surroundings

# decoder_attention_heads: encoder-decoder models (BART, Whisper, ...), whose cross-attention
# is in the decoder
HEAD_KEYS = ("cross_attention_heads", "num_cross_attention_heads", "decoder_attention_heads",
             "num_attention_heads",
             "num_heads", "n_heads", "n_head", "nhead", "heads")


@register
class TorchMHA:
    """torch.nn.MultiheadAttention state dicts."""

    name = "torch_mha"
    priority = 10

    def match(self, index: KeyIndex, config: ModelConfig) -> list[BlockSpec]:
        """Every MHA module, packed or with separate q/k/v weights."""
        found = []
        for prefix in index.with_suffix("in_proj_weight") + index.with_suffix("q_proj_weight"):
            spec = self._block(index, config, prefix.rstrip("."))
            if spec is not None:
                found.append(spec)
        return found

    def _block(self, index: KeyIndex, config: ModelConfig, module: str) -> BlockSpec | None:
        out_key = join(module, "out_proj.weight")
        if out_key not in index:
            return None
        out_bias = join(module, "out_proj.bias")
        out = Linear(TensorRef(out_key), TensorRef(out_bias) if out_bias in index else None)
        e = self._embed_dim(index, module)
        if not e:
            return None
        projs = self._projections(index, module, e)
        if projs is None:
            return None
        q, k, v, kdim = projs
        around = surroundings(index, module, e, kdim)
        heads, source = resolve_heads(e, config_heads=config.get_int(*HEAD_KEYS))
        bias_k, bias_v = join(module, "bias_k"), join(module, "bias_v")
        spec = BlockSpec(
            name="", layout=self.name, heads=heads, kv_heads=heads, head_dim=e // heads,
            query_dim=e, context_dim=kdim, q=q, k=k, v=v, o=out,
            query_norm=around.query_norm, context_norm=around.context_norm,
            post_norm=around.post_norm, gate=around.gate, temperature=around.temperature,
            residual=around.has_layer_parts,
            bias_k=TensorRef(bias_k) if bias_k in index else None,
            bias_v=TensorRef(bias_v) if bias_v in index else None,
            role=classify(module, e, kdim), heads_source=source,
        )
        name = common_prefix(spec.keys())
        return replace(spec, name=name, role=classify(module or name, e, kdim))

    @staticmethod
    def _embed_dim(index: KeyIndex, module: str) -> int:
        """The embed width, from the q projection (an out_proj of the wrong shape is then
        refused by the shape check, not taken for another width)."""
        packed = index.shape(join(module, "in_proj_weight"))
        if packed is not None:
            return packed[0] // 3 if len(packed) == 2 and packed[0] % 3 == 0 else 0
        q = index.shape(join(module, "q_proj_weight"))
        return q[0] if q is not None and len(q) == 2 else 0

    @staticmethod
    def _projections(index: KeyIndex, module: str,
                     e: int) -> tuple[Linear, Linear, Linear, int] | None:
        bias_key = join(module, "in_proj_bias")
        bias = bias_key if bias_key in index else None

        def rows(i: int) -> TensorRef | None:
            return TensorRef(bias, (i * e, (i + 1) * e)) if bias else None

        packed = join(module, "in_proj_weight")
        shape = index.shape(packed)
        if shape is not None:
            if len(shape) != 2 or shape[0] != 3 * e:
                return None
            return (Linear(TensorRef(packed, (0, e)), rows(0)),
                    Linear(TensorRef(packed, (e, 2 * e)), rows(1)),
                    Linear(TensorRef(packed, (2 * e, 3 * e)), rows(2)), shape[1])
        keys = [join(module, f"{r}_proj_weight") for r in "qkv"]
        shapes = [index.shape(k) for k in keys]
        if any(s is None or len(s) != 2 or s[0] != e for s in shapes):
            return None
        kdim = shapes[1][1]  # type: ignore[index]
        if shapes[2][1] != kdim:  # type: ignore[index]
            return None  # separate key and value streams: not one context to probe with
        return (Linear(TensorRef(keys[0]), rows(0)), Linear(TensorRef(keys[1]), rows(1)),
                Linear(TensorRef(keys[2]), rows(2)), kdim)
