"""BERT-named cross-attention (`crossattention.self.*` + `crossattention.output.*`) of BLIP's
text decoder and of BERT-family decoders, checked against transformers' own modules: each
`crossattention` module is hooked, and the rebuilt block must give its probabilities and its
output (after the post-LayerNorm)."""

from __future__ import annotations

import math
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.family
torch = pytest.importorskip("torch", reason="the family tests build real models with torch")
T = pytest.importorskip("transformers", minversion="5.0",
                        reason="the BERT cross-attention tests build models with transformers>=5")

import _hf_family as H

from xattn_doctor.layouts import all_layouts, detect

B, LQ, LK = 2, 5, 7
TEXT = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            vocab_size=100, max_position_embeddings=40, initializer_range=0.2)
DECODER = dict(TEXT, is_decoder=True, add_cross_attention=True, layer_norm_eps=1e-7)
VISION = dict(hidden_size=24, intermediate_size=48, num_hidden_layers=1, num_attention_heads=2,
              image_size=16, patch_size=8, initializer_range=0.2)


@dataclass(frozen=True)
class Family:
    """How one library model is built and run, and what its blocks should look like."""

    name: str
    build: Callable[[], Any]
    prefix: str  # the blocks are f"{prefix}.{i}.crossattention"
    context: int
    eps: float
    decoder: Callable[[Any], Any]  # the model part taking input_ids and encoder_hidden_states
    masks: bool = True  # whether the library applies the encoder mask
    pre_norm: bool = False

    @property
    def blocks(self) -> list[str]:
        return [f"{self.prefix}.{i}.crossattention" for i in range(2)]


def _blip() -> Any:
    return T.BlipForConditionalGeneration(T.BlipConfig(
        vision_config=VISION, text_config=dict(TEXT, layer_norm_eps=1e-6)))


def _vit_bert() -> Any:  # ViT heads (2) differ from the BERT decoder's (4)
    cfg = T.VisionEncoderDecoderConfig.from_encoder_decoder_configs(
        T.ViTConfig(**dict(VISION, image_size=8, patch_size=4)), T.BertConfig(**DECODER))
    return T.VisionEncoderDecoderModel(cfg)


def _xmod() -> Any:
    return T.XmodForCausalLM(T.XmodConfig(**DECODER, pre_norm=True, languages=("en_XX",),
                                          default_language="en_XX"))


def _seeded(make: Callable[[], Any]) -> Callable[[], Any]:
    """Seeded, eager, eval; LayerNorm gains and biases moved away from 1 and 0."""
    def build() -> Any:
        torch.manual_seed(0)
        model = make()
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "LayerNorm" in name and p.dim() == 1:
                    p.copy_(torch.rand_like(p) + 0.5 if name.endswith("weight")
                            else torch.randn_like(p) * 0.1)
        model.set_attn_implementation("eager")
        return model.eval()
    return build


FAMILIES = {f.name: f for f in (
    Family("blip", _seeded(_blip), "text_decoder.bert.encoder.layer", 24, 1e-6,
           lambda m: m.text_decoder, masks=False),
    Family("bert", _seeded(lambda: T.BertLMHeadModel(T.BertConfig(**DECODER))),
           "bert.encoder.layer", 32, 1e-7, lambda m: m),
    Family("vit_bert", _seeded(_vit_bert), "decoder.bert.encoder.layer", 32, 1e-7,
           lambda m: m.decoder),
    Family("roberta", _seeded(lambda: T.RobertaForCausalLM(T.RobertaConfig(**DECODER))),
           "roberta.encoder.layer", 32, 1e-7, lambda m: m),
    Family("xmod_pre_norm", _seeded(_xmod), "roberta.encoder.layer", 32, 1e-7, lambda m: m,
           pre_norm=True),
)}


def layout() -> Any:
    """The registered layout."""
    return next(lay for lay in all_layouts() if lay.name == "bert_crossattention")


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


def _padded() -> Any:
    mask = torch.ones(B, LK, dtype=torch.long)
    mask[1, LK - 2:] = 0
    return mask


def _record(model: Any, names: list[str], run: Callable[[], Any]) -> dict[str, dict[str, Any]]:
    """Run the library once; per module: the args and kwargs it was called with, its output."""
    seen: dict[str, dict[str, Any]] = {n: {} for n in names}
    hooks = []
    for name in names:
        mod, rec = model.get_submodule(name), seen[name]
        hooks += [mod.register_forward_pre_hook(
                      lambda m, a, kw, rec=rec: rec.setdefault("call", (a, kw)), with_kwargs=True),
                  mod.register_forward_hook(lambda m, a, o, rec=rec: rec.setdefault("out", o))]
    try:
        with torch.no_grad():
            run()
    finally:
        for h in hooks:
            h.remove()
    return seen


