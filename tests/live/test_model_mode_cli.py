"""Model mode from the command line: a MODULE:CALLABLE factory (flamingo-pytorch), the JSON
report's model-mode keys, and every bad input as one stderr line, exit 2, nothing written."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Any

import pytest

torch = pytest.importorskip("torch", reason="model mode runs torch models")
T = pytest.importorskip("transformers", minversion="5.0", reason="builds transformers models")

from safetensors.torch import save_file, save_model
from typer.testing import CliRunner

from xattn_doctor.cli import app
from xattn_doctor.live import memory

pytestmark = pytest.mark.family
runner = CliRunner()


@pytest.fixture(scope="module")
def bart(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A tiny BART saved by save_pretrained, and a batch with labels."""
    torch.manual_seed(0)
    cfg = T.BartConfig(vocab_size=64, d_model=32, encoder_layers=1, decoder_layers=2,
                       encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=64,
                       decoder_ffn_dim=64, max_position_embeddings=32)
    folder = tmp_path_factory.mktemp("bart")
    T.BartForConditionalGeneration(cfg).save_pretrained(str(folder))
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 64, (2, 6), generator=gen)
    batch = folder.parent / "bart-batch.safetensors"
    save_file({"input_ids": ids, "labels": ids.clone()}, str(batch))
    return folder, batch


def _run(*args: Any) -> Any:
    return runner.invoke(app, ["diagnose", *map(str, args)])


def _refused(result: Any, *words: str) -> None:
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("xattn-doctor: error:"), result.stderr
    for w in words:
        assert w in lines[0], lines[0]
    assert "Traceback" not in result.output


def test_json_report_has_model_mode_keys(bart: tuple[Path, Path], tmp_path: Path) -> None:
    folder, batch = bart
    out = tmp_path / "r.json"
    r = _run(folder, "--model", "auto", "--batch", batch, "--device", "cpu", "-f", "json",
             "-o", out, "--fail-on", "never")
    assert r.exit_code == 0, r.output
    doc = json.loads(out.read_text())
    rep = doc["reports"][0] if "reports" in doc else doc
    assert rep["mode"] == "model" and rep["loss_source"] == "model" and rep["loss_finite"]
    assert rep["loss"] > 0 and rep["global_grad_norm"] > 0
    assert 0 < rep["cross_attention_grad_share"] < 1
    assert [b["inputs"] for b in rep["blocks"]] == ["model", "model"]
    assert all(b["metrics"]["real_grad_norm"] > 0 for b in rep["blocks"])
    text = _run(folder, "--model", "auto", "--batch", batch, "--device", "cpu",
                "--fail-on", "never")
    assert text.exit_code == 0 and text.stderr == ""
    assert f"model mode: loss {rep['loss']:.4g} (model)" in text.stdout


