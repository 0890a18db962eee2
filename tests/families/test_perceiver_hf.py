"""transformers' Perceiver: PerceiverModel and PerceiverForMaskedLM saved with save_pretrained,
detected, rebuilt, and checked against the library (output_attentions)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

tf = pytest.importorskip("transformers", reason="transformers (Perceiver models) not installed")
from _block_check import entropy, max_logit, probs, rebuild, recorded_calls
from safetensors.torch import load_file, save_file

from xattn_doctor.checkpoint import open_checkpoint
from xattn_doctor.layouts import all_layouts

pytestmark = pytest.mark.family
LAYOUT = next(lay for lay in all_layouts() if lay.name == "hf_perceiver")
ENC = "encoder.cross_attention.attention"
HF_CONFIG = {"num_latents": 6, "d_latents": 32, "d_model": 24, "num_blocks": 1,
             "num_self_attends_per_block": 1, "num_self_attention_heads": 2,
             "num_cross_attention_heads": 2, "qk_channels": 16, "v_channels": 32}


@pytest.fixture(scope="module")
def hf_model() -> Any:
    torch.manual_seed(0)
    return tf.PerceiverModel(tf.PerceiverConfig(**HF_CONFIG)).eval()


@pytest.fixture(scope="module")
def hf_saved(hf_model: Any, tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("hf_perceiver")
    hf_model.save_pretrained(folder, max_shard_size="20KB")
    return folder


def test_hf_perceiver_blocks_sharded(hf_saved: Path) -> None:
    assert len(list(hf_saved.glob("*.safetensors"))) > 1
    det, _ = rebuild(hf_saved)
    (spec,) = det.blocks
    assert spec.name == ENC and spec.layout == "hf_perceiver"
    assert (spec.heads, spec.kv_heads, spec.head_dim, spec.v_head_dim) == (2, 2, 8, 16)
    assert (spec.query_dim, spec.context_dim, spec.heads_source) == (32, 24, "config")
    assert spec.learned_queries is not None and spec.learned_queries.key == "embeddings.latents"
    assert spec.context_norm is not None and spec.residual
    assert [s["name"] for s in det.skipped] == ["encoder.self_attends.0.attention"]


def test_hf_perceiver_matches_library(hf_model: Any, hf_saved: Path) -> None:
    _, blocks = rebuild(hf_saved)
    torch.manual_seed(4)
    inputs = torch.randn(2, 5, 24)
    mask = torch.ones(2, 5)
    mask[1, 3:] = 0
    with torch.no_grad(), recorded_calls(hf_model, [ENC]) as calls:
        out = hf_model(inputs, attention_mask=mask, output_attentions=True)
    args, kwargs, lib_out = calls[ENC]
    got = LAYOUT.capture(blocks[ENC].spec, args, kwargs)
    x, c, m = got["hidden_states"], got["encoder_hidden_states"], got["encoder_attention_mask"]
    assert torch.equal(m, mask.bool())
    assert torch.equal(x[0], blocks[ENC].p("learned_queries").detach())
    p = probs(blocks[ENC], x, c, m)
    assert torch.allclose(p, out.cross_attentions[0], atol=1e-4)
    assert torch.allclose(entropy(p), entropy(out.cross_attentions[0]), atol=1e-4)
    assert torch.allclose(blocks[ENC](x, c, m), lib_out[0], atol=1e-4)


def test_hf_masked_lm_decoder(tmp_path: Path) -> None:
    torch.manual_seed(5)
    cfg = tf.PerceiverConfig(num_latents=6, d_latents=32, d_model=24, num_blocks=1,
                             num_self_attends_per_block=1, num_self_attention_heads=2,
                             num_cross_attention_heads=2, vocab_size=30,
                             max_position_embeddings=10)
    model = tf.PerceiverForMaskedLM(cfg).eval()
    model.save_pretrained(tmp_path)
    det, blocks = rebuild(tmp_path)
    enc, dec = "perceiver." + ENC, "perceiver.decoder.decoding_cross_attention.attention"
    assert [s.name for s in det.blocks] == [dec, enc]  # sorted by name
    d = det.blocks[0]
    assert (d.heads, d.head_dim, d.v_head_dim, d.residual, d.heads_source) == \
        (8, 32, 3, False, "config")
    assert d.learned_queries is not None and d.learned_queries.key == \
        "perceiver.decoder.output_position_encodings.position_embeddings"
    ids = torch.randint(0, 30, (2, 10))
    with torch.no_grad(), recorded_calls(model, [enc, dec]) as calls:
        out = model(inputs=ids, output_attentions=True)
    for i, name in enumerate((enc, dec)):  # cross_attentions: the encoder's, then the decoder's
        args, kwargs, lib_out = calls[name]
        got = LAYOUT.capture(blocks[name].spec, args, kwargs)
        x, c = got["hidden_states"], got["encoder_hidden_states"]
        m = got.get("encoder_attention_mask")
        assert torch.allclose(probs(blocks[name], x, c, m), out.cross_attentions[i], atol=1e-4)
        assert torch.allclose(blocks[name](x, c, m), lib_out[0], atol=1e-4)
    sd = load_file(str(tmp_path / "model.safetensors"))
    for part in ("weight", "bias"):
        sd[f"{dec}.self.query.{part}"] *= 30.0
    save_file(sd, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    _, after = rebuild(tmp_path)
    x, c = torch.randn(1, 10, 24), torch.randn(1, 6, 32)
    assert max_logit(after[dec], x, c) / max_logit(blocks[dec], x, c) == pytest.approx(30.0, rel=1e-3)
    x2 = torch.randn(1, 6, 32)
    c2 = torch.randn(1, 10, 24)
    assert max_logit(after[enc], x2, c2) == pytest.approx(max_logit(blocks[enc], x2, c2))


def test_hf_perceiver_bfloat16(tmp_path: Path) -> None:
    torch.manual_seed(0)
    tf.PerceiverModel(tf.PerceiverConfig(**HF_CONFIG)).to(torch.bfloat16).save_pretrained(tmp_path)
    assert open_checkpoint(tmp_path).dtype == "bfloat16"
    det, _ = rebuild(tmp_path)
    assert [s.name for s in det.blocks] == [ENC]


def test_diagnose_hf_perceiver_with_probe(hf_model: Any, hf_saved: Path, tmp_path: Path) -> None:
    from xattn_doctor.api import diagnose

    torch.manual_seed(6)
    inputs = torch.randn(2, 5, 24)
    mask = torch.ones(2, 5)
    mask[1, 3:] = 0
    save_file({"encoder_hidden_states": inputs, "encoder_attention_mask": mask},
              str(tmp_path / "probe.safetensors"))
    with torch.no_grad():
        lib = hf_model(inputs, attention_mask=mask, output_attentions=True).cross_attentions[0]
    (report,) = diagnose([hf_saved], probe=tmp_path / "probe.safetensors")
    (block,) = report.blocks
    assert (block.name, block.layout, block.heads) == (ENC, "hf_perceiver", 2)
    assert block.inputs == "queries=learned, context=probe"
    m = block.metrics
    assert m.entropy_mean == pytest.approx(float(entropy(lib).mean()), abs=1e-4)
    assert m.entropy_min_head == pytest.approx(float(entropy(lib).min()), abs=1e-4)
    assert m.max_attention_weight == pytest.approx(float(lib.max()), abs=1e-4)
    assert report.checkpoint.layout == "hf_perceiver"


def test_capture_probe_then_diagnose(hf_model: Any, hf_saved: Path, tmp_path: Path) -> None:
    capture = pytest.importorskip("xattn_doctor.live.capture", reason="capture_probe not available")
    from xattn_doctor.api import diagnose

    torch.manual_seed(7)
    inputs, hf_mask = torch.randn(2, 5, 24), torch.ones(2, 5)
    hf_mask[1, 2:] = 0
    probe = capture.capture_probe(hf_model, {"inputs": inputs, "attention_mask": hf_mask},
                                  tmp_path / "hf.safetensors")
    with torch.no_grad():
        lib = hf_model(inputs, attention_mask=hf_mask, output_attentions=True).cross_attentions[0]
    (report,) = diagnose([hf_saved], probe=probe)
    (block,) = report.blocks
    assert block.inputs == "probe"
    assert block.metrics.entropy_mean == pytest.approx(float(entropy(lib).mean()), abs=1e-4)
    assert block.metrics.max_attention_weight == pytest.approx(float(lib.max()), abs=1e-4)