def _run_decoder(model: Any, fam: Family, mask: Any) -> Callable[[], Any]:
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 100, (B, LQ), generator=gen)
    c = torch.randn(B, LK, fam.context, generator=gen)
    return lambda: fam.decoder(model)(input_ids=ids, encoder_hidden_states=c,
                                      encoder_attention_mask=mask)


@pytest.mark.parametrize("name", FAMILIES)
def test_every_cross_block_found_none_invented(store: Any, name: str) -> None:
    fam = FAMILIES[name]
    _, det = H.detect_dir(store(name)[1])
    assert [b.name for b in det.blocks] == fam.blocks
    for b in det.blocks:
        assert (b.layout, b.role, b.heads, b.kv_heads, b.head_dim, b.heads_source) == \
            ("bert_crossattention", "cross", 4, 4, 8, "config")
        assert (b.query_dim, b.context_dim) == (32, fam.context)
        assert b.softmax_scale == pytest.approx(8 ** -0.5) and b.residual
        assert b.o is not None and b.o.weight.key == f"{b.name}.output.dense.weight"
        assert b.q.weight.key == f"{b.name}.self.query.weight"
        norm, other = (b.query_norm, b.post_norm) if fam.pre_norm else (b.post_norm, b.query_norm)
        assert norm is not None and other is None and b.context_norm is None
        assert (norm.kind, norm.eps, norm.width) == ("layer", fam.eps, 32)
        assert norm.weight is not None and norm.weight.key == f"{b.name}.output.LayerNorm.weight"
        assert norm.bias is not None and b.gate is None and b.learned_queries is None
        assert len(b.notes) == (1 if fam.masks else 2)
        assert fam.masks or "drops the encoder mask" in b.notes[1]
    own = [s for s in det.skipped if s["layout"] == "bert_crossattention"]
    assert [s["name"] for s in own] == [f"{fam.prefix}.{i}.attention" for i in range(2)]
    assert all(s["reason"].startswith("self-attention") for s in own)
    named = [b.name for b in det.blocks] + [s["name"] for s in det.skipped]
    assert not any(n.endswith(".self") for n in named)  # no generic copy of a sub-module


@pytest.mark.parametrize("name", FAMILIES)
def test_probabilities_and_output_match_library(store: Any, name: str) -> None:
    fam = FAMILIES[name]
    model, path = store(name)
    mask = _padded()
    seen = _record(model, fam.blocks, _run_decoder(model, fam, mask))
    ckpt, det = H.detect_dir(path)
    worst = 0.0
    for spec in det.blocks:
        args, kwargs = seen[spec.name]["call"]
        got = layout().capture(spec, args, kwargs)
        x, c, keep = got["hidden_states"], got["encoder_hidden_states"], \
            got["encoder_attention_mask"]
        assert x.shape == (B, LQ, 32) and c.shape == (B, LK, fam.context)
        assert keep.tolist() == mask.bool().tolist()
        y_lib, p_lib = seen[spec.name]["out"][:2]
        assert p_lib.max() > 3 / LK  # far from uniform: a wrong scale or norm would show
        # the library applies the padded mask (zero weight) except BLIP's, which drops it
        assert bool((p_lib[1, :, :, LK - 2:] == 0).all()) == fam.masks
        applied = keep if fam.masks else None
        blk = H.rebuild(ckpt, spec)
        p = H.probs(blk, x, c, applied)
        with torch.no_grad():
            y = blk(x, c, applied)
        torch.testing.assert_close(p, p_lib, atol=1e-4, rtol=0)
        torch.testing.assert_close(y, y_lib, atol=1e-4, rtol=0)
        worst = max(worst, float((p - p_lib).abs().max()), float((y - y_lib).abs().max()))
    print(f"{name}: max |rebuilt - library| = {worst:.2e}")


def test_diagnose_flags_the_scaled_block_only(store: Any, tmp_path: Path) -> None:
    import xattn_doctor

    fam = FAMILIES["blip"]
    clean = store("blip")[1]
    bad = Path(shutil.copytree(clean, tmp_path / "bad"))
    H.patch(bad, f"{fam.blocks[1]}.self.query.weight", lambda w: w * 30)
    before, after = xattn_doctor.diagnose([clean, bad])
    for report in (before, after):
        assert [b.name for b in report.blocks] == fam.blocks
        assert all(b.layout == "bert_crossattention" and b.post_norm for b in report.blocks)
    assert not [f for f in before.findings if f.code == "XD101"]
    assert [f.block for f in after.findings if f.code == "XD101"] == [fam.blocks[1]]
    logits = [(b.metrics.max_logit, a.metrics.max_logit)
              for b, a in zip(before.blocks, after.blocks, strict=True)]
    assert logits[0][1] == pytest.approx(logits[0][0], rel=1e-6)
    assert logits[1][1] == pytest.approx(30 * logits[1][0], rel=1e-3)


def _entropy(p: Any) -> list[float]:
    """Per-head entropy in nats, averaged over batch and queries (masked keys weigh 0)."""
    return (-(p * p.clamp_min(1e-30).log()).sum(-1)).mean(dim=(0, 2)).tolist()


