"""Every metric against an independent computation: torch's own nn.MultiheadAttention built from
the same weights (attention weights, output, autograd), a direct einsum for logits, a full SVD
for the spectral bound, and the direct softmax for the chunked statistics."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from xattn_doctor.attention import RebuiltBlock
from xattn_doctor.layouts import KeyIndex, ModelConfig, detect
from xattn_doctor.measure import RunSettings, measure
from xattn_doctor.probe import BlockInputs
from xattn_doctor.spectral import top_singular
from xattn_doctor.stats import attention_stats

TOL = 1e-4


def build(mha: nn.Module, prefix: str = "x.cross_attn", heads: int = 4) -> RebuiltBlock:
    """Detect the MHA in its state dict and rebuild it (float32)."""
    sd = {f"{prefix}.{k}": v.detach().clone() for k, v in mha.state_dict().items()}
    found = detect(KeyIndex({k: tuple(v.shape) for k, v in sd.items()}),
                   ModelConfig({"num_attention_heads": heads}))
    assert len(found.blocks) == 1
    spec = found.blocks[0]
    tensors = {}
    for role, ref in spec.refs():
        t = sd[ref.key]
        tensors[role] = t[ref.rows[0]:ref.rows[1]] if ref.rows else t
    return RebuiltBlock(spec, tensors)


def reference(mha: nn.MultiheadAttention, x: torch.Tensor, c: torch.Tensor,
              mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """torch's own output and per-head weights [B, H, Lq, Lk]."""
    mha.eval()
    return mha(x, c, c, key_padding_mask=None if mask is None else ~mask, need_weights=True,
               average_attn_weights=False)


