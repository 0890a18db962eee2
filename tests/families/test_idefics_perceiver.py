"""IDEFICS' Perceiver resampler (use_resampler=True), built with transformers, saved with
save_pretrained, and each rebuilt block checked against the library's own attention: the
probabilities its einsum consumes and the module's output, on the inputs it was called with."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.family
torch = pytest.importorskip("torch", reason="the family tests build real models with torch")
T = pytest.importorskip("transformers", minversion="5.0",
                        reason="IDEFICS tests need transformers>=5")

import _block_check as B
import _hf_family as H

from xattn_doctor.layouts import all_layouts

RESAMPLER = "model.perceiver_resampler"
BLOCKS = [f"{RESAMPLER}.blocks.0.0", f"{RESAMPLER}.blocks.1.0"]
GATED = ["model.gated_cross_attn_layers.0", "model.gated_cross_attn_layers.1"]
WIDTH, LATENTS, TOKENS, IMAGES = 24, 4, 5, 2  # TOKENS: class token + 2x2 patches
VISION = dict(embed_dim=WIDTH, image_size=16, patch_size=8, num_hidden_layers=1,
              num_attention_heads=2, intermediate_size=48)
# 2 heads of 8 (16 wide): the text's 4 heads, or the 8 heads of the default split, would differ
PERCEIVER = dict(resampler_n_latents=LATENTS, resampler_depth=2, resampler_n_heads=2,
                 resampler_head_dim=8)
ATTN_EINSUM = "... i j, ... j d -> ... i d"  # IdeficsPerceiverAttention: attn @ v


def build(qk: bool) -> Any:
    """A tiny seeded IdeficsForVisionText2Text with the resampler, eval mode, eager attention;
    latents and the resampler's LayerNorm gains and biases random (the library inits 1 and 0)."""
    torch.manual_seed(0)
    cfg = T.IdeficsConfig(
        vocab_size=100, additional_vocab_size=2, hidden_size=32, intermediate_size=64,
        num_hidden_layers=4, num_attention_heads=4, cross_layer_interval=2,
        alphas_initializer_range=0.5, initializer_range=0.2, max_position_embeddings=64,
        rms_norm_eps=1e-5, vision_config=VISION, alpha_type="float", alpha_initializer="ones",
        use_resampler=True, perceiver_config=dict(PERCEIVER, qk_layer_norms_perceiver=qk))
    model = T.IdeficsForVisionText2Text(cfg)
    model.set_attn_implementation("eager")
    with torch.no_grad():
        for name, p in model.get_submodule(RESAMPLER).named_parameters():
            if name == "latents" or "norm" in name:
                p.normal_(1.0 if name.endswith("weight") else 0.0, 0.5)
    return model.eval()


def inputs() -> dict[str, Any]:
    """Two samples of two images each (the resampler sees 4 contexts)."""
    torch.manual_seed(1)
    return {"input_ids": torch.randint(3, 100, (2, 6)),
            "pixel_values": torch.randn(2, IMAGES, 3, 16, 16),
            "image_attention_mask": torch.ones(2, 6, IMAGES, dtype=torch.long)}


def layout() -> Any:
    """The registered IDEFICS resampler layout."""
    return next(lay for lay in all_layouts() if lay.name == "idefics_perceiver")


def run(model: Any) -> dict[str, Any]:
    """One forward pass: each resampler attention's call, its output, and the probabilities it
    multiplies its values with."""
    with B.recorded_calls(model, BLOCKS) as calls, \
            B.recorded_einsum(torch, lambda a: a[1] if a[0] == ATTN_EINSUM else None) as attn, \
            torch.no_grad():
        model(**inputs())
    assert len(attn) == len(BLOCKS)
    return {n: {"args": calls[n][0], "kwargs": calls[n][1], "out": calls[n][2], "weights": w}
            for n, w in zip(BLOCKS, attn)}


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """qk -> (qk, live model, folder saved sharded by save_pretrained), built once."""
    cache: dict[bool, Any] = {}

    def get(qk: bool) -> Any:
        if qk not in cache:
            model = build(qk)
            cache[qk] = qk, model, H.save(model, tmp_path_factory.mktemp(f"qk{int(qk)}"))
        return cache[qk]
    return get


@pytest.fixture(params=[False, True], ids=["plain", "qk_norms"])
def saved(request: pytest.FixtureRequest, store: Any) -> Any:
    """Each variant in turn: qk_layer_norms_perceiver off, then on."""
    return store(request.param)


