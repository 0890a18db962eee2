"""IDEFICS gated cross-attention layers, checked against transformers itself."""

from __future__ import annotations

import copy
import shutil
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.family
torch = pytest.importorskip("torch", reason="the family tests build real models with torch")
T = pytest.importorskip("transformers", minversion="5.0",
                        reason="IDEFICS tests need transformers>=5")

import _hf_family as H

from xattn_doctor.layouts import all_layouts

VISION = dict(embed_dim=24, image_size=16, patch_size=8, num_hidden_layers=1,
              num_attention_heads=2, intermediate_size=48)
PERCEIVER = dict(resampler_n_latents=4, resampler_depth=1, resampler_n_heads=2,
                 resampler_head_dim=8)
BLOCKS = ["model.gated_cross_attn_layers.0", "model.gated_cross_attn_layers.1"]
RESAMPLER = "model.perceiver_resampler.blocks.0.0"
VARIANTS = {
    "vector_qknorm": dict(alpha_type="vector", alpha_initializer="normal", qk_layer_norms=True,
                          use_resampler=False),
    # transformers 5.24 cannot build alpha_type "float" with a "normal" initializer
    "float_resampler": dict(alpha_type="float", alpha_initializer="ones", qk_layer_norms=False,
                            use_resampler=True),
}


def build(variant: str) -> Any:
    """A tiny seeded IdeficsForVisionText2Text, eval mode, eager attention (weights returned)."""
    torch.manual_seed(0)
    cfg = T.IdeficsConfig(
        vocab_size=100, additional_vocab_size=2, hidden_size=32, intermediate_size=64,
        num_hidden_layers=4, num_attention_heads=4, cross_layer_interval=2,
        alphas_initializer_range=0.5, initializer_range=0.2,
        max_position_embeddings=64, rms_norm_eps=1e-5, vision_config=VISION,
        perceiver_config=PERCEIVER, **VARIANTS[variant])
    model = T.IdeficsForVisionText2Text(cfg)
    model.set_attn_implementation("eager")
    return model.eval()


def layout() -> Any:
    """The registered IDEFICS layout."""
    return next(lay for lay in all_layouts() if lay.name == "idefics")


def run(model: Any) -> dict[str, dict[str, Any]]:
    """One forward pass; sample 0 sees both images, sample 1 the second, sample 2 none."""
    torch.manual_seed(1)
    images = torch.zeros(3, 6, 2, dtype=torch.long)
    images[0] = 1
    images[1, :, 1] = 1
    with H.recorded_layers(model, BLOCKS, "cross_attn") as seen, torch.no_grad():
        model(input_ids=torch.randint(3, 100, (3, 6)),
              pixel_values=torch.randn(3, 2, 3, 16, 16), image_attention_mask=images)
    return seen


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """variant -> (variant, live model, folder saved sharded by save_pretrained), built once."""
    cache: dict[str, Any] = {}

    def get(variant: str) -> Any:
        if variant not in cache:
            model = build(variant)
            cache[variant] = variant, model, H.save(model, tmp_path_factory.mktemp(variant))
        return cache[variant]
    return get


@pytest.fixture(params=sorted(VARIANTS))
def saved(request: pytest.FixtureRequest, store: Any) -> Any:
    """Each variant in turn."""
    return store(request.param)


@pytest.fixture
def vector(store: Any) -> Any:
    """The vector-gate, qk-normed variant (the tests that corrupt it work on a copy)."""
    return store("vector_qknorm")


def test_every_gated_layer_found_none_invented(saved: Any) -> None:
    variant, _, path = saved
    assert H.shard_count(path) > 1
    _, det = H.detect_dir(path)
    # the resampler's attention is its own layout's (test_idefics_perceiver.py)
    resampler = [RESAMPLER] if VARIANTS[variant]["use_resampler"] else []
    assert [b.name for b in det.blocks] == BLOCKS + resampler
    assert [b.layout for b in det.blocks] == ["idefics"] * 2 + ["idefics_perceiver"] * len(resampler)
    qk = VARIANTS[variant]["qk_layer_norms"]
    for b in det.blocks[:2]:
        assert (b.layout, b.role, b.heads, b.kv_heads, b.head_dim) == ("idefics", "cross", 4, 4, 8)
        assert (b.query_dim, b.context_dim) == (32, 24)
        assert b.heads_source == ("weights" if qk else "config")
        assert b.query_norm is not None and b.query_norm.kind == "rms"
        assert b.query_norm.eps == 1e-5 and b.context_norm is None and b.post_norm is None
        assert (b.q_norm is not None) == qk and (b.k_norm is not None) == qk
        assert b.gate is not None and b.gate.fn == "tanh" and b.residual
        assert b.gate.param.key == f"{b.name}.alpha_cross_attn"
        assert b.extra_keys == (f"{b.name}.alpha_dense",)


def test_probabilities_and_output_match_library(saved: Any) -> None:
    variant, model, path = saved
    ckpt, det = H.detect_dir(path)
    seen = run(model)
    for spec in det.blocks[:2]:
        rec = seen[spec.name]
        inputs = layout().capture(spec, rec["args"], rec["kwargs"])
        x, c = inputs["hidden_states"], inputs["encoder_hidden_states"]
        mask = inputs["encoder_attention_mask"]
        per_image = 4 if VARIANTS[variant]["use_resampler"] else 5  # latents, or 1 + 2x2 patches
        assert x.shape == (3, 6, 32) and c.shape == (3, 2 * per_image, 24)
        assert mask.tolist() == [[True] * 2 * per_image, [False] * per_image + [True] * per_image,
                                 [False] * 2 * per_image]
        blk = H.rebuild(ckpt, spec)
        # sample 2 attends to no image: IDEFICS softmaxes over all-masked keys, then zeroes it
        torch.testing.assert_close(H.probs(blk, x, c, mask)[:2], rec["weights"][:2],
                                   atol=1e-4, rtol=0)
        alpha = model.get_parameter(f"{spec.name}.alpha_cross_attn")
        gate = rec["kwargs"]["cross_attention_gate"]
        expected = x + torch.tanh(alpha) * rec["attn_out"].masked_fill((gate == 0)[..., None], 0)
        with torch.no_grad():
            torch.testing.assert_close(blk(x, c, mask), expected, atol=1e-4, rtol=0)


