"""flamingo-pytorch (lucidrains): FlamingoPaLM's gated cross-attention blocks and Perceiver
resampler, saved with safetensors, detected and rebuilt, checked against the library."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

fp = pytest.importorskip("flamingo_pytorch", reason="flamingo-pytorch (lucidrains) not installed")
from _block_check import (
    entropy,
    max_logit,
    probs,
    rebuild,
    recorded_calls,
    recorded_einsum,
    write_config,
)
from flamingo_pytorch import flamingo_pytorch as fp_mod
from safetensors.torch import load_file, save_file, save_model

from xattn_doctor.checkpoint import open_checkpoint
from xattn_doctor.layouts import all_layouts

pytestmark = pytest.mark.family

DIM, HEADS, DIM_HEAD, LATENTS = 32, 2, 16, 4
GATED = ["layers.0.1", "layers.1.1"]
RESAMPLER = ["perceiver_resampler.layers.0.0", "perceiver_resampler.layers.1.0"]
CONFIG = {"dim": DIM, "heads": HEADS, "dim_head": DIM_HEAD, "depth": 2}


def _model(dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    torch.manual_seed(0)
    m = fp.FlamingoPaLM(dim=DIM, num_tokens=20, depth=2, dim_head=DIM_HEAD, heads=HEADS,
                        cross_attn_every=1, perceiver_num_latents=LATENTS, perceiver_depth=2,
                        img_encoder=torch.nn.Identity())
    with torch.no_grad():  # trained-looking gates, so that the gate path is exercised
        m.layers[0][1].attn_gate.fill_(0.3)
        m.layers[1][1].attn_gate.fill_(-0.6)
    return m.to(dtype).eval()


def _save(model: torch.nn.Module, folder: Path, config: dict[str, object] | None = CONFIG) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    save_model(model, str(folder / "model.safetensors"))
    if config is not None:
        write_config(folder, config)
    return folder


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    return _model()


@pytest.fixture(scope="module")
def saved(model: torch.nn.Module, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _save(model, tmp_path_factory.mktemp("flamingo_pytorch"))


def _attention_of(args: tuple[object, ...]) -> torch.Tensor | None:
    pattern = args[0]
    return args[1] if isinstance(pattern, str) and pattern.replace(" ", "").startswith(
        "...ij,...jd") else None  # type: ignore[return-value]


def test_every_block_found_none_invented(saved: Path) -> None:
    det, _ = rebuild(saved)
    assert [s.name for s in det.blocks] == GATED + RESAMPLER
    for s in det.blocks:
        assert (s.layout, s.heads, s.kv_heads, s.head_dim) == ("flamingo_pytorch", 2, 2, 16)
        assert (s.query_dim, s.context_dim, s.heads_source) == (DIM, DIM, "config")
    gated, res = det.blocks[0], det.blocks[2]
    assert gated.query_norm is not None and gated.query_norm.weight.key == "layers.0.1.attn.norm.weight"
    assert gated.gate is not None and gated.gate.param.key == "layers.0.1.attn_gate"
    assert gated.k.weight.rows == (0, 32) and gated.v.weight.rows == (32, 64)
    assert not gated.kv_includes_queries and gated.context_norm is None
    assert res.kv_includes_queries and res.gate is None
    assert res.learned_queries is not None and res.learned_queries.key == "perceiver_resampler.latents"
    assert res.context_norm is not None and res.context_norm.weight.key.endswith("norm_media.weight")
    assert res.query_norm is not None and res.query_norm.weight.key.endswith("norm_latents.weight")
    assert not det.skipped


def test_heads_without_config_follow_the_library_default(tmp_path: Path) -> None:
    torch.manual_seed(1)
    block = fp.GatedCrossAttentionBlock(dim=32, heads=2)  # dim_head defaults to 64
    save_file({f"xattn.{k}": v for k, v in block.state_dict().items()},
              str(tmp_path / "model.safetensors"))
    det, _ = rebuild(tmp_path)
    (spec,) = det.blocks
    assert (spec.name, spec.heads, spec.head_dim, spec.heads_source) == ("xattn", 2, 64, "default")


def test_gated_probabilities_and_output_match_library(model: torch.nn.Module, saved: Path) -> None:
    _, blocks = rebuild(saved)
    torch.manual_seed(2)
    x, media = torch.randn(2, 6, DIM), torch.randn(2, 1, 5, DIM)
    locations = torch.zeros(2, 6, dtype=torch.bool)
    locations[:, 0] = True  # one image before all text: every token sees all its latents
    for i, name in enumerate(GATED):
        lib = model.layers[i][1]
        with torch.no_grad(), recorded_einsum(fp_mod, _attention_of) as seen:
            attended = lib.attn(x, media, media_locations=locations)
        want = attended * lib.attn_gate.tanh() + x
        got = probs(blocks[name], x, media.flatten(1, 2))
        assert torch.allclose(got, seen[0], atol=1e-4)
        assert torch.allclose(entropy(got), entropy(seen[0]), atol=1e-4)
        assert torch.allclose(blocks[name](x, media.flatten(1, 2)), want, atol=1e-4)


def test_resampler_probabilities_and_output_match_library(model: torch.nn.Module,
                                                          saved: Path) -> None:
    _, blocks = rebuild(saved)
    torch.manual_seed(3)
    media, latents = torch.randn(2, 1, 7, DIM), torch.randn(2, 1, LATENTS, DIM)
    for i, name in enumerate(RESAMPLER):
        lib = model.perceiver_resampler.layers[i][0]
        with torch.no_grad(), recorded_einsum(fp_mod, _attention_of) as seen:
            out = lib(media, latents)
        lib_probs = seen[0][:, :, 0]  # [b, h, t, i, j] -> t = 0
        got = probs(blocks[name], latents[:, 0], media[:, 0])
        assert got.shape[-1] == 7 + LATENTS  # keys: the media, then the latents
        assert torch.allclose(got, lib_probs, atol=1e-4)
        assert torch.allclose(blocks[name](latents[:, 0], media[:, 0]), out[:, 0] + latents[:, 0],
                              atol=1e-4)


def test_learned_latents_drive_the_first_resampler_layer(model: torch.nn.Module,
                                                         saved: Path) -> None:
    _, blocks = rebuild(saved)
    blk = blocks[RESAMPLER[0]]
    assert torch.equal(blk.p("learned_queries"), model.perceiver_resampler.latents.detach())
    later = blocks[RESAMPLER[1]].spec
    assert later.learned_queries is None  # its queries are the latents after layer 0
    assert any("updated by the layers before it" in n for n in later.notes)


def test_capture_gives_what_reaches_each_block(model: torch.nn.Module, saved: Path) -> None:
    _, blocks = rebuild(saved)
    layout = next(lay for lay in all_layouts() if lay.name == "flamingo_pytorch")
    torch.manual_seed(4)
    text = torch.randint(4, 20, (2, 6))
    text[:, 0] = 3  # the media token
    with torch.no_grad(), recorded_calls(model, GATED + RESAMPLER) as calls:
        model(text, images=torch.randn(2, 1, 5, DIM))  # img_encoder is the identity
    for name in GATED + RESAMPLER:
        args, kwargs, out = calls[name]
        got = layout.capture(blocks[name].spec, args, kwargs)  # type: ignore[attr-defined]
        assert got is not None
        x, c = got["hidden_states"], got["encoder_hidden_states"]
        y = blocks[name](x, c)
        if name in RESAMPLER:
            assert torch.allclose(y, out.reshape(y.shape) + x, atol=1e-4)
        else:
            ff = model.get_submodule(name)  # the feed-forward half is gated at 0 at init
            assert float(ff.ff_gate.detach()) == 0.0 and torch.allclose(y, out, atol=1e-4)


def _scaled(saved: Path, tmp_path: Path, key: str, factor: float) -> Path:
    sd = load_file(str(saved / "model.safetensors"))
    sd[key] = sd[key] * factor
    folder = tmp_path / "edited"
    folder.mkdir()
    save_file(sd, str(folder / "model.safetensors"))
    write_config(folder, CONFIG)
    return folder


def test_scaled_query_raises_max_logit_of_that_block_only(saved: Path, tmp_path: Path) -> None:
    _, before = rebuild(saved)
    _, after = rebuild(_scaled(saved, tmp_path, "layers.1.1.attn.to_q.weight", 30.0))
    torch.manual_seed(5)
    x, c = torch.randn(2, 6, DIM), torch.randn(2, 5, DIM)
    for name in GATED + RESAMPLER:
        ratio = max_logit(after[name], x, c) / max_logit(before[name], x, c)
        assert ratio == pytest.approx(30.0, rel=1e-3) if name == "layers.1.1" else \
            ratio == pytest.approx(1.0)
    ent_before = entropy(probs(before["layers.1.1"], x, c)).mean()
    assert entropy(probs(after["layers.1.1"], x, c)).mean() < 0.5 * ent_before


def test_saturated_gate_and_nan_stay_in_their_block(saved: Path, tmp_path: Path) -> None:
    _, blocks = rebuild(_scaled(saved, tmp_path, "layers.0.1.attn_gate", 50.0))
    assert float(blocks["layers.0.1"].gate_value().detach()) == pytest.approx(1.0, abs=1e-6)
    assert float(blocks["layers.1.1"].gate_value().detach()) == pytest.approx(float(torch.tanh(
        torch.tensor(-0.6))), abs=1e-6)
    sd = load_file(str(saved / "model.safetensors"))
    sd["perceiver_resampler.layers.1.0.to_kv.weight"][40, 0] = float("nan")
    (tmp_path / "nan").mkdir()
    save_file(sd, str(tmp_path / "nan" / "model.safetensors"))
    write_config(tmp_path / "nan", CONFIG)
    _, blocks = rebuild(tmp_path / "nan")
    x, c = torch.randn(1, 3, DIM), torch.randn(1, 5, DIM)
    for name, blk in blocks.items():
        assert bool(torch.isfinite(blk(x, c)).all()) == (name != RESAMPLER[1])


def test_bfloat16_checkpoint(tmp_path: Path) -> None:
    folder = _save(_model(torch.bfloat16), tmp_path / "bf16")
    assert open_checkpoint(folder).dtype == "bfloat16"
    det, _ = rebuild(folder)
    assert [s.name for s in det.blocks] == GATED + RESAMPLER


def test_diagnose_end_to_end(saved: Path, tmp_path: Path) -> None:
    from xattn_doctor.api import diagnose

    scaled = _scaled(saved, tmp_path, "layers.1.1.attn.to_q.weight", 100.0)
    before, after = diagnose([saved, scaled])
    assert [b.name for b in before.blocks] == GATED + RESAMPLER
    by_name = {b.name: b for b in before.blocks}
    assert by_name["layers.0.1"].metrics.gate == pytest.approx(float(torch.tanh(torch.tensor(0.3))))
    assert by_name[RESAMPLER[0]].inputs.startswith("queries=learned")
    for b0, b1 in zip(before.blocks, after.blocks):
        ratio = b1.metrics.max_logit / b0.metrics.max_logit
        assert ratio == pytest.approx(100.0 if b1.name == "layers.1.1" else 1.0, rel=1e-3)
    assert {f.block for f in after.findings if f.code == "XD101"} == {"layers.1.1"}  # max logit
    assert not [f for f in before.findings if f.code == "XD101"]


def test_capture_probe_then_diagnose(model: torch.nn.Module, saved: Path, tmp_path: Path) -> None:
    capture = pytest.importorskip("xattn_doctor.live.capture", reason="capture_probe not available")
    from xattn_doctor.api import diagnose

    torch.manual_seed(6)
    text = torch.randint(4, 20, (2, 6))
    text[:, 0] = 3  # the media token first: every text token sees the image
    images = torch.randn(2, 1, 5, DIM)  # img_encoder is the identity
    with recorded_einsum(fp_mod, _attention_of) as seen:
        probe = capture.capture_probe(model, {"text": text, "images": images},
                                      tmp_path / "probe.safetensors")
    (report,) = diagnose([saved], probe=probe)
    assert [b.inputs for b in report.blocks] == ["probe"] * 4
    lib = seen[len(RESAMPLER)]  # the resampler layers run first, then layers.0.1
    gated = report.blocks[0].metrics
    assert gated.entropy_mean == pytest.approx(float(entropy(lib).mean()), abs=1e-4)
    assert gated.max_attention_weight == pytest.approx(float(lib.max()), abs=1e-4)