def test_bad_inputs_are_one_line_and_write_nothing(bart: tuple[Path, Path], tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    folder, batch = bart
    out = tmp_path / "never.json"
    common = ("--device", "cpu", "-o", out)
    _refused(_run(folder, "--model", "auto", *common), "--batch")
    wrong = tmp_path / "wrong.safetensors"
    save_file({"input_ids": torch.ones(1, 3, dtype=torch.long),
               "pixel_values": torch.ones(1, 3)}, str(wrong))
    _refused(_run(folder, "--model", "auto", "--batch", wrong, *common), "pixel_values",
             "it takes:", "input_ids")
    ints = tmp_path / "ints.safetensors"
    save_file({"input_ids": torch.ones(1, 3, dtype=torch.long),
               "inputs_embeds": torch.ones(1, 3, 32, dtype=torch.long)}, str(ints))
    _refused(_run(folder, "--model", "auto", "--batch", ints, *common), "inputs_embeds",
             "floating")
    _refused(_run(folder, "--model", "no_such_module_xd:make", "--batch", batch, *common),
             "cannot import")
    noarch = tmp_path / "noarch"
    noarch.mkdir()
    (noarch / "model.safetensors").write_bytes((folder / "model.safetensors").read_bytes())
    cfg = json.loads((folder / "config.json").read_text())
    cfg.pop("architectures")
    (noarch / "config.json").write_text(json.dumps(cfg))
    _refused(_run(noarch, "--model", "auto", "--batch", batch, *common), "architectures")
    monkeypatch.setitem(sys.modules, "transformers", None)  # as if it were not installed
    _refused(_run(folder, "--model", "auto", "--batch", batch, *common),
             "pip install transformers")
    monkeypatch.undo()
    monkeypatch.setattr(memory, "available", lambda device: memory.Limits(ram=10 * 2**20))
    _refused(_run(folder, "--model", "auto", "--batch", batch, *common), "needs about",
             "10 MiB free", "refused before loading")
    assert not out.exists()


def test_memory_estimate_counts_weights_grads_and_margin(bart: tuple[Path, Path]) -> None:
    from xattn_doctor.checkpoint import open_checkpoint

    ckpt = open_checkpoint(bart[0])
    floats = sum(math.prod(h.tensors[k].shape) for k, h in ckpt.where.items())
    assert memory.needed_bytes(ckpt, torch.float32) == \
        2 * 4 * floats + int(0.5 * 4 * floats) + memory.MARGIN_FIXED
    need = memory.needed_bytes(ckpt, torch.float32)
    assert memory.check_fits(ckpt, torch.device("cpu"), torch.float32,
                             memory.Limits(ram=need)) == need


FACTORY = '''
import torch
from flamingo_pytorch import FlamingoPaLM

def make():
    return FlamingoPaLM(dim=32, num_tokens=20, depth=2, dim_head=16, heads=2,
                        cross_attn_every=1, perceiver_num_latents=4, perceiver_depth=2,
                        img_encoder=torch.nn.Identity())

def narrow():
    return FlamingoPaLM(dim=16, num_tokens=20, depth=2, dim_head=8, heads=2,
                        cross_attn_every=1, perceiver_num_latents=4, perceiver_depth=2,
                        img_encoder=torch.nn.Identity())
'''


def test_flamingo_pytorch_through_a_factory(tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("flamingo_pytorch", reason="flamingo-pytorch not installed")
    from xattn_doctor.live.model_mode import diagnose_model
    from xattn_doctor.options import Options

    (tmp_path / "xd_factory_fp.py").write_text(FACTORY)
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    import xd_factory_fp

    torch.manual_seed(0)
    model = xd_factory_fp.make().eval()
    with torch.no_grad():
        model.layers[0][1].attn_gate.fill_(0.3)
        model.layers[1][1].attn_gate.fill_(-0.6)
    folder = tmp_path / "fp"
    folder.mkdir()
    save_model(model, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps({"dim": 32, "heads": 2, "dim_head": 16}))
    gen = torch.Generator().manual_seed(1)
    text = torch.randint(0, 20, (2, 6), generator=gen)
    text[:, 0] = model.media_token_id  # the image comes first: every token sees its latents
    batch = {"text": text, "images": torch.randn(2, 1, 5, 32, generator=gen)}  # Identity encoder
    save_file(batch, str(tmp_path / "b.safetensors"))
    report = diagnose_model(folder, "xd_factory_fp:make", tmp_path / "b.safetensors",
                            Options(device="cpu", dtype="float32"))
    assert report.loss_source == "proxy"
    model.zero_grad(set_to_none=True)
    loss = model(**batch).float().pow(2).mean()
    loss.backward()
    assert report.loss == pytest.approx(float(loss.detach()), rel=1e-5)
    params = dict(model.named_parameters())
    gated = {b.name: b for b in report.blocks}
    assert {"layers.0.1", "layers.1.1"} <= set(gated)
    for name in ("layers.0.1", "layers.1.1"):
        m = gated[name].metrics
        assert m.real_grad_norm is not None and m.real_grad_norm > 0
        assert m.real_grad_norms is not None
        assert m.real_grad_norms.get("gate") == pytest.approx(
            float(params[f"{name}.attn_gate"].grad.norm()), rel=1e-5)
    glob = math.sqrt(sum(float(p.grad.norm()) ** 2 for p in model.parameters()
                         if p.grad is not None))
    assert report.global_grad_norm == pytest.approx(glob, rel=1e-5)
    out = tmp_path / "never.json"
    _refused(_run(folder, "--model", "xd_factory_fp:narrow", "--batch",
                  tmp_path / "b.safetensors", "--device", "cpu", "-o", out), "do not fit")
    assert not out.exists()
