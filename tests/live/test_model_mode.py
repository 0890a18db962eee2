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
           attentions: dict[str, Any], live_name: Any = lambda key: key) -> None:
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
            param = params.get(live_name(ref.key))
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
        model, prefix = T.T5ForConditionalGeneration(cfg), "decoder.block.{}.layer.1.EncDecAttention"
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


def _blip2(fresh: bool) -> Any:
    torch.manual_seed(0)
    vision = dict(hidden_size=24, intermediate_size=48, num_hidden_layers=1,
                  num_attention_heads=2, image_size=16, patch_size=8, initializer_range=0.2)
    qformer = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                   num_attention_heads=4, cross_attention_frequency=2, encoder_hidden_size=24,
                   vocab_size=100, max_position_embeddings=32, initializer_range=0.2)
    text = dict(model_type="opt", hidden_size=40, ffn_dim=64, num_hidden_layers=1,
                num_attention_heads=4, vocab_size=100, max_position_embeddings=64,
                word_embed_proj_dim=40)
    cfg = T.Blip2Config(vision_config=vision, qformer_config=qformer, text_config=text,
                        num_query_tokens=4, initializer_range=0.2, image_token_index=99)
    model = T.Blip2ForConditionalGeneration(cfg)
    if not fresh:  # transformers initialises them to zeros (the fresh case)
        with torch.no_grad():
            model.query_tokens.normal_()
    model.set_attn_implementation("eager")
    return model.eval()


def _blip2_batch() -> dict[str, Any]:
    gen = torch.Generator().manual_seed(2)
    ids = torch.cat([torch.full((B, 4), 99), torch.randint(3, 90, (B, 6), generator=gen)], 1)
    return {"pixel_values": torch.randn(B, 3, 16, 16, generator=gen), "input_ids": ids,
            "attention_mask": torch.ones_like(ids), "labels": ids.clone()}


def test_blip2_matches_the_library(tmp_path: Path) -> None:
    model, batch = _blip2(fresh=False), _blip2_batch()
    folder, batch_path = _save(model, batch, tmp_path / "blip2")
    report = diagnose_model(folder, "auto", batch_path, Options(device="cpu", dtype="float32"))
    names = [f"qformer.encoder.layer.{i}.crossattention" for i in (0, 2)]
    probs: dict[str, Any] = {}
    hooks = [model.get_submodule(n).attention.register_forward_hook(
        lambda m, a, o, n=n: probs.__setitem__(n, o[1])) for n in names]
    try:
        out = _library_run(model, batch)
    finally:
        for h in hooks:
            h.remove()
    assert report.loss == pytest.approx(float(out.loss.detach()), rel=1e-5)
    _check(report, folder, model, batch, probs)


def test_fresh_blip2_has_no_error_in_model_mode(tmp_path: Path) -> None:
    """The issue's case: zero query tokens at init failed CI on a stand-in; the real forward
    feeds the block the self-attended, layer-normed stream, and nothing is an error."""
    folder, batch_path = _save(_blip2(fresh=True), _blip2_batch(), tmp_path / "fresh")
    report = diagnose_model(folder, "auto", batch_path, Options(device="cpu", dtype="float32"))
    assert len(report.blocks) == 2
    assert [f.code for f in report.findings if f.severity.value == "error"] == []


def test_diffusers_unet_with_its_timestep_under_the_proxy_loss(tmp_path: Path) -> None:
    diffusers = pytest.importorskip("diffusers")
    from diffusers.models.attention_processor import AttnProcessor

    torch.manual_seed(0)
    unet = diffusers.UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32, 64),
        layers_per_block=1, down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=16,
        attention_head_dim=(2, 8), norm_num_groups=8).float().eval()
    gen = torch.Generator().manual_seed(3)
    batch = {"sample": torch.randn(B, 4, 8, 8, generator=gen), "timestep": torch.tensor([3, 7]),
             "encoder_hidden_states": torch.randn(B, LK, 16, generator=gen)}
    folder, batch_path = _save(unet, batch, tmp_path / "unet")
    report = diagnose_model(folder, "auto", batch_path, Options(device="cpu", dtype="float32"))
    assert report.loss_source == "proxy" and any("proxy" in n for n in report.notes)
    unet.set_attn_processor(AttnProcessor())  # the processor that materialises probabilities
    probs: dict[str, Any] = {}
    for b in report.blocks:
        attn = unet.get_submodule(f"{b.name}.attn2")
        heads = attn.heads

        def wrapped(q: Any, k: Any, m: Any = None, _s: Any = attn.get_attention_scores,
                    _n: str = b.name, _h: int = heads) -> Any:
            p = _s(q, k, m)
            probs[_n] = p.reshape(B, _h, *p.shape[1:])
            return p

        attn.get_attention_scores = wrapped
    unet.zero_grad(set_to_none=True)
    out = unet(**batch).sample
    loss = out.float().pow(2).mean()
    loss.backward()
    assert report.loss == pytest.approx(float(loss.detach()), rel=1e-5)
    report.loss_source = "model"  # _check's common assertions, the proxy aside
    _check(report, folder, unet, batch, probs)


def test_mllama_matches_the_library(tmp_path: Path) -> None:
    """Llama 3.2 Vision: gated cross-attention layers with q/k norms, GQA and tiled images,
    saved under transformers 5's legacy prefix (the live model holds them under another)."""
    torch.manual_seed(0)
    cfg = T.MllamaConfig(
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                           num_global_layers=1, attention_heads=4, image_size=28, patch_size=14,
                           max_num_tiles=2, vision_output_dim=64, intermediate_layers_indices=[0],
                           supported_aspect_ratios=[[1, 1], [1, 2]]),
        text_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2,
                         cross_attention_layers=[1, 3], vocab_size=100, pad_token_id=0,
                         bos_token_id=1, eos_token_id=2))
    model = T.MllamaForConditionalGeneration(cfg).float()
    model.set_attn_implementation("eager")
    model.eval()
    with torch.no_grad():  # open the gates (zero at init)
        for i in (1, 3):
            model.model.language_model.layers[i].cross_attn_attn_gate.fill_(0.3 + 0.1 * i)
    patches = model.model.vision_model.num_patches
    gen = torch.Generator().manual_seed(3)
    ids = torch.randint(3, 99, (B, 6), generator=gen)
    batch = {"input_ids": ids, "labels": ids.clone(),
             "cross_attention_states": torch.randn(B, 2 * patches, 32, generator=gen),
             "cross_attention_mask": torch.ones(B, 6, 1, 2, dtype=torch.long)}
    folder, batch_path = _save(model, batch, tmp_path / "mllama")
    report = diagnose_model(folder, "auto", batch_path, Options(device="cpu", dtype="float32"))
    probs: dict[str, Any] = {}
    saved = "language_model.model.layers.{}"
    hooks = [model.model.language_model.layers[i].cross_attn.register_forward_hook(
        lambda m, a, o, i=i: probs.__setitem__(saved.format(i), o[1])) for i in (1, 3)]
    try:
        out = _library_run(model, batch)
    finally:
        for h in hooks:
            h.remove()
    assert report.loss == pytest.approx(float(out.loss.detach()), rel=1e-5)
    _check(report, folder, model, batch, probs,
           lambda key: key.replace("language_model.model.", "model.language_model.", 1))
