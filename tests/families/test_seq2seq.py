"""Encoder-decoder cross-attention (BART, mBART, Whisper, T5, Pix2Struct), checked against
transformers' own forward pass: the decoder layer's cross-attention sub-layer is hooked, and
the rebuilt block must give the library's probabilities and the sub-layer's output."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.family
torch = pytest.importorskip("torch", reason="the family tests build real models with torch")
T = pytest.importorskip("transformers", minversion="5.0",
                        reason="the encoder-decoder tests build models with transformers>=5")

import _hf_family as H

from xattn_doctor.layouts import all_layouts
from xattn_doctor.layouts._base import parent

B, LQ, LK = 2, 5, 7
BART = dict(vocab_size=64, d_model=32, encoder_layers=1, decoder_layers=2,
            encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=64,
            decoder_ffn_dim=64, max_position_embeddings=32, init_std=0.2)


@dataclass(frozen=True)
class Family:
    """How one library model is built, run, and what its blocks should look like."""

    name: str
    build: Callable[[], Any]
    blocks: tuple[str, ...]
    style: str  # "post" (norm after the residual), "pre" (LayerNorm first), "t5" (RMS first)
    heads: int
    head_dim: int
    scale: float
    run: Callable[[Any, Any], Any]  # (model, encoder key mask) -> library output


def _shape_norms(model: Any) -> Any:
    """Seeded, eager, eval; norms given gains and biases away from 1 and 0."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name and p.dim() == 1:
                p.copy_(torch.rand_like(p) + 0.5 if name.endswith("weight")
                        else torch.randn_like(p) * 0.1)
    model.set_attn_implementation("eager")
    return model.eval()


def _seeded(make: Callable[[], Any]) -> Callable[[], Any]:
    def build() -> Any:
        torch.manual_seed(0)
        return _shape_norms(make())
    return build


def _text_run(model: Any, mask: Any) -> Any:
    gen = torch.Generator().manual_seed(1)
    return model(input_ids=torch.randint(3, 64, (B, LK), generator=gen), attention_mask=mask,
                 decoder_input_ids=torch.randint(3, 64, (B, LQ), generator=gen),
                 output_attentions=True)


def _whisper_run(model: Any, mask: Any) -> Any:
    gen = torch.Generator().manual_seed(1)  # the encoder halves 2 * LK frames to LK
    return model(input_features=torch.randn(B, 8, 2 * LK, generator=gen),
                 decoder_input_ids=torch.randint(3, 64, (B, LQ), generator=gen),
                 output_attentions=True)


def _pix2struct_run(model: Any, mask: Any) -> Any:
    gen = torch.Generator().manual_seed(1)
    patches = torch.randn(B, LK, 14, generator=gen)
    patches[:, :, 0], patches[:, :, 1] = torch.arange(LK) // 4, torch.arange(LK) % 4
    return model(flattened_patches=patches, attention_mask=mask,
                 decoder_input_ids=torch.randint(3, 64, (B, LQ), generator=gen),
                 output_attentions=True)


def _whisper() -> Any:
    return T.WhisperForConditionalGeneration(T.WhisperConfig(
        vocab_size=64, d_model=32, encoder_layers=1, decoder_layers=2, encoder_attention_heads=4,
        decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64, num_mel_bins=8,
        max_source_positions=LK, max_target_positions=16, pad_token_id=0, bos_token_id=1,
        eos_token_id=2, decoder_start_token_id=1, init_std=0.2))


def _t5() -> Any:  # inner width 3 * 8 = 24 differs from d_model 32
    return T.T5ForConditionalGeneration(T.T5Config(
        vocab_size=64, d_model=32, d_kv=8, num_heads=3, d_ff=64, num_layers=1,
        num_decoder_layers=2, layer_norm_epsilon=1e-5, decoder_start_token_id=0))


def _pix2struct() -> Any:
    return T.Pix2StructForConditionalGeneration(T.Pix2StructConfig(
        text_config=dict(hidden_size=32, d_kv=8, num_heads=4, num_layers=2, d_ff=64,
                         vocab_size=64),
        vision_config=dict(hidden_size=32, patch_embed_hidden_size=12, d_kv=8,
                           num_attention_heads=4, num_hidden_layers=1, d_ff=64, seq_len=16)))


