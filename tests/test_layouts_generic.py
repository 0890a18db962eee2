"""The plain-PyTorch layouts: every naming of projections and norms, anywhere in a state dict."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from xattn_doctor.layouts import KeyIndex, ModelConfig, detect


def shapes(sd: dict[str, torch.Tensor]) -> KeyIndex:
    return KeyIndex({k: tuple(v.shape) for k, v in sd.items()})


def mha(prefix: str, kdim: int | None = None) -> dict[str, torch.Tensor]:
    m = nn.MultiheadAttention(32, 4, kdim=kdim, vdim=kdim, batch_first=True)
    return {f"{prefix}{k}": v for k, v in m.state_dict().items()}


def lin(out: int, inp: int, bias: bool = False) -> dict[str, torch.Tensor]:
    d = {"weight": torch.zeros(out, inp)}
    if bias:
        d["bias"] = torch.zeros(out)
    return d


def module(prefix: str, parts: dict[str, dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    return {f"{prefix}.{name}.{k}": v for name, p in parts.items() for k, v in p.items()}


@pytest.mark.parametrize(("q", "k", "v", "o"), [
    ("to_q", "to_k", "to_v", "to_out.0"), ("q_proj", "k_proj", "v_proj", "o_proj"),
    ("query", "key", "value", "out_proj"), ("wq", "wk", "wv", "wo")])
def test_separate_projection_names(q: str, k: str, v: str, o: str) -> None:
    sd = module("enc.blocks.3.cross_attn", {q: lin(32, 32), k: lin(32, 48), v: lin(32, 48),
                                            o: lin(32, 32, bias=True)})
    found = detect(shapes(sd), ModelConfig({"num_attention_heads": 4}))
    assert len(found.blocks) == 1
    b = found.blocks[0]
    assert (b.name, b.query_dim, b.context_dim, b.heads, b.heads_source) == (
        "enc.blocks.3.cross_attn", 32, 48, 4, "config")
    assert b.o is not None and b.role == "cross"


def test_packed_to_kv() -> None:
    sd = module("m.attn", {"to_q": lin(32, 32), "to_kv": lin(64, 16), "to_out": lin(32, 32)})
    b = detect(shapes(sd), ModelConfig({"heads": 4})).blocks[0]
    assert b.k.weight.rows == (0, 32) and b.v.weight.rows == (32, 64)
    assert b.context_dim == 16 and b.role == "cross"


def test_mha_packed_and_kdim_forms_in_a_bigger_state_dict() -> None:
    sd = mha("decoder.layers.7.cross_attn.") | mha("decoder.layers.8.cross_attn.", kdim=20)
    sd |= {"decoder.layers.7.query_norm.weight": torch.ones(32),
           "decoder.layers.7.query_norm.bias": torch.zeros(32),
           "decoder.layers.7.key_norm.weight": torch.ones(32),
           "decoder.layers.7.key_norm.bias": torch.zeros(32),
           "decoder.layers.7.gate": torch.zeros(1), "decoder.layers.7.temperature": torch.ones(1),
           "decoder.embed.weight": torch.zeros(100, 32)}
    found = detect(shapes(sd), ModelConfig({"num_attention_heads": 4}))
    names = [b.name for b in found.blocks]
    assert names == ["decoder.layers.7", "decoder.layers.8.cross_attn"]
    seven, eight = found.blocks
    assert seven.query_norm and seven.context_norm and seven.gate and seven.temperature
    assert seven.residual and not eight.residual
    assert eight.context_dim == 20 and eight.k.weight.key.endswith("k_proj_weight")


def test_self_attention_is_skipped_and_said() -> None:
    sd = module("l.0.self_attn", {"q_proj": lin(32, 32), "k_proj": lin(32, 32),
                                  "v_proj": lin(32, 32), "o_proj": lin(32, 32)})
    sd |= module("l.0.cross_attn", {"q_proj": lin(32, 32), "k_proj": lin(32, 32),
                                    "v_proj": lin(32, 32), "o_proj": lin(32, 32)})
    found = detect(shapes(sd), ModelConfig())
    assert [b.name for b in found.blocks] == ["l.0.cross_attn"]
    assert found.skipped[0]["name"] == "l.0.self_attn"


def test_ambiguous_block_alone_is_diagnosed_with_a_note_else_skipped() -> None:
    alone = module("l.0.attn", {"q_proj": lin(32, 32), "k_proj": lin(32, 32),
                                "v_proj": lin(32, 32), "o_proj": lin(32, 32)})
    found = detect(shapes(alone), ModelConfig())
    assert found.blocks[0].role == "ambiguous" and found.blocks[0].notes
    with_cross = alone | module("l.0.cross_attn", {"q_proj": lin(32, 32), "k_proj": lin(32, 16),
                                                   "v_proj": lin(32, 16), "o_proj": lin(32, 32)})
    found = detect(shapes(with_cross), ModelConfig())
    assert [b.name for b in found.blocks] == ["l.0.cross_attn"]
    assert [s["name"] for s in found.skipped] == ["l.0.attn"]


def test_qk_norm_per_head_and_full_width() -> None:
    base = {"q_proj": lin(32, 32), "k_proj": lin(32, 16), "v_proj": lin(32, 16),
            "o_proj": lin(32, 32)}
    per_head = module("x.cross_attn", base | {"q_norm": {"weight": torch.ones(8)},
                                              "k_norm": {"weight": torch.ones(8)}})
    b = detect(shapes(per_head), ModelConfig()).blocks[0]
    assert (b.heads, b.head_dim, b.qk_norm_per_head, b.heads_source) == (4, 8, True, "weights")
    full = module("x.cross_attn", base | {"q_norm": {"weight": torch.ones(32)},
                                          "k_norm": {"weight": torch.ones(32)}})
    b = detect(shapes(full), ModelConfig({"num_attention_heads": 2})).blocks[0]
    assert (b.heads, b.qk_norm_per_head) == (2, False)


def test_post_ln_is_recognised() -> None:
    sd = module("l.0.cross_attn", {"q_proj": lin(32, 32), "k_proj": lin(32, 16),
                                   "v_proj": lin(32, 16), "o_proj": lin(32, 32)})
    sd |= {"l.0.post_norm.weight": torch.ones(32), "l.0.post_norm.bias": torch.zeros(32)}
    b = detect(shapes(sd), ModelConfig()).blocks[0]
    assert b.post_norm is not None and b.query_norm is None and b.name == "l.0"


def test_heads_override_and_default() -> None:
    sd = mha("a.")
    found = detect(shapes(sd), ModelConfig())
    assert found.blocks[0].heads_source == "default"
    found = detect(shapes(sd), ModelConfig(), heads=2)
    assert (found.blocks[0].heads, found.blocks[0].heads_source) == (2, "cli")
    with pytest.raises(ValueError, match="--heads 5"):
        detect(shapes(sd), ModelConfig(), heads=5)


def test_nested_config_heads() -> None:
    cfg = ModelConfig({"text_config": {"num_attention_heads": 8}})
    assert cfg.get_int("num_attention_heads") == 8
    assert ModelConfig({"num_heads": True}).get_int("num_heads") is None


def test_two_attention_modules_in_one_layer_get_their_own_names() -> None:
    """A decoder layer with self- and cross-attention, each with its own norm beside it (BART,
    Whisper): the blocks are named by their modules, not both by the layer; and the decoder's
    head count is read from decoder_attention_heads."""
    lay = "model.decoder.layers.0"
    sd = {**module(f"{lay}.self_attn", {n: lin(32, 32, True) for n in
                                        ("q_proj", "k_proj", "v_proj", "out_proj")}),
          **module(f"{lay}.encoder_attn", {n: lin(32, 32, True) for n in
                                           ("q_proj", "k_proj", "v_proj", "out_proj")}),
          **module(lay, {n: {"weight": torch.ones(32), "bias": torch.zeros(32)} for n in
                         ("self_attn_layer_norm", "encoder_attn_layer_norm")})}
    found = detect(shapes(sd), ModelConfig({"decoder_attention_heads": 8,
                                            "encoder_attention_heads": 2, "d_model": 32}))
    names = [b.name for b in found.blocks] + [s["name"] for s in found.skipped]
    assert sorted(names) == [f"{lay}.encoder_attn", f"{lay}.self_attn"]
    (cross,) = found.blocks
    assert cross.name == f"{lay}.encoder_attn" and (cross.heads, cross.heads_source) == (8, "config")


def test_projection_with_an_empty_side_is_not_a_block() -> None:
    """A q weight of shape [0, 24] (a broken file) has no heads to split: that module is not
    a block, and detection goes on (it divided by a zero head width before)."""
    sd = {**module("enc.layers.0.self_attn", {"q": lin(0, 24), "k": lin(32, 24), "v": lin(32, 24),
                                              "o": lin(32, 32)}),
          **module("dec.layers.0.cross_attn", {"q_proj": lin(32, 32), "k_proj": lin(32, 48),
                                               "v_proj": lin(32, 48), "o_proj": lin(32, 32)})}
    found = detect(shapes(sd), ModelConfig({"num_attention_heads": 4}))
    assert [b.name for b in found.blocks] == ["dec.layers.0.cross_attn"]
