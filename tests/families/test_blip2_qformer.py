"""BLIP-2 and InstructBLIP Q-Former cross-attention, checked against transformers itself."""

from __future__ import annotations

import copy
import shutil
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.family
torch = pytest.importorskip("torch", reason="the family tests build real models with torch")
T = pytest.importorskip("transformers", minversion="5.0",
                        reason="BLIP-2/InstructBLIP tests need transformers>=5")

import _hf_family as H

from xattn_doctor.layouts import all_layouts

VISION = dict(hidden_size=24, intermediate_size=48, num_hidden_layers=1, num_attention_heads=2,
              image_size=16, patch_size=8, initializer_range=0.2)
QFORMER = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
               cross_attention_frequency=2, encoder_hidden_size=24, vocab_size=100,
               max_position_embeddings=32, layer_norm_eps=1e-7, initializer_range=0.2)
TEXT = dict(model_type="opt", hidden_size=40, ffn_dim=64, num_hidden_layers=1,
            num_attention_heads=4, vocab_size=100, max_position_embeddings=64,
            word_embed_proj_dim=40)
CROSS = ["qformer.encoder.layer.0.crossattention", "qformer.encoder.layer.2.crossattention"]
FAMILIES = ("blip2", "instructblip", "instructblipvideo")


def build(family: str) -> Any:
    """A tiny seeded model of the family, in eval mode with eager attention (weights returned)."""
    torch.manual_seed(0)
    if family == "blip2":
        cfg = T.Blip2Config(vision_config=VISION, qformer_config=QFORMER, text_config=TEXT,
                            num_query_tokens=4, initializer_range=0.2,
                            image_token_index=99)
        model = T.Blip2ForConditionalGeneration(cfg)
    elif family == "instructblip":
        cfg = T.InstructBlipConfig(vision_config=VISION, qformer_config=QFORMER,
                                   text_config=TEXT, num_query_tokens=4, initializer_range=0.2,
                                   image_token_index=99)
        model = T.InstructBlipForConditionalGeneration(cfg)
    else:
        cfg = T.InstructBlipVideoConfig(vision_config=VISION, qformer_config=QFORMER,
                                        text_config=TEXT, num_query_tokens=4, image_token_index=99,
                                        initializer_range=0.2)
        model = T.InstructBlipVideoForConditionalGeneration(cfg)
    with torch.no_grad():  # transformers initialises them to zeros: no signal to attend with
        model.query_tokens.normal_()
    model.set_attn_implementation("eager")
    return model.eval()


def layout() -> Any:
    """The registered Q-Former layout."""
    return next(lay for lay in all_layouts() if lay.name == "blip2_qformer")


def run_qformer(model: Any, family: str, names: list[str],
                weights: bool = True) -> dict[str, dict[str, Any]]:
    """Run the Q-Former on random image features with padded keys; record each block."""
    seen: dict[str, dict[str, Any]] = {}
    hooks = []
    for name in names:
        mod = model.get_submodule(name)
        hooks += [
            mod.register_forward_pre_hook(
                lambda m, a, kw, n=name: seen.__setitem__(n, {"args": a, "kwargs": kw}),
                with_kwargs=True),
            mod.register_forward_hook(lambda m, a, o, n=name: seen[n].__setitem__("out", o)),
        ]
        if weights:
            hooks.append(mod.attention.register_forward_hook(
                lambda m, a, o, n=name: seen[n].__setitem__("weights", o[1])))
    torch.manual_seed(1)
    img = torch.randn(2, 7, 24)
    mask = torch.ones(2, 7, dtype=torch.long)
    mask[1, 5:] = 0
    extra = {"input_ids": torch.randint(1, 100, (2, 3))} if family != "blip2" else {}
    try:
        with torch.no_grad():
            model.qformer(query_embeds=torch.randn(2, 4, 32), encoder_hidden_states=img,
                          encoder_attention_mask=mask, **extra)
    finally:
        for h in hooks:
            h.remove()
    return seen


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """family -> (family, live model, folder saved sharded by save_pretrained), built once."""
    cache: dict[str, Any] = {}

    def get(family: str) -> Any:
        if family not in cache:
            model = build(family)
            cache[family] = family, model, H.save(model, tmp_path_factory.mktemp(family))
        return cache[family]
    return get