@pytest.mark.parametrize("name", ["blip", "bert"])
def test_capture_probe_then_diagnose_matches_library(store: Any, name: str,
                                                     tmp_path: Path) -> None:
    from safetensors.torch import load_file

    import xattn_doctor

    fam = FAMILIES[name]
    model, path = store(name)
    gen = torch.Generator().manual_seed(3)
    ids = torch.randint(3, 100, (B, LQ), generator=gen)
    if name == "blip":  # the whole model: image features from the vision tower, no mask
        inputs = {"pixel_values": torch.randn(B, 3, 16, 16, generator=gen), "input_ids": ids}
    else:
        inputs = {"input_ids": ids, "encoder_hidden_states": torch.randn(B, LK, 32, generator=gen),
                  "encoder_attention_mask": _padded()}
    probe = xattn_doctor.capture_probe(model, inputs, tmp_path / "probe.safetensors")
    seen = _record(model, fam.blocks, lambda: model(**inputs))
    tensors = load_file(str(probe))
    for block in fam.blocks:
        args, kwargs = seen[block]["call"]
        torch.testing.assert_close(tensors[f"{block}.hidden_states"], args[0])
        c = kwargs["encoder_hidden_states"] if name == "blip" else args[2]  # by name / by place
        torch.testing.assert_close(tensors[f"{block}.encoder_hidden_states"], c)
        if name == "bert":
            assert tensors[f"{block}.encoder_attention_mask"].tolist() == \
                _padded().bool().tolist()
    (report,) = xattn_doctor.diagnose([path], probe=probe)
    assert report.probe.synthesized == []
    assert [b.name for b in report.blocks] == fam.blocks
    for result in report.blocks:
        y_lib, p_lib = seen[result.name]["out"][:2]
        m = result.metrics
        assert result.inputs == "probe" and result.layout == "bert_crossattention"
        assert m.max_attention_weight == pytest.approx(float(p_lib.max()), abs=1e-4)
        assert m.head_entropy == pytest.approx(_entropy(p_lib), abs=1e-4)
        assert m.output_rms == pytest.approx(float(y_lib.pow(2).mean().sqrt()), rel=1e-4)
        assert m.valid_keys_mean == (LK - 1 if name == "bert" else p_lib.shape[-1])
        assert 0.1 < m.entropy_mean < math.log(p_lib.shape[-1])


def test_plain_bert_encoder_is_left_as_before(tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """No crossattention module: the layout returns nothing, so its self-attention modules
    are not claimed and the result is what it was without this layout."""
    import xattn_doctor.layouts as registry

    torch.manual_seed(0)
    ckpt, det = H.detect_dir(H.save(T.BertModel(T.BertConfig(**TEXT)), tmp_path / "m"))
    assert layout().match(ckpt.index, ckpt.config) == []
    monkeypatch.delitem(registry._LAYOUTS, "bert_crossattention")
    before = detect(ckpt.index, ckpt.config)
    assert "bert_crossattention" in det.tried and "bert_crossattention" not in before.tried
    assert (det.blocks, det.skipped) == (before.blocks, before.skipped)
    assert [(b.name, b.layout) for b in det.blocks] == \
        [(f"encoder.layer.{i}.attention.self", "generic") for i in range(2)]


def test_capture_prefers_the_encoder_mask_over_the_text_mask() -> None:
    """BridgeTower passes both by name: `attention_mask` is then the text's own mask."""
    x, c = torch.randn(B, LQ, 32), torch.randn(B, LK, 32)
    text = torch.zeros(B, 1, LQ, LQ)
    extended = torch.zeros(B, 1, LQ, LK)
    extended[1, ..., -2:] = torch.finfo(torch.float32).min
    got = layout().capture(None, (x,), {"attention_mask": text, "encoder_hidden_states": c,
                                        "encoder_attention_mask": extended})
    assert got["encoder_attention_mask"].tolist() == _padded().bool().tolist()
    got = layout().capture(None, (x,), {"attention_mask": text, "encoder_hidden_states": c,
                                        "encoder_attention_mask": None})
    assert "encoder_attention_mask" not in got


def test_relative_position_checkpoints_say_the_term_is_left_out(store: Any) -> None:
    from xattn_doctor.layouts import KeyIndex, ModelConfig

    ckpt, _ = H.detect_dir(store("bert")[1])
    block = FAMILIES["bert"].blocks[0]
    for shapes, config in (
            ({f"{block}.self.distance_embedding.weight": (79, 8)}, {}),
            ({}, {"position_embedding_type": "relative_key_query"})):
        index = KeyIndex({**ckpt.index.shapes, **shapes})
        spec = next(s for s in detect(index, ModelConfig({**ckpt.config.data, **config})).blocks
                    if s.name == block)
        assert any("relative-position term" in n for n in spec.notes), spec.notes