BART_BLOCKS = tuple(f"model.decoder.layers.{i}.encoder_attn" for i in range(2))
FAMILIES = {f.name: f for f in (
    Family("bart", _seeded(lambda: T.BartForConditionalGeneration(T.BartConfig(**BART))),
           BART_BLOCKS, "post", 4, 8, 8 ** -0.5, _text_run),
    Family("mbart", _seeded(lambda: T.MBartForConditionalGeneration(T.MBartConfig(**BART))),
           BART_BLOCKS, "pre", 4, 8, 8 ** -0.5, _text_run),
    Family("whisper", _seeded(_whisper), BART_BLOCKS, "pre", 4, 8, 8 ** -0.5, _whisper_run),
    Family("t5", _seeded(_t5), tuple(f"decoder.block.{i}.layer.1.EncDecAttention"
                                     for i in range(2)), "t5", 3, 8, 1.0, _text_run),
    Family("pix2struct", _seeded(_pix2struct),
           tuple(f"decoder.layer.{i}.encoder_decoder_attention.attention" for i in range(2)),
           "t5", 4, 8, 1.0, _pix2struct_run),
)}


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], tuple[Any, Path]]:
    """name -> (live model, folder saved by save_pretrained), built once per module."""
    cache: dict[str, tuple[Any, Path]] = {}

    def get(name: str) -> tuple[Any, Path]:
        if name not in cache:
            model = FAMILIES[name].build()
            cache[name] = model, H.save(model, tmp_path_factory.mktemp(name), shard="200MB")
        return cache[name]
    return get


def _key_mask(fam: Family) -> Any:
    if fam.name == "whisper":
        return None  # Whisper's decoder attends to every encoder frame
    mask = torch.ones(B, LK, dtype=torch.long)
    mask[1, LK - 2:] = 0
    return mask


def _points(fam: Family, block: str) -> tuple[str, str, str]:
    """(module whose input is the query stream, module called with the encoder output,
    module whose output gives the sub-layer's output) for one block."""
    if fam.style == "t5":
        return parent(block), parent(block), parent(block)
    norm = f"{parent(block)}.encoder_attn_layer_norm"
    return (block, block, norm) if fam.style == "post" else (norm, block, block)


def _record(model: Any, fam: Family, mask: Any) -> tuple[Any, dict[str, dict[str, Any]]]:
    """Run the library once; per block: x, c and the sub-layer's output y."""
    seen: dict[str, dict[str, Any]] = {b: {} for b in fam.blocks}
    hooks = []
    for block in fam.blocks:
        x_at, c_at, y_at = _points(fam, block)
        rec = seen[block]

        def pre_x(m: Any, a: Any, kw: Any, rec: dict[str, Any] = rec) -> None:
            rec.setdefault("x", kw.get("hidden_states", a[0] if a else None))

        def pre_c(m: Any, a: Any, kw: Any, rec: dict[str, Any] = rec) -> None:
            rec.setdefault("c", kw["key_value_states"])

        def post_y(m: Any, a: Any, kw: Any, out: Any, rec: dict[str, Any] = rec) -> None:
            rec.setdefault("y", out[0] if isinstance(out, tuple) else out)

        hooks += [model.get_submodule(x_at).register_forward_pre_hook(pre_x, with_kwargs=True),
                  model.get_submodule(c_at).register_forward_pre_hook(pre_c, with_kwargs=True),
                  model.get_submodule(y_at).register_forward_hook(post_y, with_kwargs=True)]
    try:
        with torch.no_grad():
            out = fam.run(model, mask)
    finally:
        for h in hooks:
            h.remove()
    if fam.style == "pre":  # the attention module's output: add the residual
        for rec in seen.values():
            rec["y"] = rec["x"] + rec["y"]
    return out, seen


@pytest.mark.parametrize("name", FAMILIES)
def test_every_cross_block_found_none_invented(store: Any, name: str) -> None:
    fam = FAMILIES[name]
    _, path = store(name)
    _, det = H.detect_dir(path)
    assert tuple(b.name for b in det.blocks) == fam.blocks
    for b in det.blocks:
        assert (b.layout, b.role, b.heads, b.kv_heads, b.head_dim, b.heads_source) == \
            ("hf_seq2seq", "cross", fam.heads, fam.heads, fam.head_dim, "config")
        assert b.softmax_scale == pytest.approx(fam.scale) and b.residual and b.notes == ()
        norm = b.post_norm if fam.style == "post" else b.query_norm
        other = b.query_norm if fam.style == "post" else b.post_norm
        assert norm is not None and other is None and b.context_norm is None
        kind, eps = ("rms", 1e-5 if name == "t5" else 1e-6) if fam.style == "t5" else \
            ("layer", 1e-5)
        assert (norm.kind, norm.eps, norm.width, norm.bias is None) == \
            (kind, eps, 32, kind == "rms")
        assert b.o is not None and b.query_dim == b.context_dim == 32
    assert not any("self" in b.name.lower() for b in det.blocks)
    assert any("self" in s["name"].lower() and s["reason"].startswith("self-attention")
               for s in det.skipped)