def ref_entropy(w: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Per-head entropy averaged over (batch, query): [H]."""
    ent = -(torch.where(w > 0, w * w.log(), torch.zeros_like(w))).sum(-1)  # [B,H,Lq]
    return ent.mean(dim=(0, 2))


@pytest.fixture(params=[(None, False), (24, False), (None, True)], ids=["packed", "kdim", "bias_kv"])
def case(request: pytest.FixtureRequest):  # type: ignore[no-untyped-def]
    """An MHA (packed, separate-kdim, add_bias_kv), inputs and a key mask."""
    kdim, bias_kv = request.param
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(32, 4, batch_first=True, kdim=kdim, vdim=kdim,
                                add_bias_kv=bias_kv)
    with torch.no_grad():
        for p in mha.parameters():
            p.mul_(3.0)  # sharper attention than init, so the metrics are not trivial
    x = torch.randn(2, 6, 32)
    c = torch.randn(2, 10, kdim or 32)
    mask = torch.ones(2, 10, dtype=torch.bool)
    mask[1, 7:] = False
    return mha, x, c, mask


def metrics_of(block: RebuiltBlock, x, c, mask, budget: int = 256 * 2**20):  # type: ignore[no-untyped-def]
    inputs = BlockInputs(x, c, mask, "probe", "probe")
    return measure(block, inputs, RunSettings(torch.device("cpu"), torch.float32, budget, 0))


def test_output_and_weights_match_torch(case) -> None:  # type: ignore[no-untyped-def]
    mha, x, c, mask = case
    block = build(mha)
    out, weights = reference(mha, x, c, mask)
    assert torch.allclose(block(x, c, mask), out, atol=TOL)
    x_in, c_in = block.inputs(x, c)
    q, k, _ = block.project(x_in, c_in)
    from xattn_doctor.attention import key_mask

    valid = key_mask(mask, k.shape[-2], block.spec)
    probs = block.logits(q, k).masked_fill(~valid[:, None, None, :], -math.inf).softmax(-1)
    assert torch.allclose(probs, weights, atol=TOL)


def test_entropy_and_max_weight_match_torch(case) -> None:  # type: ignore[no-untyped-def]
    mha, x, c, mask = case
    m = metrics_of(build(mha), x, c, mask)
    _, w = reference(mha, x, c, mask)
    w = w.detach()
    ent = ref_entropy(w, mask)
    assert m.head_entropy == pytest.approx(ent.tolist(), abs=TOL)
    assert m.entropy_mean == pytest.approx(float(ent.mean()), abs=TOL)
    assert m.entropy_min_head == pytest.approx(float(ent.min()), abs=TOL)
    assert m.max_attention_weight == pytest.approx(float(w.max()), abs=TOL)
    assert m.saturated_query_share == pytest.approx(float((w.max(-1).values > 0.99).float().mean()),
                                                    abs=TOL)
    n_valid = mask.sum(-1).float() + (1 if mha.bias_k is not None else 0)
    per = -(torch.where(w > 0, w * w.log(), torch.zeros_like(w))).sum(-1) / n_valid.log()[:, None, None]
    assert m.entropy_norm_mean == pytest.approx(float(per.mean(dim=(0, 2)).mean()), abs=TOL)


def test_masked_keys_take_no_attention(case) -> None:  # type: ignore[no-untyped-def]
    mha, x, c, mask = case
    block = build(mha)
    m = metrics_of(block, x, c, mask)
    c2 = c.clone()
    c2[1, 7:] = 1e3  # whatever sits under the mask must not matter
    m2 = metrics_of(block, x, c2, mask)
    assert m.head_entropy == pytest.approx(m2.head_entropy, abs=TOL)
    assert m.max_logit == pytest.approx(m2.max_logit, abs=TOL)


def test_max_logit_matches_einsum(case) -> None:  # type: ignore[no-untyped-def]
    mha, x, c, mask = case
    block = build(mha)
    m = metrics_of(block, x, c, mask)
    e, h = 32, 4
    d = e // h
    w, b = mha.in_proj_weight, mha.in_proj_bias
    if w is None:
        wq, wk = mha.q_proj_weight, mha.k_proj_weight
    else:
        wq, wk = w[:e], w[e:2 * e]
    q = torch.einsum("bld,ed->ble", x, wq) + b[:e]
    k = torch.einsum("bld,ed->ble", c, wk) + b[e:2 * e]
    if mha.bias_k is not None:
        k = torch.cat([k, mha.bias_k.expand(2, 1, e)], 1)
        mask = torch.cat([mask, torch.ones(2, 1, dtype=torch.bool)], 1)
    logits = torch.einsum("bqhd,bkhd->bhqk", q.view(2, -1, h, d), k.view(2, -1, h, d)) / math.sqrt(d)
    expected = logits.masked_fill(~mask[:, None, None, :], -math.inf).max()
    assert m.max_logit == pytest.approx(float(expected.detach()), abs=TOL)


def test_grad_norms_match_autograd_on_torch(case) -> None:  # type: ignore[no-untyped-def]
    mha, x, c, mask = case
    block = build(mha)
    m = metrics_of(block, x, c, mask)
    mha.zero_grad()
    xr, cr = x.clone().requires_grad_(True), c.clone().requires_grad_(True)
    out, _ = mha(xr, cr, cr, key_padding_mask=~mask, need_weights=False)
    gen = torch.Generator().manual_seed(0)
    cot = torch.randn(out.shape, generator=gen)
    ((out * cot).sum() / (out.shape[0] * out.shape[1])).backward()
    total = math.sqrt(sum(float(p.grad.norm()) ** 2 for p in mha.parameters() if p.grad is not None))
    assert m.grad_norm == pytest.approx(total, rel=TOL)
    assert m.grad_norms["o.weight"] == pytest.approx(float(mha.out_proj.weight.grad.norm()), rel=TOL)
    assert m.input_grad_norms["hidden_states"] == pytest.approx(float(xr.grad.norm()), rel=TOL)
    assert m.input_grad_norms["encoder_hidden_states"] == pytest.approx(float(cr.grad.norm()), rel=TOL)


def test_chunked_stats_equal_direct() -> None:
    torch.manual_seed(1)
    q = torch.randn(2, 3, 37, 8) * 3
    k = torch.randn(2, 3, 53, 8) * 3
    valid = torch.rand(2, 53) > 0.2
    logits = lambda a, b: a @ b.transpose(-1, -2)
    full = attention_stats(q, k, logits, valid, budget=1 << 30)
    tiny = attention_stats(q, k, logits, valid, budget=1)  # one query per chunk
    from xattn_doctor import stats

    old = stats.chunk_sizes
    stats.chunk_sizes = lambda b, h, lq, lk, budget: (5, 7)  # force key chunks too
    try:
        chunked = attention_stats(q, k, logits, valid)
    finally:
        stats.chunk_sizes = old
    lg = logits(q, k).masked_fill(~valid[:, None, None, :], -math.inf)
    p = lg.softmax(-1)
    ent = -(torch.where(p > 0, p * p.log(), torch.zeros_like(p))).sum(-1).mean(dim=(0, 2))
    for s in (full, tiny, chunked):
        assert s.head_entropy == pytest.approx(ent.tolist(), abs=1e-5)
        assert s.max_weight == pytest.approx(float(p.max()), abs=1e-5)
        assert s.max_logit == pytest.approx(float(lg.max()), abs=1e-5)
        assert s.saturated_share == pytest.approx(full.saturated_share, abs=1e-9)
        assert s.top_key_share == pytest.approx(full.top_key_share, abs=1e-9)


def test_top_key_share_counts_the_shared_favourite() -> None:
    q = torch.ones(1, 1, 10, 4)
    k = torch.zeros(1, 1, 6, 4)
    k[0, 0, 2] = 5.0  # every query's top key is key 2
    s = attention_stats(q, k, lambda a, b: a @ b.transpose(-1, -2), None)
    assert s.top_key_share == 1.0 and s.top_key_index == 2


def test_spectral_power_iteration_matches_svd() -> None:
    torch.manual_seed(2)
    wq = torch.randn(3, 8, 33, dtype=torch.float64)
    wk = torch.randn(3, 8, 21, dtype=torch.float64)
    got = top_singular(wq, wk)
    want = torch.linalg.matrix_norm(wq.transpose(-1, -2) @ wk, ord=2)
    assert torch.allclose(got, want, rtol=1e-6)


def test_spectral_bound_bounds_every_observed_logit(case) -> None:  # type: ignore[no-untyped-def]
    mha, x, c, mask = case
    m = metrics_of(build(mha), x * 5, c * 5, mask)
    assert m.spectral_max_logit >= m.max_logit - 1e-6


def test_gqa_and_per_head_qk_norm_against_einsum() -> None:
    """A q_proj/k_proj block with 4 query heads, 2 kv heads and per-head RMS qk-norm."""
    torch.manual_seed(3)
    d, h, kvh, hd = 32, 4, 2, 8
    sd = {"l.cross_attn.q_proj.weight": torch.randn(h * hd, d) * 0.3,
          "l.cross_attn.k_proj.weight": torch.randn(kvh * hd, 20) * 0.3,
          "l.cross_attn.v_proj.weight": torch.randn(kvh * hd, 20) * 0.3,
          "l.cross_attn.o_proj.weight": torch.randn(d, h * hd) * 0.3,
          "l.cross_attn.q_norm.weight": torch.rand(hd) + 0.5,
          "l.cross_attn.k_norm.weight": torch.rand(hd) + 0.5}
    found = detect(KeyIndex({k: tuple(v.shape) for k, v in sd.items()}), ModelConfig())
    spec = found.blocks[0]
    assert (spec.heads, spec.kv_heads, spec.head_dim, spec.heads_source) == (h, kvh, hd, "weights")
    block = RebuiltBlock(spec, {r: sd[ref.key] for r, ref in spec.refs()})
    x, c = torch.randn(2, 5, d), torch.randn(2, 9, 20)
    m = metrics_of(block, x, c, None)

    def rms(t, w):  # type: ignore[no-untyped-def]
        return t * torch.rsqrt(t.pow(2).mean(-1, keepdim=True) + 1e-5) * w

    q = rms((x @ sd["l.cross_attn.q_proj.weight"].T).view(2, 5, h, hd), sd["l.cross_attn.q_norm.weight"])
    k = rms((c @ sd["l.cross_attn.k_proj.weight"].T).view(2, 9, kvh, hd), sd["l.cross_attn.k_norm.weight"])
    k = k.repeat_interleave(h // kvh, dim=2)
    logits = torch.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(hd)
    p = logits.softmax(-1)
    ent = -(p * p.log()).sum(-1).mean(dim=(0, 2))
    assert m.max_logit == pytest.approx(float(logits.max()), abs=TOL)
    assert m.head_entropy == pytest.approx(ent.tolist(), abs=TOL)
    assert m.spectral_max_logit >= m.max_logit


def test_learned_queries_get_gradients() -> None:
    torch.manual_seed(4)
    sd = {"p.latents": torch.randn(7, 16), "p.attn.to_q.weight": torch.randn(16, 16),
          "p.attn.to_kv.weight": torch.randn(32, 12), "p.attn.to_out.weight": torch.randn(16, 16)}
    from dataclasses import replace

    from xattn_doctor.layouts._base import TensorRef

    spec = detect(KeyIndex({k: tuple(v.shape) for k, v in sd.items()}),
                  ModelConfig({"num_heads": 2})).blocks[0]
    spec = replace(spec, learned_queries=TensorRef("p.latents"))
    block = RebuiltBlock(spec, {r: sd[ref.key] if not ref.rows else sd[ref.key][ref.rows[0]:ref.rows[1]]
                                for r, ref in spec.refs()})
    from xattn_doctor.probe import synthetic

    inputs = synthetic(0).inputs_for(spec, block.p("learned_queries"))
    assert inputs.x_source == "learned" and inputs.x.shape == (2, 7, 16)
    m = measure(block, inputs, RunSettings(torch.device("cpu"), torch.float32))
    assert m.grad_norms["learned_queries"] > 0


def test_prefetch_yields_every_block_in_order_with_its_tensors() -> None:
    from pathlib import Path

    from xattn_doctor.checkpoint import open_checkpoint
    from xattn_doctor.prefetch import blocks_with_tensors

    ckpt = open_checkpoint(Path(__file__).resolve().parent.parent / "fixtures" / "stack6")
    specs = detect(ckpt.index, ckpt.config).blocks
    for ahead in (False, True):
        got = list(blocks_with_tensors(ckpt, specs, ahead))
        assert [s.name for s, _ in got] == [s.name for s in specs]
        for spec, tensors in got:
            assert set(tensors) == {role for role, _ in spec.refs()}


def test_subsampled_backward_matches_autograd_on_those_queries(case) -> None:  # type: ignore[no-untyped-def]
    """A budget too small for every query: the backward runs on a seeded subsample, and its
    gradients are torch's for the proxy loss over exactly those queries."""
    mha, x, c, mask = case
    block = build(mha)
    m = metrics_of(block, x, c, mask, budget=2 * 4 * 11 * 4 * 8 * 3)  # 3 of 6 queries fit
    assert m.backward_queries == 3
    gen = torch.Generator().manual_seed(0)
    idx = torch.randperm(x.shape[1], generator=gen)[:3].sort().values
    mha.zero_grad()
    xr, cr = x.clone().requires_grad_(True), c.clone().requires_grad_(True)
    out, _ = mha(xr[:, idx], cr, cr, key_padding_mask=~mask, need_weights=False)
    cot = torch.randn(out.shape, generator=gen)
    ((out * cot).sum() / (out.shape[0] * out.shape[1])).backward()
    total = math.sqrt(sum(float(p.grad.norm()) ** 2 for p in mha.parameters() if p.grad is not None))
    assert m.grad_norm == pytest.approx(total, rel=TOL)
    assert m.input_grad_norms["hidden_states"] == pytest.approx(float(xr.grad.norm()), rel=TOL)
    assert m.input_grad_norms["encoder_hidden_states"] == pytest.approx(float(cr.grad.norm()), rel=TOL)
    full = metrics_of(build(mha), x, c, mask)  # the statistics still see every query
    assert m.entropy_mean == pytest.approx(full.entropy_mean, abs=1e-6)
    assert m.max_logit == pytest.approx(full.max_logit, abs=1e-6)


@pytest.mark.parametrize("values", [
    [1.0, -2.0, 3.0],
    [1.0, math.nan, 3.0],
    [math.inf, -math.inf, 0.0],
    [math.inf, 1.0, math.nan],
    [3e38, 3e38, 3e38],  # finite, but their sum overflows: the exact count decides
], ids=["clean", "nan", "both_infs", "inf_nan", "sum_overflows"])
def test_nonfinite_and_absmax_fast_paths_equal_elementwise(values: list[float]) -> None:
    from xattn_doctor.measure import _absmax, _nonfinite

    for dtype in (torch.float32, torch.float64, torch.bfloat16):
        t = torch.tensor(values, dtype=torch.float64).to(dtype).reshape(1, -1)
        assert _nonfinite(t) == int((~torch.isfinite(t)).sum())
        finite = t[torch.isfinite(t)].double().abs()
        assert _absmax(t) == (float(finite.max()) if finite.numel() else 0.0)
    assert _nonfinite(torch.tensor([1, 2])) == 0


def test_chunked_stats_skip_and_count_nonfinite_logits() -> None:
    """A NaN and an inf logit: counted, and the statistics are those of the finite valid
    logits, chunked or not (the cheap all-finite path must not see them)."""
    torch.manual_seed(3)
    lg = torch.randn(1, 2, 9, 13) * 4
    lg[0, 0, 2, 5] = math.nan
    lg[0, 1, 7, 11] = math.inf
    valid = torch.ones(1, 13, dtype=torch.bool)
    valid[0, 12] = False
    keys = torch.arange(13.0).reshape(1, 1, 13, 1).expand(1, 2, 13, 1)  # "keys" = columns
    logits = lambda a, b: a[..., b[0, 0, :, 0].long()]  # a chunk's logits are lg's columns
    from xattn_doctor import stats

    good = torch.isfinite(lg) & valid[:, None, None, :]
    p = lg.masked_fill(~good, -math.inf).softmax(-1)
    ent = -(torch.where(p > 0, p * p.log(), torch.zeros_like(p))).sum(-1).mean(dim=(0, 2))
    old = stats.chunk_sizes
    for sizes in (None, (4, 5)):
        if sizes:
            stats.chunk_sizes = lambda b, h, lq, lk, budget, s=sizes: s
        try:
            s = attention_stats(lg, keys, logits, valid)
        finally:
            stats.chunk_sizes = old
        assert s.nonfinite_logits == 2
        assert s.head_entropy == pytest.approx(ent.tolist(), abs=1e-5)
        assert s.max_logit == pytest.approx(float(lg[good].max()), abs=1e-6)
        assert s.max_weight == pytest.approx(float(p.max()), abs=1e-6)


def test_probe_finds_per_block_keys_under_an_alias_only_when_unambiguous() -> None:
    from dataclasses import replace

    from xattn_doctor.probe import Probe

    sd = {"a.cross_attn.in_proj_weight": torch.randn(24, 8),
          "a.cross_attn.out_proj.weight": torch.randn(8, 8)}
    spec = detect(KeyIndex({k: tuple(v.shape) for k, v in sd.items()}),
                  ModelConfig({"num_attention_heads": 2})).blocks[0]
    glob, mine, other = (torch.full((1, 3, 8), v) for v in (0.0, 1.0, 2.0))
    ctx = torch.zeros(1, 4, 8)

    def source(tensors: dict[str, torch.Tensor], aliases: tuple[str, ...]) -> float:
        probe = Probe("file", None, {"hidden_states": glob, "encoder_hidden_states": ctx,
                                     **tensors}, 0)
        return float(probe.inputs_for(replace(spec, aliases=aliases), None).x[0, 0, 0])

    assert source({"live.3.xattn.hidden_states": mine}, ("live.*.xattn",)) == 1.0
    assert source({"live.3.xattn.hidden_states": mine}, ()) == 0.0  # no alias: the global one
    assert source({f"{spec.name}.hidden_states": other, "live.3.xattn.hidden_states": mine},
                  ("live.*.xattn",)) == 2.0  # its own name first
    assert source({"l.1.xattn.hidden_states": mine, "l.2.xattn.hidden_states": other},
                  ("l.*.xattn",)) == 0.0  # two matches: neither is taken
