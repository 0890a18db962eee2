"""diffusers joint attention (MMDiT: SD3, Flux, ...): claimed as not-cross-attention.

An `Attention` with `add_q_proj`/`add_k_proj`/`add_v_proj` beside `to_q`/`to_k`/`to_v`
projects the image and the text streams separately and attends over their concatenation: one
joint sequence, not a query stream reading a context. `BlockSpec` cannot express that, and
diagnosing its image half as plain attention would mislead, so the module is reported as
self-attention (left out) instead of being left to the generic layout.
"""

from __future__ import annotations

from dataclasses import replace

from xattn_doctor.layouts import register
from xattn_doctor.layouts._base import (
    BlockSpec,
    KeyIndex,
    ModelConfig,
    common_prefix,
    join,
    linear,
)

# Transformers whose every `attn` is joint, including single-stream blocks without add_*_proj.
MMDIT_CLASSES = {"SD3Transformer2DModel", "FluxTransformer2DModel", "ChromaTransformer2DModel",
                 "HunyuanVideoTransformer3DModel"}
NOTE = ("Joint (MMDiT) attention over concatenated image and text tokens, with separate "
        "add_q/add_k/add_v projections for the text stream; not cross-attention.")


@register
class DiffusersJoint:
    """`Attention` modules with added q/k/v projections (joint attention)."""

    name = "diffusers_joint"
    priority = 54

    def match(self, index: KeyIndex, config: ModelConfig) -> list[BlockSpec]:
        """Every joint-attention module, as role 'self'."""
        joint_model = config.get("_class_name") in MMDIT_CLASSES
        modules = {p.rstrip(".") for p in index.with_suffix("add_q_proj.weight")}
        if joint_model:
            modules |= {join(p.rstrip("."), "attn") for p in index.with_suffix("attn.to_q.weight")}
        found = (self._module(index, m, not joint_model) for m in sorted(modules))
        return [spec for spec in found if spec is not None]

    def _module(self, index: KeyIndex, module: str, need_added: bool) -> BlockSpec | None:
        q, k, v = (linear(index, join(module, f"to_{r}")) for r in "qkv")
        extra = [linear(index, join(module, f"add_{r}_proj")) for r in "qkv"]
        if q is None or k is None or v is None or (need_added and None in extra):
            return None
        inner, width = index.shape(q.weight.key) or (0, 0)
        if not inner:
            return None
        spec = BlockSpec(
            name="", layout=self.name, heads=1, kv_heads=1, head_dim=inner, query_dim=width,
            context_dim=width, q=q, k=k, v=v, o=linear(index, join(module, "to_out.0")),
            role="self", notes=(NOTE,),
            extra_keys=tuple(e.weight.key for e in extra if e is not None),
        )
        return replace(spec, name=common_prefix(spec.keys()))
