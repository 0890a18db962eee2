"""LoRA checkpoints: an unmerged PEFT model or an adapter alone is refused with one line naming
it (exit 2), LoRA outside the cross-attention blocks does not stop them, and a merged model is
diagnosed. Key names as peft 0.21.2 writes them (`get_peft_model(...).state_dict()`:
`<m>.base_layer.weight`, `<m>.lora_A.default.weight`; adapter files: `<m>.lora_A.weight`) and as
kohya's sd-scripts name SD adapters (`lora_unet_..._attn2_to_q.lora_down.weight`)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch import nn
from typer.testing import CliRunner

from xattn_doctor.cli import app

Q, C = 32, 24
ATTN = "base_model.model.decoder.layers.0.cross_attn"


def block(prefix: str) -> dict[str, torch.Tensor]:
    """A plain cross-attention module's weights (q from width 32, k/v from width 24)."""
    gen = torch.Generator().manual_seed(0)
    shapes = {"q_proj": (Q, Q), "k_proj": (Q, C), "v_proj": (Q, C), "o_proj": (Q, Q)}
    return {f"{prefix}.{n}.weight": torch.randn(*s, generator=gen) * 0.1 for n, s in shapes.items()}


def wrapped(sd: dict[str, torch.Tensor], module: str, adapter: str = "default") -> None:
    """Wrap `module`'s linear as PEFT does before merging (in place)."""
    w = sd.pop(f"{module}.weight")
    sd[f"{module}.base_layer.weight"] = w
    sd[f"{module}.lora_A.{adapter}.weight"] = torch.zeros(4, w.shape[1])
    sd[f"{module}.lora_B.{adapter}.weight"] = torch.zeros(w.shape[0], 4)


def diagnose(sd: dict[str, torch.Tensor], tmp_path: Path) -> tuple[int, str]:
    path = tmp_path / "model.safetensors"
    save_file(sd, str(path))
    before = sorted(p.name for p in tmp_path.iterdir())
    r = CliRunner().invoke(app, ["diagnose", str(path), "--fail-on", "never",
                                 "--heads", "4"])
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # nothing written
    assert "Traceback" not in r.output
    return r.exit_code, r.output


@pytest.mark.parametrize("modules", [("q_proj", "v_proj"), ("o_proj",)], ids=["qv", "o_only"])
def test_unmerged_peft_model_is_refused(modules: tuple[str, ...], tmp_path: Path) -> None:
    """With q/v wrapped no block is recognised; with only o_proj wrapped the block would run
    without its output projection: both are refused, saying to merge."""
    sd = block(ATTN)
    for m in modules:
        wrapped(sd, f"{ATTN}.{m}")
    code, out = diagnose(sd, tmp_path)
    assert code == 2
    assert "unmerged PEFT LoRA layers" in out and "merge_and_unload" in out
    assert len(out.strip().splitlines()) == 1


@pytest.mark.parametrize("keys", [
    [f"{ATTN}.q_proj.lora_A.weight", f"{ATTN}.q_proj.lora_B.weight"],
    ["lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_q.lora_down.weight",
     "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_q.lora_up.weight"],
], ids=["peft_adapter", "kohya_adapter"])
def test_adapter_alone_is_refused(keys: list[str], tmp_path: Path) -> None:
    sd = {k: torch.zeros(4, 4) for k in keys}
    code, out = diagnose(sd, tmp_path)
    assert code == 2 and "LoRA adapter" in out and "without the base model's weights" in out


def test_lora_elsewhere_does_not_stop_clean_blocks(tmp_path: Path) -> None:
    sd = block("decoder.layers.0.cross_attn")
    sd.update(block("text_encoder.layers.0.self_attn"))
    wrapped(sd, "text_encoder.layers.0.self_attn.q_proj")
    code, out = diagnose(sd, tmp_path)
    assert code == 0, out
    assert "decoder.layers.0.cross_attn" in out


def test_real_peft_model_refused_then_merged_diagnosed(tmp_path: Path) -> None:
    peft = pytest.importorskip("peft", reason="builds a real PEFT-wrapped model")

    class Decoder(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.cross_attn = nn.Module()
            for n, (o, i) in {"q_proj": (Q, Q), "k_proj": (Q, C), "v_proj": (Q, C),
                              "o_proj": (Q, Q)}.items():
                setattr(self.cross_attn, n, nn.Linear(i, o))

    torch.manual_seed(0)
    model = peft.get_peft_model(Decoder(), peft.LoraConfig(r=4, lora_alpha=8,
                                                           target_modules=["q_proj", "v_proj"]))
    (tmp_path / "wrapped").mkdir()
    code, out = diagnose(dict(model.state_dict()), tmp_path / "wrapped")
    assert code == 2 and "unmerged PEFT LoRA layers" in out
    (tmp_path / "merged").mkdir()
    merged = {k: v.contiguous() for k, v in model.merge_and_unload().state_dict().items()}
    code, out = diagnose(merged, tmp_path / "merged")
    assert code == 0, out
    assert "cross_attn" in out