@pytest.fixture(params=FAMILIES)
def saved(request: pytest.FixtureRequest, store: Any) -> Any:
    """Each family in turn."""
    return store(request.param)


@pytest.fixture
def blip2(store: Any, tmp_path: Path) -> Path:
    """A writable copy of the saved BLIP-2 model, for the tests that corrupt it."""
    return Path(shutil.copytree(store("blip2")[2], tmp_path / "m"))


def test_every_cross_block_found_none_invented(saved: Any) -> None:
    family, _, path = saved
    assert H.shard_count(path) > 1
    _, det = H.detect_dir(path)
    assert [b.name for b in det.blocks] == CROSS
    for b in det.blocks:
        assert (b.layout, b.role, b.heads, b.kv_heads, b.head_dim) == \
            ("blip2_qformer", "cross", 4, 4, 8)
        assert (b.query_dim, b.context_dim, b.heads_source) == (32, 24, "config")
        assert b.post_norm is not None and b.post_norm.eps == 1e-7 and b.query_norm is None
        assert b.residual and b.gate is None and b.o is not None
    assert det.blocks[0].learned_queries is not None
    assert det.blocks[0].learned_queries.key == "query_tokens"
    skipped = {s["name"] for s in det.skipped if s["layout"] == "blip2_qformer"}
    assert skipped == {f"qformer.encoder.layer.{i}.attention" for i in range(3)}
    if family != "blip2":
        assert any("InstructBLIP" in n for n in det.blocks[0].notes)


def test_probabilities_and_output_match_library(saved: Any) -> None:
    family, model, path = saved
    ckpt, det = H.detect_dir(path)
    seen = run_qformer(model, family, CROSS)
    for spec in det.blocks:
        rec = seen[spec.name]
        inputs = layout().capture(spec, rec["args"], rec["kwargs"])
        x, c = inputs["hidden_states"], inputs["encoder_hidden_states"]
        mask = inputs["encoder_attention_mask"]
        assert x.shape == (2, 4, 32) and c.shape == (2, 7, 24)
        assert mask.tolist() == [[True] * 7, [True] * 5 + [False] * 2]
        blk = H.rebuild(ckpt, spec)
        torch.testing.assert_close(H.probs(blk, x, c, mask), rec["weights"], atol=1e-4, rtol=0)
        with torch.no_grad():
            torch.testing.assert_close(blk(x, c, mask), rec["out"], atol=1e-4, rtol=0)


def test_learned_queries_load(saved: Any) -> None:
    _, model, path = saved
    ckpt, det = H.detect_dir(path)
    blk = H.rebuild(ckpt, det.blocks[0])
    queries = blk.p("learned_queries")
    assert queries is not None and queries.shape == (1, 4, 32)
    torch.testing.assert_close(queries, model.query_tokens.detach())


def test_scaled_query_weights_raise_that_block_only(blip2: Path) -> None:
    path = blip2
    torch.manual_seed(2)
    x, c = torch.randn(2, 4, 32), torch.randn(2, 7, 24)
    ckpt, det = H.detect_dir(path)
    before = [H.max_logit(H.rebuild(ckpt, s), x, c) for s in det.blocks]
    H.patch(path, f"{CROSS[1]}.attention.query.weight", lambda w: w * 30)
    ckpt, det = H.detect_dir(path)
    after = [H.max_logit(H.rebuild(ckpt, s), x, c) for s in det.blocks]
    assert after[0] == pytest.approx(before[0], rel=1e-6)
    assert after[1] > 10 * before[1] > 0


def test_nan_reaches_that_block_only(blip2: Path) -> None:
    path = blip2
    H.patch(path, f"{CROSS[0]}.attention.key.weight", lambda w: w.index_fill(0, torch.tensor([3]),
                                                                           float("nan")))
    ckpt, det = H.detect_dir(path)
    x, c = torch.randn(2, 4, 32), torch.randn(2, 7, 24)
    logits = [H.max_logit(H.rebuild(ckpt, s), x, c) for s in det.blocks]
    assert logits[0] != logits[0] and logits[1] == logits[1]  # NaN in block 0 only


