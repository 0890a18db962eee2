"""LLaVA and Qwen2-VL have no cross-attention: nothing is diagnosed, and the message says why.
Idefics2 is not explained away: its Perceiver resampler is cross-attention (test_idefics2.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

torch = pytest.importorskip("torch", reason="the VLM family tests build models with torch")
transformers = pytest.importorskip(
    "transformers", reason="the VLM family tests build LLaVA and Qwen2-VL with transformers")

from xattn_doctor.checkpoint import open_checkpoint
from xattn_doctor.layouts import KeyIndex, ModelConfig, detect
from xattn_doctor.layouts._nocross import explain_no_blocks

pytestmark = pytest.mark.family

TEXT = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=100)


def _llava() -> Any:
    vision = transformers.CLIPVisionConfig(hidden_size=32, intermediate_size=64,
                                           num_hidden_layers=1, num_attention_heads=4,
                                           image_size=28, patch_size=14, projection_dim=32)
    cfg = transformers.LlavaConfig(vision_config=vision, text_config=transformers.LlamaConfig(
        **TEXT), image_token_index=99)
    return transformers.LlavaForConditionalGeneration(cfg)


def _qwen2_vl() -> Any:
    cfg = transformers.Qwen2VLConfig(
        text_config=dict(TEXT, rope_scaling={"type": "mrope", "mrope_section": [1, 1, 2]}),
        vision_config=dict(depth=1, embed_dim=32, hidden_size=32, num_heads=4, mlp_ratio=2,
                           patch_size=14, spatial_merge_size=2, temporal_patch_size=2))
    return transformers.Qwen2VLForConditionalGeneration(cfg)


@pytest.mark.parametrize(("build", "family", "model_type"), [
    (_llava, "LLaVA", "llava"),
    (_qwen2_vl, "Qwen2-VL", "qwen2_vl"),
])
def test_concatenation_vlm_has_no_cross_attention(build: Any, family: str, model_type: str,
                                                  tmp_path: Path) -> None:
    torch.manual_seed(0)
    build().save_pretrained(tmp_path)
    ckpt = open_checkpoint(tmp_path)
    assert any(".self_attn.q_proj." in k for k in ckpt.index.shapes)
    det = detect(ckpt.index, ckpt.config)
    assert det.blocks == []  # no self-attention claimed as cross-attention
    assert all(s["reason"].startswith("self-attention") for s in det.skipped)
    message = explain_no_blocks(ckpt.index, ckpt.config, det.tried)
    assert "\n" not in message
    assert message.startswith("no cross-attention:")
    assert f"a {family} (model_type '{model_type}')" in message
    assert "layouts tried: " + ", ".join(det.tried) in message
    assert "blocks.include" in message


@pytest.mark.parametrize(("key", "style"), [
    ("multi_modal_projector.linear_1.weight", "LLaVA-style"),
    ("model.visual.merger.mlp.0.weight", "Qwen-VL-style"),
    ("mm_projector.0.weight", "LLaVA-style"),
])
def test_recognised_from_keys_without_config(key: str, style: str) -> None:
    index = KeyIndex({key: (32, 64), "model.layers.0.self_attn.q_proj.weight": (32, 32)})
    message = explain_no_blocks(index, ModelConfig(), ["generic"])
    assert message.startswith("no cross-attention:") and style in message


def test_architecture_name_recognised() -> None:
    config = ModelConfig({"architectures": ["PaliGemmaForConditionalGeneration"]})
    assert "PaliGemma" in explain_no_blocks(KeyIndex({}), config, [])


@pytest.mark.parametrize("config", [
    {"model_type": "mllama"},  # has cross-attention: never explained away
    {"model_type": "idefics2"},  # its Perceiver resampler is cross-attention
    {"architectures": ["Idefics2ForConditionalGeneration"]},
    {"model_type": "llama"},
    {},
])
def test_other_checkpoints_get_the_generic_message(config: dict[str, Any]) -> None:
    index = KeyIndex({"layers.0.self_attn.q_proj.weight": (32, 32)})
    if config.get("model_type") == "mllama":
        index.shapes["multi_modal_projector.weight"] = (32, 64)
    message = explain_no_blocks(index, ModelConfig(config), ["mllama", "generic"])
    assert message.startswith("no cross-attention block recognised (layouts tried: mllama, "
                              "generic)")
    assert "blocks.include" in message and "\n" not in message


def test_cross_attention_keys_are_not_explained_away() -> None:
    index = KeyIndex({"multi_modal_projector.weight": (32, 64),
                      "layers.0.cross_attn.wq.weight": (32, 32)})
    assert explain_no_blocks(index, ModelConfig(), []).startswith(
        "no cross-attention block recognised")


def test_idefics2_resampler_keys_are_not_explained_away() -> None:
    index = KeyIndex({"model.connector.modality_projection.down_proj.weight": (32, 64)})
    assert "Idefics3-style" in explain_no_blocks(index, ModelConfig(), [])
    index.shapes["model.connector.perceiver_resampler.latents"] = (4, 32)
    assert explain_no_blocks(index, ModelConfig(), []).startswith(
        "no cross-attention block recognised")


def test_cli_exits_2_with_one_line_naming_the_family(tmp_path: Path) -> None:
    typer_testing = pytest.importorskip("typer.testing", reason="the CLI is built with typer")
    from xattn_doctor.cli import app

    torch.manual_seed(0)
    _llava().save_pretrained(tmp_path)
    result = typer_testing.CliRunner().invoke(app, ["diagnose", str(tmp_path)])
    assert result.exit_code == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "no cross-attention" in lines[0] and "LLaVA" in lines[0]
    assert str(tmp_path) in lines[0]