def copy_of(saved: Any, variant: str, tmp_path: Path) -> Path:
    """A writable copy of the module's saved `variant`."""
    assert saved[0] == variant
    return Path(shutil.copytree(saved[2], tmp_path / "m"))


def test_scaled_qk_norm_gains_raise_that_block_only(vector: Any, tmp_path: Path) -> None:
    path = copy_of(vector, "vector_qknorm", tmp_path)
    torch.manual_seed(2)
    x, c = torch.randn(2, 6, 32), torch.randn(2, 10, 24)
    ckpt, det = H.detect_dir(path)
    before = [H.max_logit(H.rebuild(ckpt, s), x, c) for s in det.blocks]
    for role in ("q", "k"):
        H.patch(path, f"{BLOCKS[1]}.cross_attn.{role}_layer_norm.weight", lambda w: w * 30)
    ckpt, det = H.detect_dir(path)
    after = [H.max_logit(H.rebuild(ckpt, s), x, c) for s in det.blocks]
    assert after[0] == pytest.approx(before[0], rel=1e-6)
    assert after[1] > 100 * before[1] > 0


def test_saturated_gate_and_nan_hit_their_blocks(vector: Any, tmp_path: Path) -> None:
    path = copy_of(vector, "vector_qknorm", tmp_path)
    H.patch(path, f"{BLOCKS[0]}.alpha_cross_attn", lambda a: torch.full_like(a, 20.0))
    H.patch(path, f"{BLOCKS[1]}.cross_attn.k_proj.weight",
            lambda w: w.index_fill(0, torch.tensor([5]), float("nan")))
    ckpt, det = H.detect_dir(path)
    gates = [float(H.rebuild(ckpt, s).gate_value().detach().reshape(-1)[0])
             for s in det.blocks]
    assert gates[0] == pytest.approx(1.0) and abs(gates[1]) < 0.99
    x, c = torch.randn(2, 6, 32), torch.randn(2, 10, 24)
    logits = [H.max_logit(H.rebuild(ckpt, s), x, c) for s in det.blocks]
    assert logits[0] == logits[0] and logits[1] != logits[1]  # NaN in block 1 only


def test_bfloat16_checkpoint(vector: Any, tmp_path: Path) -> None:
    path = H.save(copy.deepcopy(vector[1]).to(torch.bfloat16), tmp_path / "bf16")
    ckpt, det = H.detect_dir(path)
    assert ckpt.dtype == "bfloat16"
    assert [b.name for b in det.blocks] == BLOCKS
    assert ckpt.dtype_of(det.blocks[1].gate.param.key) == "bfloat16"


def test_diagnose_end_to_end(vector: Any, tmp_path: Path) -> None:
    import xattn_doctor

    path = copy_of(vector, "vector_qknorm", tmp_path)
    H.patch(path, f"{BLOCKS[0]}.alpha_cross_attn", lambda a: torch.full_like(a, 20.0))
    for role in ("q", "k"):
        H.patch(path, f"{BLOCKS[1]}.cross_attn.{role}_layer_norm.weight", lambda w: w * 30)
    (report,) = xattn_doctor.diagnose([path])
    assert [b.name for b in report.blocks] == BLOCKS
    assert all(b.layout == "idefics" and b.gated and b.qk_norm for b in report.blocks)
    assert report.blocks[0].metrics.gate == pytest.approx(1.0)
    codes = {(f.code, f.block) for f in report.findings}
    assert ("XD402", BLOCKS[0]) in codes and ("XD101", BLOCKS[1]) in codes
    assert ("XD101", BLOCKS[0]) not in codes and ("XD402", BLOCKS[1]) not in codes


def test_capture_probe_end_to_end(vector: Any, tmp_path: Path) -> None:
    from safetensors.torch import load_file

    import xattn_doctor

    _, model, path = vector
    seen = run(model)  # seeds inputs as below, and records the library's own attention
    torch.manual_seed(1)
    images = torch.zeros(3, 6, 2, dtype=torch.long)
    images[0] = 1
    images[1, :, 1] = 1
    inputs = {"input_ids": torch.randint(3, 100, (3, 6)),
              "pixel_values": torch.randn(3, 2, 3, 16, 16), "image_attention_mask": images}
    probe = xattn_doctor.capture_probe(model, inputs, tmp_path / "probe.safetensors")
    tensors = load_file(str(probe))
    for name in BLOCKS:
        args = seen[name]["args"]
        torch.testing.assert_close(tensors[f"{name}.hidden_states"], args[0])
        torch.testing.assert_close(tensors[f"{name}.encoder_hidden_states"], args[2])
        assert tensors[f"{name}.encoder_attention_mask"].tolist() == \
            [[True] * 10, [False] * 5 + [True] * 5, [False] * 10]
    (report,) = xattn_doctor.diagnose([path], probe=probe)
    assert report.probe.synthesized == []
    for result in report.blocks:
        library = seen[result.name]["weights"][:2]  # sample 2 may attend to no image
        assert result.metrics.max_attention_weight == pytest.approx(float(library.max()),
                                                                    abs=1e-4)