def test_bfloat16_checkpoint(store: Any, tmp_path: Path) -> None:
    path = H.save(copy.deepcopy(store("blip2")[1]).to(torch.bfloat16), tmp_path / "bf16")
    ckpt, det = H.detect_dir(path)
    assert ckpt.dtype == "bfloat16"
    assert [b.name for b in det.blocks] == CROSS
    assert ckpt.dtype_of(det.blocks[0].q.weight.key) == "bfloat16"


def test_standalone_qformer(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = T.Blip2QFormerModel(T.Blip2QFormerConfig(**QFORMER))
    _, det = H.detect_dir(H.save(model, tmp_path / "q", shard="200MB"))
    assert [b.name for b in det.blocks] == ["encoder.layer.0.crossattention",
                                           "encoder.layer.2.crossattention"]
    assert all(b.learned_queries is None and b.heads == 4 and b.heads_source == "config"
               for b in det.blocks)


def test_diagnose_end_to_end(store: Any, blip2: Path, tmp_path: Path) -> None:
    from safetensors.torch import save_file

    import xattn_doctor

    probe = tmp_path / "probe.safetensors"
    save_file({"encoder_hidden_states": torch.randn(2, 7, 24)}, str(probe))
    H.patch(blip2, f"{CROSS[1]}.attention.query.weight", lambda w: w * 30)
    clean, bad = xattn_doctor.diagnose([store("blip2")[2], blip2], probe=probe)
    for report in (clean, bad):
        assert [b.name for b in report.blocks] == CROSS
        assert all(b.layout == "blip2_qformer" and b.post_norm for b in report.blocks)
        assert f"{CROSS[0]}: queries=learned, context=probe" in report.probe.synthesized
    before = [b.metrics.max_logit for b in clean.blocks]
    after = [b.metrics.max_logit for b in bad.blocks]
    assert after[0] == pytest.approx(before[0], abs=1e-6)
    assert after[1] == pytest.approx(30 * before[1], rel=1e-3)


def test_capture_reads_sdpa_boolean_mask() -> None:
    model = build("blip2")
    model.set_attn_implementation("sdpa")  # 4-D boolean masks instead of additive ones
    seen = run_qformer(model, "blip2", CROSS[:1], weights=False)[CROSS[0]]
    assert seen["kwargs"]["encoder_attention_mask"].dtype == torch.bool
    inputs = layout().capture(None, seen["args"], seen["kwargs"])
    assert inputs["encoder_attention_mask"].tolist() == [[True] * 7, [True] * 5 + [False] * 2]


@pytest.mark.parametrize("family", ["blip2", "instructblip"])
def test_capture_probe_end_to_end(store: Any, family: str, tmp_path: Path) -> None:
    from safetensors.torch import load_file

    import xattn_doctor

    _, model, path = store(family)
    inputs = {"pixel_values": torch.randn(2, 3, 16, 16),
              "input_ids": torch.tensor([[99] * 4 + [5, 6, 7]] * 2)}
    if family != "blip2":
        inputs["qformer_input_ids"] = torch.randint(1, 99, (2, 3))
    probe = xattn_doctor.capture_probe(model, inputs, tmp_path / "probe.safetensors")
    seen: dict[str, Any] = {}
    hooks = [model.get_submodule(n).register_forward_pre_hook(
        lambda m, a, kw, n=n: seen.__setitem__(n, (a, kw)), with_kwargs=True) for n in CROSS]
    try:
        with torch.no_grad():
            model(**inputs)
    finally:
        for h in hooks:
            h.remove()
    tensors = load_file(str(probe))
    for name in CROSS:
        args, kwargs = seen[name]
        x = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
        torch.testing.assert_close(tensors[f"{name}.hidden_states"], x)
        torch.testing.assert_close(tensors[f"{name}.encoder_hidden_states"],
                                   kwargs["encoder_hidden_states"])
    (report,) = xattn_doctor.diagnose([path], probe=probe)
    assert report.probe.synthesized == []
    ckpt, det = H.detect_dir(path)
    for spec, result in zip(det.blocks, report.blocks, strict=True):
        x, c = tensors[f"{spec.name}.hidden_states"], tensors[f"{spec.name}.encoder_hidden_states"]
        assert result.metrics.max_logit == pytest.approx(
            H.max_logit(H.rebuild(ckpt, spec), x, c), rel=1e-4)
        assert result.metrics.max_logit > 0.1