@pytest.mark.parametrize("name", FAMILIES)
def test_probabilities_and_output_match_library(store: Any, name: str) -> None:
    fam = FAMILIES[name]
    model, path = store(name)
    mask = _key_mask(fam)
    out, seen = _record(model, fam, mask)
    ckpt, det = H.detect_dir(path)
    keep = mask.bool() if mask is not None else None
    worst = 0.0
    for layer, spec in enumerate(det.blocks):
        rec, blk = seen[spec.name], H.rebuild(ckpt, spec)
        assert rec["x"].shape == (B, LQ, 32) and rec["c"].shape == (B, LK, 32)
        want = out.cross_attentions[layer]
        assert want.max() > 3 / LK  # far from uniform: a wrong scale or norm would show
        got = H.probs(blk, rec["x"], rec["c"], keep)
        torch.testing.assert_close(got, want, atol=1e-4, rtol=0)
        with torch.no_grad():
            y = blk(rec["x"], rec["c"], keep)
        torch.testing.assert_close(y, rec["y"], atol=1e-4, rtol=0)
        worst = max(worst, float((got - want).abs().max()), float((y - rec["y"]).abs().max()))
    print(f"{name}: max |rebuilt - library| = {worst:.2e}")


@pytest.mark.parametrize("name", ["bart", "mbart", "t5", "pix2struct"])
def test_capture_probe_records_the_sublayer_inputs(store: Any, name: str,
                                                   tmp_path: Path) -> None:
    """capture_probe hooks the modules the layout names: the query stream before any norm."""
    from safetensors.torch import load_file

    import xattn_doctor

    fam = FAMILIES[name]
    model, _ = store(name)
    mask = _key_mask(fam)
    _, seen = _record(model, fam, mask)
    gen = torch.Generator().manual_seed(1)
    inputs: dict[str, Any] = {"attention_mask": mask}
    if name == "pix2struct":
        patches = torch.randn(B, LK, 14, generator=gen)
        patches[:, :, 0], patches[:, :, 1] = torch.arange(LK) // 4, torch.arange(LK) % 4
        inputs["flattened_patches"] = patches
    else:
        inputs["input_ids"] = torch.randint(3, 64, (B, LK), generator=gen)
    inputs["decoder_input_ids"] = torch.randint(3, 64, (B, LQ), generator=gen)
    probe = load_file(str(xattn_doctor.capture_probe(model, inputs, tmp_path / "p.safetensors")))
    for block in fam.blocks:
        torch.testing.assert_close(probe[f"{block}.hidden_states"], seen[block]["x"])
        torch.testing.assert_close(probe[f"{block}.encoder_hidden_states"], seen[block]["c"])
        assert probe[f"{block}.encoder_attention_mask"].tolist() == mask.bool().tolist()


def test_fsmt_capture_reads_time_major_inputs(tmp_path: Path) -> None:
    """FSMT's attention takes (time, batch, width) tensors and a padding mask (True = pad)."""
    layout = next(lay for lay in all_layouts() if lay.name == "hf_seq2seq")
    x, c = torch.randn(LQ, B, 32), torch.randn(LK, B, 32)
    pad = torch.zeros(B, LK, dtype=torch.bool)
    pad[0, -1] = True
    got = layout.capture(None, (), {"query": x, "key": c, "key_padding_mask": pad})  # type: ignore[attr-defined]
    assert torch.equal(got["hidden_states"], x.transpose(0, 1))
    assert torch.equal(got["encoder_hidden_states"], c.transpose(0, 1))
    assert torch.equal(got["encoder_attention_mask"], ~pad)


def test_rms_norm_equals_t5_layer_norm_bitwise() -> None:
    """T5LayerNorm: variance in float32, no mean, no bias, cast back for half weights."""
    from xattn_doctor.attention import RebuiltBlock
    from xattn_doctor.layouts._base import BlockSpec, Linear, Norm, TensorRef

    t5_norm = T.models.t5.modeling_t5.T5LayerNorm(32, eps=1e-6)
    spec = BlockSpec(name="", layout="hf_seq2seq", heads=1, kv_heads=1, head_dim=32,
                     query_dim=32, context_dim=32, q=Linear(TensorRef("q")),
                     k=Linear(TensorRef("k")), v=Linear(TensorRef("v")), o=None,
                     query_norm=Norm("rms", 32, TensorRef("n"), eps=1e-6))
    for dtype in (torch.float32, torch.bfloat16):
        torch.manual_seed(0)
        weight, x = torch.rand(32) + 0.5, torch.randn(3, 4, 32) * 5
        t5_norm.weight.data = weight.to(dtype)
        blk = RebuiltBlock(spec, {"query_norm.weight": weight.to(dtype)})
        with torch.no_grad():
            assert torch.equal(blk.inputs(x.to(dtype), x.to(dtype))[0], t5_norm(x.to(dtype)))


