"""OpenFlamingo 2.x: a real Flamingo model (tiny LLaMA language model, the library's own
FlamingoLMMixin, GatedCrossAttentionBlocks and PerceiverResampler) saved the ways people save it,
detected and rebuilt, and checked against the library.

open_flamingo's package `__init__` imports open_clip (its factory), which it pins to an old torch;
the modules that define the model (`open_flamingo/src/{helpers,flamingo_lm,flamingo,utils}.py`)
need only torch, einops, einops_exts and transformers, so they are loaded from their files under
a private package name.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
import types
from pathlib import Path
from typing import Any

import pytest
import torch

pytest.importorskip("einops_exts", reason="open_flamingo's helpers need einops_exts")
transformers = pytest.importorskip("transformers", reason="OpenFlamingo wraps a transformers LM")
if importlib.util.find_spec("open_flamingo") is None:
    pytest.skip("open_flamingo not installed (pip install --no-deps open_flamingo)",
                allow_module_level=True)

from _block_check import (
    entropy,
    max_logit,
    probs,
    rebuild,
    recorded_calls,
    recorded_einsum,
)
from huggingface_hub import save_torch_state_dict
from safetensors.torch import load_file, save_file, save_model

from xattn_doctor.attention import RebuiltBlock
from xattn_doctor.checkpoint import open_checkpoint
from xattn_doctor.layouts import KeyIndex, ModelConfig, all_layouts, detect

pytestmark = pytest.mark.family


def _load_open_flamingo() -> types.ModuleType:
    spec = importlib.util.find_spec("open_flamingo")
    assert spec is not None and spec.origin is not None
    pkg = types.ModuleType("_open_flamingo_src")
    pkg.__path__ = [str(Path(spec.origin).parent / "src")]
    sys.modules.setdefault("_open_flamingo_src", pkg)
    for name in ("helpers", "utils", "flamingo_lm", "flamingo"):
        importlib.import_module(f"_open_flamingo_src.{name}")
    return sys.modules["_open_flamingo_src"]


OF = _load_open_flamingo()
LANG, VIS, LATENTS, DEPTH = 32, 24, 64, 6  # PerceiverResampler(dim=vis_dim): the defaults
GATED = [f"lang_encoder.model.layers.{i}.gated_cross_attn_layer" for i in range(2)]
MIRRORS = [f"lang_encoder.gated_cross_attn_layers.{i}" for i in range(2)]
RESAMPLER = [f"perceiver.layers.{i}.0" for i in range(DEPTH)]


class _Visual(torch.nn.Module):
    """A stand-in CLIP visual tower: pixels [N, C, H, W] -> (pooled, tokens [N, H*W, C])."""

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return x.mean((2, 3)), x.flatten(2).transpose(1, 2)


class _VisionEncoder(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.visual = _Visual()


def _flamingo() -> Any:
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=50, hidden_size=LANG, intermediate_size=64,
                                   num_hidden_layers=2, num_attention_heads=2,
                                   num_key_value_heads=2)
    lang = transformers.LlamaForCausalLM(cfg)
    OF.utils.extend_instance(lang, OF.flamingo_lm.FlamingoLMMixin)
    lang.set_decoder_layers_attr_name("model.layers")
    model = OF.flamingo.Flamingo(_VisionEncoder(), lang, eoc_token_id=1, media_token_id=2,
                                 vis_dim=VIS, cross_attn_every_n_layers=1)
    with torch.no_grad():
        for i, g in enumerate(model.lang_encoder.gated_cross_attn_layers):
            g.attn_gate.fill_(0.2 + 0.3 * i)
    return model.eval()


def _trainable(model: Any) -> dict[str, torch.Tensor]:
    """What OpenFlamingo's `filter_state_dict_to_trainable` keeps (the released checkpoints)."""
    drop = ("lang_encoder.old_decoder_blocks", "lang_encoder.gated_cross_attn_layers",
            "vision_encoder")
    return {k: v for k, v in model.state_dict().items() if not any(d in k for d in drop)}


@pytest.fixture(scope="module")
def model() -> Any:
    return _flamingo()


