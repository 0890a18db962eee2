"""perceiver-pytorch (lucidrains): Perceiver and PerceiverIO saved with safetensors (config.json:
the constructor's arguments), detected, rebuilt, and checked against the library."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

pp = pytest.importorskip("perceiver_pytorch", reason="perceiver-pytorch (lucidrains) not installed")
from _block_check import (
    entropy,
    max_logit,
    probs,
    rebuild,
    recorded_calls,
    recorded_einsum,
    write_config,
)
from safetensors.torch import load_file, save_file, save_model

from xattn_doctor.checkpoint import open_checkpoint
from xattn_doctor.layouts import all_layouts

pytestmark = pytest.mark.family
LAYOUT = next(lay for lay in all_layouts() if lay.name == "perceiver_pytorch")

LUCID = {"num_freq_bands": 2, "depth": 2, "max_freq": 4.0, "input_channels": 3,
         "input_axis": 1, "num_latents": 5, "latent_dim": 32, "cross_heads": 2,
         "latent_heads": 2, "cross_dim_head": 8, "latent_dim_head": 8, "num_classes": 3}
CONTEXT = 3 + 1 * (2 * 2 + 1)  # input channels + fourier features
CROSS = ["layers.0.cross_attn", "layers.1.cross_attn"]


@pytest.fixture(scope="module")
def lucid() -> torch.nn.Module:
    torch.manual_seed(0)
    return pp.Perceiver(**LUCID).eval()


@pytest.fixture(scope="module")
def lucid_saved(lucid: torch.nn.Module, tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("perceiver_pytorch")
    save_model(lucid, str(folder / "model.safetensors"))
    write_config(folder, LUCID)  # the constructor's arguments, as people keep them
    return folder


def _lucid_attention(args: tuple[Any, ...]) -> torch.Tensor | None:
    pattern = args[-1]
    return args[0] if isinstance(pattern, str) and pattern.replace(" ", "").startswith(
        "bij,bjd") else None


def test_perceiver_pytorch_blocks(lucid_saved: Path) -> None:
    det, _ = rebuild(lucid_saved)
    assert [s.name for s in det.blocks] == CROSS
    for s in det.blocks:
        assert (s.layout, s.heads, s.kv_heads, s.head_dim, s.heads_source) == \
            ("perceiver_pytorch", 2, 2, 8, "config")
        assert (s.query_dim, s.context_dim, s.residual) == (32, CONTEXT, True)
        assert s.context_norm is not None and s.context_norm.weight.key.endswith("norm_context.weight")
        assert s.o is not None and s.o.bias is not None
    assert det.blocks[0].learned_queries is not None and det.blocks[0].learned_queries.key == "latents"
    assert det.blocks[1].learned_queries is None
    assert sorted(s["name"] for s in det.skipped) == ["layers.0.self_attns.0.0",
                                                      "layers.1.self_attns.0.0"]


def test_perceiver_pytorch_heads_default_without_config(tmp_path: Path) -> None:
    torch.manual_seed(1)
    model = pp.Perceiver(num_freq_bands=2, depth=1, max_freq=4.0, input_channels=3,
                         input_axis=1, num_latents=4, latent_dim=32, num_classes=2)
    save_model(model, str(tmp_path / "model.safetensors"))
    det, _ = rebuild(tmp_path)
    (spec,) = det.blocks  # cross_heads=1, cross_dim_head=64: the library defaults
    assert (spec.heads, spec.head_dim, spec.heads_source) == (1, 64, "default")


def test_perceiver_pytorch_matches_library_with_mask(lucid: torch.nn.Module,
                                                     lucid_saved: Path) -> None:
    _, blocks = rebuild(lucid_saved)
    torch.manual_seed(2)
    data = torch.randn(2, 7, 3)
    mask = torch.ones(2, 7, dtype=torch.bool)
    mask[1, 4:] = False
    with torch.no_grad(), recorded_calls(lucid, CROSS) as calls, \
            recorded_einsum(pp.perceiver_pytorch, _lucid_attention) as seen:
        lucid(data, mask=mask)
    cross_probs = [seen[0], seen[2]]  # cross, self, cross, self
    for name, lib in zip(CROSS, cross_probs):
        args, kwargs, out = calls[name]
        got = LAYOUT.capture(blocks[name].spec, args, kwargs)
        x, c, m = got["hidden_states"], got["encoder_hidden_states"], got["encoder_attention_mask"]
        assert torch.equal(m, mask) and c.shape == (2, 7, CONTEXT)
        p = probs(blocks[name], x, c, m)
        assert torch.allclose(p, lib.reshape(p.shape), atol=1e-4)
        assert torch.allclose(entropy(p), entropy(lib.reshape(p.shape)), atol=1e-4)
        assert torch.allclose(blocks[name](x, c, m), out + x, atol=1e-4)


def test_perceiver_io_decoder_has_no_residual(tmp_path: Path) -> None:
    torch.manual_seed(3)
    io = pp.PerceiverIO(depth=1, dim=24, queries_dim=16, num_latents=5, latent_dim=32,
                        cross_heads=2, latent_heads=2, cross_dim_head=8, latent_dim_head=8,
                        logits_dim=3).eval()
    save_model(io, str(tmp_path / "model.safetensors"))
    write_config(tmp_path, {"cross_heads": 2, "latent_heads": 2})
    det, blocks = rebuild(tmp_path)
    assert [s.name for s in det.blocks] == ["cross_attend_block.cross_attn", "decoder_cross_attn"]
    enc, dec = det.blocks
    assert enc.learned_queries is not None and enc.residual
    assert dec.learned_queries is None and not dec.residual
    assert (dec.query_dim, dec.context_dim) == (16, 32)
    names = [s.name for s in det.blocks]
    with torch.no_grad(), recorded_calls(io, names) as calls:
        io(torch.randn(2, 6, 24), queries=torch.randn(3, 16))
    for name in names:
        args, kwargs, out = calls[name]
        got = LAYOUT.capture(blocks[name].spec, args, kwargs)
        x, c = got["hidden_states"], got["encoder_hidden_states"]
        want = out + x if blocks[name].spec.residual else out
        assert torch.allclose(blocks[name](x, c), want, atol=1e-4)


def test_perceiver_pytorch_pathology_in_one_block(lucid_saved: Path, tmp_path: Path) -> None:
    sd = load_file(str(lucid_saved / "model.safetensors"))
    sd["layers.1.cross_attn.fn.to_q.weight"] *= 30.0
    save_file(sd, str(tmp_path / "model.safetensors"))
    write_config(tmp_path, LUCID)
    _, before = rebuild(lucid_saved)
    _, after = rebuild(tmp_path)
    x, c = torch.randn(2, 5, 32), torch.randn(2, 7, CONTEXT)
    for name in CROSS:
        ratio = max_logit(after[name], x, c) / max_logit(before[name], x, c)
        assert ratio == pytest.approx(30.0 if name == CROSS[1] else 1.0, rel=1e-3)


def test_perceiver_pytorch_bfloat16(tmp_path: Path) -> None:
    torch.manual_seed(0)
    save_model(pp.Perceiver(**LUCID).to(torch.bfloat16), str(tmp_path / "model.safetensors"))
    write_config(tmp_path, LUCID)
    assert open_checkpoint(tmp_path).dtype == "bfloat16"
    det, _ = rebuild(tmp_path)
    assert [s.name for s in det.blocks] == CROSS


def test_diagnose_perceiver_pytorch_flags_the_scaled_block(lucid_saved: Path,
                                                           tmp_path: Path) -> None:
    from xattn_doctor.api import diagnose

    sd = load_file(str(lucid_saved / "model.safetensors"))
    sd["layers.1.cross_attn.fn.to_q.weight"] *= 30.0
    save_file(sd, str(tmp_path / "model.safetensors"))
    write_config(tmp_path, LUCID)
    before, after = diagnose([lucid_saved, tmp_path])
    for b0, b1 in zip(before.blocks, after.blocks):
        ratio = b1.metrics.max_logit / b0.metrics.max_logit
        assert ratio == pytest.approx(30.0 if b1.name == CROSS[1] else 1.0, rel=1e-3)
    assert {f.block for f in after.findings if f.code == "XD101"} == {CROSS[1]}  # max logit
    assert not [f for f in before.findings if f.code == "XD101"]


def test_capture_probe_then_diagnose(lucid: torch.nn.Module, lucid_saved: Path,
                                     tmp_path: Path) -> None:
    capture = pytest.importorskip("xattn_doctor.live.capture", reason="capture_probe not available")
    from xattn_doctor.api import diagnose

    torch.manual_seed(7)
    data, mask = torch.randn(2, 7, 3), torch.ones(2, 7, dtype=torch.bool)
    mask[0, 5:] = False
    with recorded_einsum(pp.perceiver_pytorch, _lucid_attention) as seen:
        probe = capture.capture_probe(lucid, {"data": data, "mask": mask},
                                      tmp_path / "lucid.safetensors")
    (report,) = diagnose([lucid_saved], probe=probe)
    for block, lib in zip(report.blocks, (seen[0], seen[2])):
        assert block.inputs == "probe"
        p = lib.reshape(2, 2, *lib.shape[1:])
        assert block.metrics.entropy_mean == pytest.approx(float(entropy(p).mean()), abs=1e-4)