def test_resampler_blocks_found_beside_the_gated_layers(saved: Any) -> None:
    qk, _, path = saved
    assert H.shard_count(path) > 1
    _, det = H.detect_dir(path)
    assert [b.name for b in det.blocks] == GATED + BLOCKS
    assert [b.layout for b in det.blocks] == ["idefics"] * 2 + ["idefics_perceiver"] * 2
    assert not any(s["name"].startswith(RESAMPLER) for s in det.skipped)
    for i, b in enumerate(det.blocks[2:]):
        assert (b.role, b.heads, b.kv_heads, b.head_dim) == ("cross", 2, 2, 8)
        assert b.heads_source == ("weights" if qk else "config")
        assert (b.query_dim, b.context_dim, b.softmax_scale) == (WIDTH, WIDTH, 8 ** -0.5)
        assert b.kv_includes_queries and b.residual and b.gate is None and b.post_norm is None
        for pre, module in ((b.query_norm, "latents_layer_norm"),
                            (b.context_norm, "context_layer_norm")):
            assert pre is not None and (pre.kind, pre.eps, pre.width) == ("layer", 1e-5, WIDTH)
            assert (pre.weight.key, pre.bias.key) == (f"{b.name}.{module}.weight",
                                                      f"{b.name}.{module}.bias")
        for qk_norm, module in ((b.q_norm, "q_layer_norm"), (b.k_norm, "k_layer_norm")):
            assert (qk_norm is not None) == qk
            if qk_norm is not None:
                assert (qk_norm.kind, qk_norm.eps, qk_norm.width) == ("layer", 1e-5, 8)
                assert qk_norm.bias.key == f"{b.name}.{module}.bias"
        assert b.qk_norm_per_head
        assert [lin.weight.key for lin in (b.q, b.k, b.v, b.o)] == \
            [f"{b.name}.{p}.weight" for p in ("q_proj", "k_proj", "v_proj", "output_proj")]
        assert all(lin.bias is None for lin in (b.q, b.k, b.v, b.o))
        learned = b.learned_queries
        assert (learned.key if learned else None) == (f"{RESAMPLER}.latents" if i == 0 else None)
        assert any("updated by the blocks before it" in n for n in b.notes) == (i > 0)


def test_probabilities_and_output_match_library(saved: Any) -> None:
    _, model, path = saved
    ckpt, det = H.detect_dir(path)
    seen = run(model)
    latents = model.get_parameter(f"{RESAMPLER}.latents").detach()
    for spec in det.blocks[2:]:
        rec = seen[spec.name]
        got = layout().capture(spec, rec["args"], rec["kwargs"])
        x, c = got["hidden_states"], got["encoder_hidden_states"]
        assert set(got) == {"hidden_states", "encoder_hidden_states"}  # the resampler masks nothing
        assert x.shape == (2 * IMAGES, LATENTS, WIDTH) and c.shape == (2 * IMAGES, TOKENS, WIDTH)
        blk = H.rebuild(ckpt, spec)
        if spec.learned_queries is not None:
            assert torch.equal(x, latents.expand(2 * IMAGES, -1, -1))
            assert torch.equal(blk.p("learned_queries").detach(), latents)
        else:
            assert not torch.allclose(x, latents.expand(2 * IMAGES, -1, -1))  # running latents
        weights = rec["weights"]
        assert weights.shape == (2 * IMAGES, 2, LATENTS, TOKENS + LATENTS)
        torch.testing.assert_close(H.probs(blk, x, c), weights, atol=1e-4, rtol=0)
        with torch.no_grad():  # the resampler loop adds the residual: latents = attn(...) + latents
            torch.testing.assert_close(blk(x, c), rec["out"] + x, atol=1e-4, rtol=0)


def copy_of(saved: Any, tmp_path: Path) -> Path:
    """A writable copy of the saved model."""
    return Path(shutil.copytree(saved[2], tmp_path / "m"))


def test_scaled_query_flagged_on_that_block_only(saved: Any, tmp_path: Path) -> None:
    """q_proj x30 saturates the plain block; with qk layer norms q's scale is normalised away,
    and the q_layer_norm's gain and bias are what scale the logits."""
    import xattn_doctor

    qk, _, _ = saved
    path = copy_of(saved, tmp_path)
    H.patch(path, f"{BLOCKS[1]}.q_proj.weight", lambda w: w * 30)
    (report,) = xattn_doctor.diagnose([path])
    flagged = {f.block for f in report.findings if f.code == "XD101"}
    assert flagged == (set() if qk else {BLOCKS[1]})
    if qk:
        for part in ("weight", "bias"):
            H.patch(path, f"{BLOCKS[1]}.q_layer_norm.{part}", lambda w: w * 30)
        (report,) = xattn_doctor.diagnose([path])
        assert {f.block for f in report.findings if f.code == "XD101"} == {BLOCKS[1]}
    result = {b.name: b for b in report.blocks}
    assert result[BLOCKS[0]].inputs == "queries=learned, context=synthetic"
    assert result[BLOCKS[1]].metrics.max_logit >= 100 > 50 > result[BLOCKS[0]].metrics.max_logit


def test_capture_probe_then_diagnose(saved: Any, tmp_path: Path) -> None:
    from safetensors.torch import load_file

    import xattn_doctor

    _, model, path = saved
    seen = run(model)
    probe = xattn_doctor.capture_probe(model, inputs(), tmp_path / "probe.safetensors")
    tensors = load_file(str(probe))
    for name in BLOCKS:
        context, latents = seen[name]["args"]
        torch.testing.assert_close(tensors[f"{name}.hidden_states"], latents)
        torch.testing.assert_close(tensors[f"{name}.encoder_hidden_states"], context)
        assert f"{name}.encoder_attention_mask" not in tensors
    (report,) = xattn_doctor.diagnose([path], probe=probe)
    assert report.probe.synthesized == []
    for block in report.blocks[2:]:
        library = seen[block.name]["weights"]
        assert block.inputs == "probe"
        assert block.metrics.max_attention_weight == pytest.approx(float(library.max()),
                                                                   abs=1e-4)
        assert block.metrics.entropy_mean == pytest.approx(float(B.entropy(library).mean()),
                                                           abs=1e-4)