def _retype(path: Path, tmp_path: Path, model_type: str | None) -> Path:
    out = Path(shutil.copytree(path, tmp_path / "retyped"))
    config = json.loads((out / "config.json").read_text())
    config.pop("model_type")
    if model_type is not None:
        config["model_type"] = model_type
    (out / "config.json").write_text(json.dumps(config))
    return out


@pytest.mark.parametrize("model_type", ["my_seq2seq", None])
def test_unknown_model_type_keeps_the_generic_reading_and_says_so(
        store: Any, tmp_path: Path, model_type: str | None) -> None:
    from xattn_doctor.layouts.generic_proj import GenericProjections

    path = _retype(store("bart")[1], tmp_path, model_type)
    ckpt, det = H.detect_dir(path)
    generic = GenericProjections().match(ckpt.index, ckpt.config)
    assert [b.name for b in det.blocks] == list(BART_BLOCKS)
    for b in det.blocks:
        g = next(s for s in generic if s.q == b.q)
        assert (b.query_norm, b.post_norm, b.softmax_scale, b.residual) == \
            (g.query_norm, g.post_norm, g.softmax_scale, g.residual)
        assert b.query_norm is not None and b.post_norm is None
        (note,) = b.notes
        assert f"model_type {model_type or '(none)'}" in note and "unknown" in note


def test_vision_encoder_decoder_reads_the_decoder_model_type(tmp_path: Path) -> None:
    """A wrapper's own model_type says nothing; its decoder's (TrOCR: post-norm) does."""
    torch.manual_seed(0)
    cfg = T.VisionEncoderDecoderConfig.from_encoder_decoder_configs(
        T.ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                    intermediate_size=64, image_size=8, patch_size=4),
        T.TrOCRConfig(vocab_size=64, d_model=32, decoder_layers=1, decoder_attention_heads=4,
                      decoder_ffn_dim=64, cross_attention_hidden_size=32))
    _, det = H.detect_dir(H.save(T.VisionEncoderDecoderModel(cfg), tmp_path / "m"))
    (b,) = det.blocks
    assert b.name == "decoder.model.decoder.layers.0.encoder_attn"
    assert b.post_norm is not None and b.query_norm is None and b.heads == 4 and not b.notes


def test_diagnose_flags_the_scaled_block_only(store: Any, tmp_path: Path) -> None:
    import xattn_doctor

    clean = store("t5")[1]
    bad = Path(shutil.copytree(clean, tmp_path / "bad"))
    H.patch(bad, "decoder.block.1.layer.1.EncDecAttention.q.weight", lambda w: w * 30)
    before, after = xattn_doctor.diagnose([clean, bad])
    names = list(FAMILIES["t5"].blocks)
    for report in (before, after):
        assert [b.name for b in report.blocks] == names
        assert all(b.layout == "hf_seq2seq" for b in report.blocks)
    assert not [f for f in before.findings if f.code == "XD101"]
    assert [f.block for f in after.findings if f.code == "XD101"] == [names[1]]
    logits = [(b.metrics.max_logit, a.metrics.max_logit)
              for b, a in zip(before.blocks, after.blocks, strict=True)]
    assert logits[0][1] == pytest.approx(logits[0][0], rel=1e-6)
    assert logits[1][1] == pytest.approx(30 * logits[1][0], rel=1e-3)


@pytest.mark.parametrize("name,key", [
    ("bart", "model.decoder.layers.1.encoder_attn_layer_norm.weight"),
    ("t5", "decoder.block.1.layer.1.layer_norm.weight")])
def test_misshapen_norm_is_refused_not_dropped(store: Any, tmp_path: Path, name: str,
                                               key: str) -> None:
    import xattn_doctor
    from xattn_doctor.errors import CheckpointError

    path = Path(shutil.copytree(store(name)[1], tmp_path / "m"))
    H.patch(path, key, lambda w: w[:, None].contiguous())
    with pytest.raises(CheckpointError, match=key.replace(".", r"\.")):
        xattn_doctor.diagnose([path])
