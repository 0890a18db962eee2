"""The rebuilt block's extensions for Perceiver-style blocks: keys/values that include the
queries (Flamingo's resampler) and value heads of their own width (HF Perceiver's v_channels)."""

from __future__ import annotations

import torch

from xattn_doctor.attention import RebuiltBlock, key_mask
from xattn_doctor.layouts import _override_heads
from xattn_doctor.layouts._base import BlockSpec, Linear, Norm, TensorRef


def _spec(**kw: object) -> BlockSpec:
    base: dict[str, object] = {
        "name": "b", "layout": "t", "heads": 2, "kv_heads": 2, "head_dim": 4, "query_dim": 8,
        "context_dim": 8, "q": Linear(TensorRef("q")), "k": Linear(TensorRef("k")),
        "v": Linear(TensorRef("v")), "o": Linear(TensorRef("o"))}
    base.update(kw)
    return BlockSpec(**base)  # type: ignore[arg-type]


def test_kv_includes_queries_matches_manual_attention() -> None:
    torch.manual_seed(0)
    t = {"q.weight": torch.randn(8, 8), "k.weight": torch.randn(8, 8),
         "v.weight": torch.randn(8, 8), "o.weight": torch.randn(8, 8),
         "query_norm.weight": torch.rand(8) + 0.5}
    spec = _spec(kv_includes_queries=True, query_norm=Norm("layer", 8, TensorRef("n")))
    blk = RebuiltBlock(spec, t)
    x, c = torch.randn(2, 3, 8), torch.randn(2, 5, 8)
    mask = torch.ones(2, 5, dtype=torch.bool)
    mask[1, 3:] = False
    xn = torch.nn.functional.layer_norm(x, (8,), t["query_norm.weight"])
    kv = torch.cat([c, xn], dim=1)
    q = (xn @ t["q.weight"].T).unflatten(-1, (2, 4)).transpose(1, 2)
    k = (kv @ t["k.weight"].T).unflatten(-1, (2, 4)).transpose(1, 2)
    v = (kv @ t["v.weight"].T).unflatten(-1, (2, 4)).transpose(1, 2)
    valid = torch.cat([mask, torch.ones(2, 3, dtype=torch.bool)], dim=1)
    logits = (q @ k.transpose(-1, -2) / 2.0).masked_fill(~valid[:, None, None], float("-inf"))
    want = x + (logits.softmax(-1) @ v).transpose(1, 2).flatten(-2) @ t["o.weight"].T
    assert torch.allclose(blk(x, c, mask), want, atol=1e-5)
    assert key_mask(mask, 8, spec).tolist() == valid.tolist()  # type: ignore[union-attr]


def test_value_heads_of_their_own_width() -> None:
    torch.manual_seed(0)
    t = {"q.weight": torch.randn(8, 6), "k.weight": torch.randn(8, 5),
         "v.weight": torch.randn(12, 5), "o.weight": torch.randn(6, 12)}
    spec = _spec(query_dim=6, context_dim=5, v_head_dim=6)
    blk = RebuiltBlock(spec, t)
    x, c = torch.randn(1, 3, 6), torch.randn(1, 4, 5)
    _, k, v = blk.project(*blk.inputs(x, c))
    assert v.shape == (1, 2, 4, 6) and k.shape == (1, 2, 4, 4)
    assert blk(x, c).shape == (1, 3, 6)
    one = _override_heads(spec, 1)
    assert (one.heads, one.head_dim, one.v_head_dim) == (1, 8, 12)
    assert spec.with_heads(4, 4, "cli").v_head_dim == 3


def test_spectral_bound_covers_keys_from_the_queries() -> None:
    from xattn_doctor.spectral import bound

    torch.manual_seed(1)
    t = {"q.weight": torch.randn(8, 8), "k.weight": torch.randn(8, 8),
         "v.weight": torch.randn(8, 8), "o.weight": torch.randn(8, 8),
         "query_norm.weight": torch.full((8,), 10.0), "context_norm.weight": torch.full((8,), 0.1)}
    spec = _spec(kv_includes_queries=True, query_norm=Norm("layer", 8, TensorRef("n")),
                 context_norm=Norm("layer", 8, TensorRef("c")))
    blk = RebuiltBlock(spec, t)
    x_in, c_in = blk.inputs(torch.randn(2, 6, 8), torch.randn(2, 5, 8))
    with torch.no_grad():
        q, k, _ = blk.project(x_in, c_in)
        observed = float(blk.logits(q, k).max())
    assert bound(blk, x_in, c_in).max_logit >= observed
