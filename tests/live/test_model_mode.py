"""Model mode against the libraries: tiny models built from config, saved with save_pretrained,
run by `diagnose --model auto --batch`; each block's attention statistics must equal those of
the library's own attention probabilities, its real gradient norms those of `param.grad` after
the library's own `loss.backward()`, and the loss the library's."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest

torch = pytest.importorskip("torch", reason="model mode runs torch models")
T = pytest.importorskip("transformers", minversion="5.0", reason="builds transformers models")

from safetensors.torch import save_file

from xattn_doctor.checkpoint import open_checkpoint
from xattn_doctor.layouts import detect
from xattn_doctor.live.model_mode import diagnose_model
from xattn_doctor.options import Options

pytestmark = pytest.mark.family
B, LQ, LK = 2, 5, 7


def _save(model: Any, batch: dict[str, Any], folder: Path) -> tuple[Path, Path]:
    model.save_pretrained(str(folder))
    path = folder.parent / f"{folder.name}-batch.safetensors"
    save_file({k: v.contiguous() for k, v in batch.items()}, str(path))
    return folder, path


def _reference_entropy(p: Any) -> list[float]:
    """Per head: mean over batch and queries of the row entropy of the library's probabilities."""
    ent = -torch.special.xlogy(p, p).sum(-1)  # [B, H, Lq]
    return [float(v) for v in ent.mean(dim=(0, 2))]


def _check(report: Any, folder: Path, model: Any, batch: dict[str, Any],
           attentions: dict[str, Any]) -> None:
    """Compare the report with the library's own run (already done: grads in `.grad`)."""
    assert report.mode == "model" and report.loss_source == "model" and report.loss_finite
    specs = {s.name: s for s in detect(open_checkpoint(folder).index,
                                       open_checkpoint(folder).config).blocks}
    params = dict(model.named_parameters())
    assert {b.name for b in report.blocks} == set(attentions)
    compared = 0
    for block in report.blocks:
        assert block.inputs == "model"
        m, p = block.metrics, attentions[block.name].detach().double()
        assert m.head_entropy == pytest.approx(_reference_entropy(p), abs=1e-4)
        assert m.max_attention_weight == pytest.approx(float(p.max()), abs=1e-4)
        for role, ref in specs[block.name].refs():
            param = params.get(ref.key)
            if param is None or param.grad is None:
                continue
            g = param.grad if ref.rows is None else param.grad[ref.rows[0]:ref.rows[1]]
            assert m.real_grad_norms is not None
            assert m.real_grad_norms[role] == pytest.approx(float(g.norm()), rel=1e-5, abs=1e-7)  # k bias: ~0
            compared += 1
    assert compared >= 4 * len(report.blocks)
    glob = math.sqrt(sum(float(q.grad.norm()) ** 2 for q in model.parameters()
                         if q.grad is not None))
    assert report.global_grad_norm == pytest.approx(glob, rel=1e-5)
    assert 0 < report.cross_attention_grad_share < 1


def _library_run(model: Any, batch: dict[str, Any]) -> Any:
    model.zero_grad(set_to_none=True)
    out = model(**batch, output_attentions=True)
    out.loss.backward()
    return out


def _seq2seq_batch(vocab: int) -> dict[str, Any]:
    gen = torch.Generator().manual_seed(1)
    return {"input_ids": torch.randint(3, vocab, (B, LK), generator=gen),
            "attention_mask": torch.ones(B, LK, dtype=torch.long),
            "decoder_input_ids": torch.randint(3, vocab, (B, LQ), generator=gen),
            "labels": torch.randint(3, vocab, (B, LQ), generator=gen)}


@pytest.mark.parametrize("family", ["bart", "t5"])
def test_seq2seq_matches_the_library(family: str, tmp_path: Path) -> None:
    torch.manual_seed(0)
    if family == "bart":
        cfg = T.BartConfig(vocab_size=64, d_model=32, encoder_layers=1, decoder_layers=2,
                           encoder_attention_heads=4, decoder_attention_heads=4,
                           encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=32,
                           init_std=0.2)
        model, prefix = T.BartForConditionalGeneration(cfg), "model.decoder.layers.{}.encoder_attn"
    else:
        cfg = T.T5Config(vocab_size=64, d_model=32, d_kv=8, d_ff=64, num_layers=1,
                         num_decoder_layers=2, num_heads=4, decoder_start_token_id=0)
        model, prefix = T.T5ForConditionalGeneration(cfg), "decoder.block.{}.layer.1"
    model.set_attn_implementation("eager")
    model.eval()
    batch = _seq2seq_batch(64)
    folder, batch_path = _save(model, batch, tmp_path / family)
    report = diagnose_model(folder, "auto", batch_path, Options(device="cpu", dtype="float32"))
    out = _library_run(model, batch)
    assert report.loss == pytest.approx(float(out.loss.detach()), rel=1e-5)
    names = [b.name for b in report.blocks]
    assert len(names) == 2
    _check(report, folder, model, batch, dict(zip(names, out.cross_attentions, strict=True)))
    assert names == [prefix.format(i) for i in range(2)]
