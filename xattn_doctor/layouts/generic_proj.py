"""Attention modules with separate projections under the usual names (to_q/to_k/to_v/to_out,
q_proj/k_proj/v_proj/o_proj, query/key/value, packed to_kv), with qk-norms inside the module
and named pre-norms, post-norm, gate and temperature around it. The lowest-priority layout:
every family layout claims its blocks first."""

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
    linear,
    resolve_heads,
)
from xattn_doctor.layouts._surround import surroundings
from xattn_doctor.layouts.torch_mha import HEAD_KEYS

Q_NAMES = ("to_q", "q_proj", "query", "wq", "q_lin", "q")
K_NAMES = ("to_k", "k_proj", "key", "wk", "k_lin", "k")
V_NAMES = ("to_v", "v_proj", "value", "wv", "v_lin", "v")
KV_NAMES = ("to_kv", "kv_proj", "wkv", "kv")
O_NAMES = ("to_out.0", "to_out", "o_proj", "out_proj", "wo", "out_lin", "out", "o", "proj")


@register
class GenericProjections:
    """Any module holding q, k and v linears under common names."""

    name = "generic"
    priority = 0

    def match(self, index: KeyIndex, config: ModelConfig) -> list[BlockSpec]:
        """Every module with a q linear and matching k/v (or packed kv) linears."""
        found: dict[str, BlockSpec] = {}
        for qn in Q_NAMES:
            for prefix in index.with_suffix(f"{qn}.weight"):
                module = prefix.rstrip(".")
                if module in found:
                    continue
                spec = self._block(index, config, module, qn)
                if spec is not None:
                    found[module] = spec
        return list(found.values())

    def _block(self, index: KeyIndex, config: ModelConfig, module: str,
               qn: str) -> BlockSpec | None:
        base = module
        q = linear(index, join(base, qn))
        kv = self._kv(index, base)
        if q is None or kv is None:
            return None
        k, v = kv
        q_shape, k_shape = index.shape(q.weight.key), self._shape(index, k)
        assert q_shape is not None
        inner, query_dim = q_shape
        kv_inner, context_dim = k_shape
        out = next((o for o in (linear(index, join(base, n)) for n in O_NAMES) if o is not None
                    and (index.shape(o.weight.key) or (0, 0))[1] == inner), None)
        around = surroundings(index, base, query_dim, context_dim)
        per_head = around.q_norm.width if around.q_norm is not None else None
        heads, source = resolve_heads(inner, per_head_width=per_head,
                                      config_heads=config.get_int(*HEAD_KEYS))
        head_dim = inner // heads
        if kv_inner % head_dim or heads % max(kv_inner // head_dim, 1):
            return None
        spec = BlockSpec(
            name="", layout=self.name, heads=heads, kv_heads=kv_inner // head_dim,
            head_dim=head_dim, query_dim=query_dim, context_dim=context_dim, q=q, k=k, v=v,
            o=out, query_norm=around.query_norm, context_norm=around.context_norm,
            q_norm=around.q_norm, k_norm=around.k_norm,
            qk_norm_per_head=per_head is not None and per_head == head_dim != inner,
            post_norm=around.post_norm, gate=around.gate, temperature=around.temperature,
            residual=around.has_layer_parts and out is not None
            and (index.shape(out.weight.key) or (0,))[0] == query_dim,
            heads_source=source,
        )
        name = common_prefix(spec.keys())
        return replace(spec, name=name, role=classify(base or name, query_dim, context_dim))

    @staticmethod
    def _shape(index: KeyIndex, lin: Linear) -> tuple[int, int]:
        shape = index.shape(lin.weight.key)
        assert shape is not None
        if lin.weight.rows is not None:
            return lin.weight.rows[1] - lin.weight.rows[0], shape[1]
        return shape[0], shape[1]

    @staticmethod
    def _kv(index: KeyIndex, base: str) -> tuple[Linear, Linear] | None:
        for kn, vn in zip(K_NAMES, V_NAMES):
            k, v = linear(index, join(base, kn)), linear(index, join(base, vn))
            if k is not None and v is not None:
                if index.shape(k.weight.key)[1] != index.shape(v.weight.key)[1]:  # type: ignore[index]
                    return None
                return k, v
        for n in KV_NAMES:
            kv = linear(index, join(base, n))
            if kv is not None:
                rows = (index.shape(kv.weight.key) or (0,))[0]
                if rows % 2:
                    return None
                h = rows // 2
                b = kv.bias.key if kv.bias else None
                return (Linear(TensorRef(kv.weight.key, (0, h)), TensorRef(b, (0, h)) if b else None),
                        Linear(TensorRef(kv.weight.key, (h, rows)),
                               TensorRef(b, (h, rows)) if b else None))
        return None
