"""Idefics2's Perceiver resampler, built with transformers, saved with save_pretrained, and each
rebuilt layer checked against the library's own attention (eager) on the same inputs."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.family
torch = pytest.importorskip("torch", reason="the family tests build real models with torch")
T = pytest.importorskip("transformers", minversion="5.0",
                        reason="the Idefics2 tests need transformers>=5")

import _hf_family as H

from xattn_doctor.layouts import KeyIndex, ModelConfig, all_layouts, detect

RESAMPLER = "model.connector.perceiver_resampler"
BLOCKS = [f"{RESAMPLER}.layers.0", f"{RESAMPLER}.layers.1"]
LATENTS, WIDTH, PATCHES = 4, 32, 4
# text_config's kv heads (1) and eps (1e-5) differ from the resampler's on purpose: a lookup
# that searched text_config first would get them wrong.
PERCEIVER = dict(hidden_size=WIDTH, rms_norm_eps=1e-6, resampler_n_latents=LATENTS,
                 resampler_depth=2, resampler_n_heads=4, resampler_head_dim=8,
                 num_key_value_heads=2, initializer_range=0.3)
TEXT = dict(model_type="mistral", hidden_size=WIDTH, intermediate_size=64, num_hidden_layers=1,
            num_attention_heads=4, num_key_value_heads=1, vocab_size=100, rms_norm_eps=1e-5)
VISION = dict(hidden_size=24, intermediate_size=48, num_hidden_layers=1, num_attention_heads=2,
              image_size=16, patch_size=8)


def layout() -> Any:
    """The registered Idefics2 resampler layout."""
    return next(lay for lay in all_layouts() if lay.name == "idefics2_perceiver")


def build() -> Any:
    """A tiny seeded Idefics2ForConditionalGeneration, eval mode, eager attention, with random
    latents and resampler norm gains (the library initialises them to ones)."""
    torch.manual_seed(0)
    cfg = T.Idefics2Config(vision_config=VISION, perceiver_config=PERCEIVER, text_config=TEXT,
                           image_token_id=99)
    model = T.Idefics2ForConditionalGeneration(cfg)
    model.set_attn_implementation("eager")
    with torch.no_grad():
        for name, p in model.get_submodule(RESAMPLER).named_parameters():
            if name == "latents" or "norm" in name:
                p.normal_(1.0, 0.5)
    return model.eval()


def inputs() -> dict[str, Any]:
    """Two samples of one image; sample 1's right half is padding (patches 1 and 3 masked)."""
    torch.manual_seed(1)
    ids = torch.randint(3, 90, (2, 8))
    ids[:, 1:1 + LATENTS] = 99
    pixels = torch.ones(2, 1, 16, 16, dtype=torch.bool)
    pixels[1, 0, :, 8:] = False
    return {"input_ids": ids, "pixel_values": torch.randn(2, 1, 3, 16, 16),
            "pixel_attention_mask": pixels}


def run(model: Any) -> dict[str, dict[str, Any]]:
    """One forward pass, recording each resampler layer's call and its attention's output."""
    with H.recorded_layers(model, BLOCKS, "self_attn") as seen, torch.no_grad():
        model(**inputs())
    return seen


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> tuple[Any, Path]:
    """The live model and its save_pretrained folder (sharded), built once."""
    model = build()
    return model, H.save(model, tmp_path_factory.mktemp("idefics2"))


def test_resampler_layers_found_with_perceiver_config_heads(built: Any) -> None:
    _, path = built
    assert H.shard_count(path) > 1
    _, det = H.detect_dir(path)
    assert [b.name for b in det.blocks] == BLOCKS
    for i, b in enumerate(det.blocks):
        assert (b.layout, b.role, b.heads, b.kv_heads, b.head_dim, b.heads_source) == \
            ("idefics2_perceiver", "cross", 4, 2, 8, "config")
        assert (b.query_dim, b.context_dim, b.softmax_scale) == (WIDTH, WIDTH, 8 ** -0.5)
        assert b.kv_includes_queries and b.residual and b.gate is None and b.post_norm is None
        for pre, module in ((b.query_norm, "input_latents_norm"),
                            (b.context_norm, "input_context_norm")):
            assert pre is not None and (pre.kind, pre.eps, pre.width) == ("rms", 1e-6, WIDTH)
            assert pre.weight is not None and pre.weight.key == f"{b.name}.{module}.weight"
        assert b.q.weight.key == f"{b.name}.self_attn.q_proj.weight" and b.q.bias is None
        learned = b.learned_queries
        assert (learned.key if learned else None) == (f"{RESAMPLER}.latents" if i == 0 else None)
        assert any("updated by the layers before it" in n for n in b.notes) == (i > 0)
    # the resampler's self_attn modules are not reported again as self-attention
    assert not any(s["name"].startswith(RESAMPLER) for s in det.skipped)


