"""capture_probe records what reaches each block, named as the report names it."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

import xattn_doctor
from xattn_doctor.options import Options


class Layer(nn.Module):
    """The seed playbook's StableCrossAttentionLayer."""

    def __init__(self, dim: int = 32, heads: int = 4) -> None:
        super().__init__()
        self.query_norm = nn.LayerNorm(dim)
        self.key_norm = nn.LayerNorm(dim)
        self.cross_attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.gate = nn.Parameter(torch.full((1,), 0.4))

    def forward(self, text: torch.Tensor, visual: torch.Tensor) -> torch.Tensor:
        t, v = self.query_norm(text), self.key_norm(visual)
        out, _ = self.cross_attn(t, v, v, need_weights=False)
        return text + torch.tanh(self.gate) * out


class Model(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(16, 32)
        self.vision = nn.Linear(12, 32)
        self.layers = nn.ModuleList([Layer(), Layer()])

    def forward(self, text: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
        x, c = self.embed(text), self.vision(image) * 3.0
        for layer in self.layers:
            x = layer(x, c)
        return x


def test_capture_then_diagnose_matches_the_live_forward(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = Model().train()
    text, image = torch.randn(2, 5, 16), torch.randn(2, 9, 12)
    probe = xattn_doctor.capture_probe(model, (text, image), tmp_path / "probe.safetensors")
    assert model.training  # mode restored
    assert not any(m._forward_pre_hooks for m in model.modules())  # hooks removed
    saved = load_file(str(probe))
    assert set(saved) == {f"layers.{i}.{k}" for i in (0, 1)
                          for k in ("hidden_states", "encoder_hidden_states")}
    x1 = model.layers[0](model.embed(text), model.vision(image) * 3.0)
    assert torch.allclose(saved["layers.1.hidden_states"], x1, atol=1e-6)

    save_file({k: v.detach().contiguous() for k, v in model.state_dict().items()},
              str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text('{"num_attention_heads": 4}')
    report = xattn_doctor.diagnose([tmp_path / "model.safetensors"], probe=probe,
                                   options=Options())[0]
    assert [b.name for b in report.blocks] == ["layers.0", "layers.1"]
    assert all(b.inputs == "probe" for b in report.blocks)
    # the live attention on the captured inputs gives the same entropy
    layer = model.layers[1]
    with torch.no_grad():
        t, v = layer.query_norm(x1), layer.key_norm(model.vision(image) * 3.0)
        _, w = layer.cross_attn(t, v, v, need_weights=True, average_attn_weights=False)
    ent = -(w * w.clamp_min(1e-30).log()).sum(-1).mean(dim=(0, 2))
    assert report.blocks[1].metrics.entropy_mean == __import__("pytest").approx(
        float(ent.mean()), abs=1e-4)
    assert report.blocks[1].metrics.scale_ratio_raw > 1.5  # the real features' scale shows


def test_mask_conventions_become_one_keep_mask() -> None:
    """Bool keep, 0/1 float, additive bias, torch's key_padding_mask and per-query masks."""
    from xattn_doctor.live.tap import key_mask_of as _mask

    c = torch.zeros(2, 4, 8)
    keep = torch.tensor([[1, 1, 0, 1], [1, 0, 0, 0]], dtype=torch.bool)
    bias = torch.where(keep, 0.0, -10000.0)
    assert torch.equal(_mask({"encoder_attention_mask": keep}, c), keep)
    assert torch.equal(_mask({"encoder_attention_mask": keep.float()}, c), keep)
    assert torch.equal(_mask({"encoder_attention_mask": bias[:, None, :]}, c), keep)
    assert torch.equal(_mask({"key_padding_mask": ~keep}, c), keep)
    per_query = keep[:, None, :].expand(2, 3, 4).clone()
    per_query[0, 1, 2] = True  # one query may see key 2: the key counts as valid
    expected = keep.clone()
    expected[0, 2] = True
    assert torch.equal(_mask({"mask": per_query}, c), expected)
    assert _mask({"encoder_attention_mask": torch.ones(2, 5, dtype=torch.bool)}, c) is None