@pytest.fixture(scope="module")
def official(model: Any, tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("openflamingo")
    save_torch_state_dict(_trainable(model), folder, max_shard_size="150KB")
    return folder


def _attention_of(args: tuple[object, ...]) -> torch.Tensor | None:
    pattern = args[0]
    return args[1] if isinstance(pattern, str) and pattern.replace(" ", "").startswith(
        "...ij,...jd") else None  # type: ignore[return-value]


def test_official_checkpoint_sharded(official: Path) -> None:
    assert len(list(official.glob("*.safetensors"))) > 1
    assert len(list(official.glob("*.safetensors.index.json"))) == 1
    det, _ = rebuild(official)
    assert [s.name for s in det.blocks] == GATED + RESAMPLER
    for s in det.blocks:
        assert (s.layout, s.heads, s.kv_heads, s.head_dim, s.heads_source) == \
            ("openflamingo", 8, 8, 64, "config")
    gated, res = det.blocks[0], det.blocks[2]
    assert (gated.query_dim, gated.context_dim) == (LANG, VIS)
    assert gated.gate is not None and gated.gate.param.key == GATED[0] + ".attn_gate"
    assert gated.k.weight.key == GATED[0] + ".attn.to_kv.weight"
    assert (gated.k.weight.rows, gated.v.weight.rows) == ((0, 512), (512, 1024))
    assert (res.query_dim, res.context_dim, res.kv_includes_queries) == (VIS, VIS, True)
    assert res.learned_queries is not None and res.learned_queries.key == "perceiver.latents"
    assert all(s.learned_queries is None for s in det.blocks[3:])


def test_full_state_dict_saved_deduplicated(model: Any, tmp_path: Path) -> None:
    save_model(model, str(tmp_path / "model.safetensors"))  # keeps gated_cross_attn_layers.N
    det, _ = rebuild(tmp_path)
    assert [s.name for s in det.blocks] == MIRRORS + RESAMPLER
    assert {s.layout for s in det.blocks} == {"openflamingo"}


def test_both_names_are_one_block(model: Any, tmp_path: Path) -> None:
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    save_file(sd, str(tmp_path / "model.safetensors"))
    det, _ = rebuild(tmp_path)
    assert [s.name for s in det.blocks] == GATED + RESAMPLER
    for name, mirror in zip(GATED, MIRRORS):
        spec = next(s for s in det.blocks if s.name == name)
        assert f"{mirror}.attn.to_q.weight" in spec.extra_keys
        assert any(mirror in n for n in spec.notes)


def test_probabilities_and_outputs_match_library(model: Any, official: Path) -> None:
    _, blocks = rebuild(official)
    torch.manual_seed(1)
    x, media = torch.randn(2, 5, LANG), torch.randn(2, 1, 7, VIS)
    locations = torch.zeros(2, 5, dtype=torch.bool)
    locations[:, 0] = True  # one image, before all text: every token sees all of its latents
    for i, name in enumerate(GATED):
        lib = model.lang_encoder.gated_cross_attn_layers[i]
        with torch.no_grad(), recorded_einsum(OF.helpers, _attention_of) as seen:
            attended = lib.attn(x, media, media_locations=locations)
        got = probs(blocks[name], x, media.flatten(1, 2))
        assert torch.allclose(got, seen[0], atol=1e-4)
        assert torch.allclose(entropy(got), entropy(seen[0]), atol=1e-4)
        want = attended * lib.attn_gate.tanh() + x
        assert torch.allclose(blocks[name](x, media.flatten(1, 2)), want, atol=1e-4)
    latents = model.perceiver.latents.detach()[None, None].expand(2, 1, -1, -1)
    res = model.perceiver.layers[0][0]
    with torch.no_grad(), recorded_einsum(OF.helpers, _attention_of) as seen:
        out = res(media, latents)
    blk = blocks[RESAMPLER[0]]
    lat = blk.p("learned_queries").detach()[None].expand(2, -1, -1)
    assert torch.allclose(probs(blk, lat, media[:, 0]), seen[0][:, :, 0], atol=1e-4)
    assert torch.allclose(blk(lat, media[:, 0]), out[:, 0] + lat, atol=1e-4)


def test_media_mask_maps_to_probe_mask() -> None:
    """With only_attend_immediate_media=False a text token attends to every image before it:
    the probe's encoder_attention_mask (one row per sample) reproduces a token's attention
    when it masks the images after that token."""
    torch.manual_seed(2)
    block = OF.helpers.GatedCrossAttentionBlock(dim=LANG, dim_visual=VIS,
                                                only_attend_immediate_media=False).eval()
    sd = {f"gated_cross_attn_layers.0.{k}": v for k, v in block.state_dict().items()}
    index = {k: tuple(v.shape) for k, v in sd.items()}
    (spec,) = detect(KeyIndex(index), ModelConfig()).blocks
    blk = RebuiltBlock(spec, {r: (sd[ref.key][ref.rows[0]:ref.rows[1]] if ref.rows
                                  else sd[ref.key]) for r, ref in spec.refs()})
    x, media = torch.randn(1, 4, LANG), torch.randn(1, 2, 3, VIS)
    locations = torch.tensor([[True, False, True, False]])  # image 1, text, image 2, text
    with torch.no_grad(), recorded_einsum(OF.helpers, _attention_of) as seen:
        block.attn(x, media, media_locations=locations)
    lib = seen[0]
    first_only = torch.tensor([[True] * 3 + [False] * 3])
    ours = probs(blk, x, media.flatten(1, 2), first_only)
    assert torch.allclose(ours[:, :, :2], lib[:, :, :2], atol=1e-4)  # tokens 0-1: image 1
    ours = probs(blk, x, media.flatten(1, 2))
    assert torch.allclose(ours[:, :, 2:], lib[:, :, 2:], atol=1e-4)  # tokens 2-3: both


@pytest.mark.filterwarnings("ignore::FutureWarning")  # the library passes past_key_values
def test_capture_from_a_real_forward(model: Any, official: Path) -> None:
    _, blocks = rebuild(official)
    layout = next(lay for lay in all_layouts() if lay.name == "openflamingo")
    torch.manual_seed(3)
    ids = torch.randint(3, 50, (2, 6))
    ids[:, 0] = 2  # <image>
    names = GATED + RESAMPLER[:2]
    with torch.no_grad(), recorded_calls(model, names) as calls:
        model(torch.randn(2, 1, 1, VIS, 2, 2), ids)
    for name in names:
        args, kwargs, out = calls[name]
        got = layout.capture(blocks[name].spec, args, kwargs)  # type: ignore[attr-defined]
        assert got is not None
        x, c = got["hidden_states"], got["encoder_hidden_states"]
        y = blocks[name](x, c)
        if name in RESAMPLER:
            assert c.shape == (2, 4, VIS) and x.shape == (2, LATENTS, VIS)
            assert torch.allclose(y, out.reshape(y.shape) + x, atol=1e-4)
        else:  # the ff half adds tanh(ff_gate) * ff(...) = 0 at init
            assert c.shape == (2, LATENTS, VIS)
            assert torch.allclose(y, out, atol=1e-4)


def test_pathologies_stay_in_their_block(official: Path, tmp_path: Path) -> None:
    sd: dict[str, torch.Tensor] = {}
    for shard in official.glob("*.safetensors"):
        sd.update(load_file(str(shard)))
    sd[GATED[1] + ".attn.to_q.weight"] *= 30.0
    sd[GATED[0] + ".attn_gate"].fill_(8.0)
    save_file(sd, str(tmp_path / "model.safetensors"))
    _, before = rebuild(official)
    _, after = rebuild(tmp_path)
    torch.manual_seed(4)
    x, c = torch.randn(2, 5, LANG), torch.randn(2, 7, VIS)
    for name in GATED:
        ratio = max_logit(after[name], x, c) / max_logit(before[name], x, c)
        assert ratio == pytest.approx(30.0 if name == GATED[1] else 1.0, rel=1e-3)
    assert float(after[GATED[0]].gate_value().detach()) == pytest.approx(1.0, abs=1e-6)
    assert float(after[GATED[1]].gate_value().detach()) == pytest.approx(
        float(torch.tanh(torch.tensor(0.5))), abs=1e-6)


def test_bfloat16_checkpoint(model: Any, tmp_path: Path) -> None:
    sd = {k: v.to(torch.bfloat16) for k, v in _trainable(model).items()}
    save_torch_state_dict(sd, tmp_path)
    assert open_checkpoint(tmp_path).dtype == "bfloat16"
    det, _ = rebuild(tmp_path)
    assert [s.name for s in det.blocks] == GATED + RESAMPLER


def test_diagnose_with_a_probe_matches_library(model: Any, official: Path, tmp_path: Path) -> None:
    from xattn_doctor.api import diagnose

    torch.manual_seed(5)
    x, media = torch.randn(2, 5, LANG), torch.randn(2, 1, 7, VIS)
    save_file({"hidden_states": x, "encoder_hidden_states": media.flatten(1, 2)},
              str(tmp_path / "probe.safetensors"))
    locations = torch.zeros(2, 5, dtype=torch.bool)
    locations[:, 0] = True
    with torch.no_grad(), recorded_einsum(OF.helpers, _attention_of) as seen:
        model.lang_encoder.gated_cross_attn_layers[1].attn(x, media, media_locations=locations)
    (report,) = diagnose([official], probe=tmp_path / "probe.safetensors")
    assert [b.name for b in report.blocks] == GATED + RESAMPLER
    assert report.checkpoint.layout == "openflamingo"
    block = report.blocks[1]
    assert block.inputs == "probe" and block.gated
    assert block.metrics.entropy_mean == pytest.approx(float(entropy(seen[0]).mean()), abs=1e-4)
    assert block.metrics.max_attention_weight == pytest.approx(float(seen[0].max()), abs=1e-4)
    assert block.metrics.gate == pytest.approx(float(torch.tanh(torch.tensor(0.5))), abs=1e-6)
    assert report.blocks[2].inputs == "queries=learned, context=probe"


@pytest.mark.filterwarnings("ignore::FutureWarning")  # the library passes past_key_values
def test_capture_probe_then_diagnose(model: Any, official: Path, tmp_path: Path) -> None:
    capture = pytest.importorskip("xattn_doctor.live.capture", reason="capture_probe not available")
    from xattn_doctor.api import diagnose

    torch.manual_seed(6)
    ids = torch.randint(3, 50, (2, 6))
    ids[:, 0] = 2  # <image> first: every token sees the image's latents
    with recorded_einsum(OF.helpers, _attention_of) as seen:
        probe = capture.capture_probe(model, (torch.randn(2, 1, 1, VIS, 2, 2), ids),
                                      tmp_path / "probe.safetensors")
    (report,) = diagnose([official], probe=probe)
    assert [b.inputs for b in report.blocks] == ["probe"] * len(GATED + RESAMPLER)
    for i, block in enumerate(report.blocks[: len(GATED)]):
        lib = seen[DEPTH + i]  # the resampler's layers run first
        assert block.metrics.entropy_mean == pytest.approx(float(entropy(lib).mean()), abs=1e-4)
        assert block.metrics.max_attention_weight == pytest.approx(float(lib.max()), abs=1e-4)
    first = report.blocks[len(GATED)].metrics  # resampler layer 0: latents over media + latents
    assert first.entropy_mean == pytest.approx(float(entropy(seen[0][:, :, 0]).mean()), abs=1e-4)


@pytest.mark.filterwarnings("ignore::FutureWarning")  # the library passes past_key_values
def test_capture_probe_fits_a_checkpoint_saved_under_the_other_name(model: Any,
                                                                      tmp_path: Path) -> None:
    """A deduplicating save keeps `gated_cross_attn_layers.N`; a probe captured from the live
    model names the block `model.layers.N.gated_cross_attn_layer`. The block's alias joins
    them, so each block still runs on its own captured inputs."""
    capture = pytest.importorskip("xattn_doctor.live.capture", reason="capture_probe not available")
    from xattn_doctor.api import diagnose

    save_model(model, str(tmp_path / "model.safetensors"))
    torch.manual_seed(7)
    ids = torch.randint(3, 50, (2, 6))
    ids[:, 0] = 2
    with recorded_einsum(OF.helpers, _attention_of) as seen:
        probe = capture.capture_probe(model, (torch.randn(2, 1, 1, VIS, 2, 2), ids),
                                      tmp_path / "probe.safetensors")
    assert any(k.startswith(GATED[1] + ".") for k in load_file(str(probe)))
    (report,) = diagnose([tmp_path / "model.safetensors"], probe=probe)
    assert [b.name for b in report.blocks] == MIRRORS + RESAMPLER
    assert [b.inputs for b in report.blocks] == ["probe"] * len(MIRRORS + RESAMPLER)
    for i, block in enumerate(report.blocks[: len(MIRRORS)]):
        lib = seen[DEPTH + i]
        assert block.metrics.entropy_mean == pytest.approx(float(entropy(lib).mean()), abs=1e-4)