def test_probabilities_and_output_match_library(built: Any) -> None:
    model, path = built
    ckpt, det = H.detect_dir(path)
    seen = run(model)
    latents = model.get_parameter(f"{RESAMPLER}.latents").detach()
    for spec in det.blocks:
        rec = seen[spec.name]
        got = layout().capture(spec, rec["args"], rec["kwargs"])
        x, c, mask = got["hidden_states"], got["encoder_hidden_states"], got["encoder_attention_mask"]
        assert x.shape == (2, LATENTS, WIDTH) and c.shape == (2, PATCHES, WIDTH)
        assert mask.tolist() == [[True] * 4, [True, False, True, False]]
        blk = H.rebuild(ckpt, spec)
        if spec.learned_queries is not None:
            assert torch.equal(x, latents.expand(2, -1, -1))
            assert torch.equal(blk.p("learned_queries").detach(), latents)
        else:
            assert not torch.allclose(x, latents.expand(2, -1, -1))  # the running latents
        weights = rec["weights"]
        assert weights.shape == (2, 4, LATENTS, PATCHES + LATENTS)
        torch.testing.assert_close(H.probs(blk, x, c, mask), weights, atol=1e-4, rtol=0)
        with torch.no_grad():
            torch.testing.assert_close(blk(x, c, mask), x + rec["attn_out"], atol=1e-4, rtol=0)


def copy_of(built: Any, tmp_path: Path) -> Path:
    """A writable copy of the saved model."""
    return Path(shutil.copytree(built[1], tmp_path / "m"))


def test_scaled_q_proj_flagged_on_that_layer_only(built: Any, tmp_path: Path) -> None:
    import xattn_doctor

    path = copy_of(built, tmp_path)
    H.patch(path, f"{BLOCKS[1]}.self_attn.q_proj.weight", lambda w: w * 30)
    (report,) = xattn_doctor.diagnose([path])
    assert [(b.name, b.layout, b.heads) for b in report.blocks] == \
        [(n, "idefics2_perceiver", 4) for n in BLOCKS]
    assert report.blocks[0].inputs == "queries=learned, context=synthetic"
    codes = {(f.code, f.block) for f in report.findings}
    assert ("XD101", BLOCKS[1]) in codes and ("XD101", BLOCKS[0]) not in codes
    logits = [b.metrics.max_logit for b in report.blocks]
    assert logits[1] >= 100 > 50 > logits[0]


def test_capture_probe_then_diagnose(built: Any, tmp_path: Path) -> None:
    from safetensors.torch import load_file

    import xattn_doctor

    model, path = built
    seen = run(model)  # eager: the library's attention weights
    model.set_attn_implementation("sdpa")  # whose layer mask is boolean, not additive
    try:
        probe = xattn_doctor.capture_probe(model, inputs(), tmp_path / "probe.safetensors")
    finally:
        model.set_attn_implementation("eager")
    tensors = load_file(str(probe))
    for name in BLOCKS:
        args = seen[name]["args"]
        torch.testing.assert_close(tensors[f"{name}.hidden_states"], args[0])
        torch.testing.assert_close(tensors[f"{name}.encoder_hidden_states"], args[1])
        assert tensors[f"{name}.encoder_attention_mask"].tolist() == \
            [[True] * 4, [True, False, True, False]]
    (report,) = xattn_doctor.diagnose([path], probe=probe)
    assert report.probe.synthesized == []
    for block in report.blocks:
        library = seen[block.name]["weights"]
        entropy = -(library * library.clamp_min(1e-30).log()).sum(-1).mean(dim=(0, 2))
        assert block.inputs == "probe"
        assert block.metrics.max_attention_weight == pytest.approx(float(library.max()),
                                                                   abs=1e-4)
        assert block.metrics.entropy_mean == pytest.approx(float(entropy.mean()), abs=1e-4)


def test_stand_alone_resampler_reads_its_top_level_config(tmp_path: Path) -> None:
    from transformers.models.idefics2.modeling_idefics2 import Idefics2PerceiverResampler

    torch.manual_seed(0)
    Idefics2PerceiverResampler(T.Idefics2PerceiverConfig(**PERCEIVER)).save_pretrained(tmp_path)
    _, det = H.detect_dir(tmp_path)
    assert [b.name for b in det.blocks] == ["layers.0", "layers.1"]
    b = det.blocks[0]
    assert (b.heads, b.kv_heads, b.head_dim, b.heads_source) == (4, 2, 8, "config")
    assert b.learned_queries is not None and b.learned_queries.key == "latents"


def test_without_config_the_default_split_keeps_whole_query_groups() -> None:
    layer = "connector.perceiver_resampler.layers.0"
    shapes = {f"{layer}.input_latents_norm.weight": (WIDTH,),
              f"{layer}.input_context_norm.weight": (WIDTH,),
              f"{layer}.self_attn.q_proj.weight": (32, WIDTH),
              f"{layer}.self_attn.k_proj.weight": (16, WIDTH),
              f"{layer}.self_attn.v_proj.weight": (16, WIDTH),
              f"{layer}.self_attn.o_proj.weight": (WIDTH, 32)}
    (b,) = detect(KeyIndex(shapes), ModelConfig()).blocks
    assert (b.heads, b.kv_heads, b.head_dim, b.heads_source) == (8, 4, 4, "default")
    assert b.query_norm is not None and b.query_norm.eps == 1e-6
    contradicted = ModelConfig({"perceiver_config": {"resampler_n_heads": 4,
                                                     "resampler_head_dim": 8,
                                                     "num_key_value_heads": 4}})
    (b,) = detect(KeyIndex(shapes), contradicted).blocks  # 4 kv heads of 8 would need 32 rows
    assert b.heads_source == "default"
