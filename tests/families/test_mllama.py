"""Llama 3.2 Vision (mllama): tiny models built and saved by transformers itself."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest

torch = pytest.importorskip("torch", reason="the mllama family tests build models with torch")
transformers = pytest.importorskip(
    "transformers", reason="the mllama family tests build MllamaForConditionalGeneration")

from xattn_doctor.attention import RebuiltBlock
from xattn_doctor.checkpoint import open_checkpoint
from xattn_doctor.layouts import all_layouts, detect
from xattn_doctor.layouts.mllama import key_mask

pytestmark = pytest.mark.family

CROSS_LAYERS = (1, 3)
SAVED = "language_model.model.layers.{}"  # transformers 5 saves the legacy prefix


def _config() -> Any:
    return transformers.MllamaConfig(
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                           num_global_layers=1, attention_heads=4, image_size=28, patch_size=14,
                           max_num_tiles=2, vision_output_dim=64, intermediate_layers_indices=[0],
                           supported_aspect_ratios=[[1, 1], [1, 2]]),
        text_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2,
                         cross_attention_layers=list(CROSS_LAYERS), vocab_size=100,
                         pad_token_id=0, bos_token_id=1, eos_token_id=2),
    )


def _model() -> Any:
    torch.manual_seed(0)
    model = transformers.MllamaForConditionalGeneration(_config()).float().eval()
    model.set_attn_implementation("eager")
    with torch.no_grad():
        for i, layer in enumerate(model.model.language_model.layers):
            if i in CROSS_LAYERS:  # open the gates (zero at init) and give the norms some shape
                layer.cross_attn_attn_gate.fill_(0.3 + 0.1 * i)
                layer.cross_attn_mlp_gate.fill_(0.2)
                for n in (layer.input_layernorm, layer.cross_attn.q_norm, layer.cross_attn.k_norm):
                    n.weight.uniform_(0.5, 1.5)
    return model


@pytest.fixture(scope="module")
def model() -> Any:
    return _model()


@pytest.fixture(scope="module")
def saved(model: Any, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("mllama")
    model.save_pretrained(out, max_shard_size="100KB")
    return out


def _rebuild(ckpt: Any, spec: Any) -> RebuiltBlock:
    tensors = ckpt.load(dict(spec.refs()))
    return RebuiltBlock(spec, {k: v.float() for k, v in tensors.items()})


def _probs(blk: RebuiltBlock, x: Any, c: Any, mask: Any) -> Any:
    q, k, _ = blk.project(*blk.inputs(x, c))
    logits = blk.logits(q, k).float().masked_fill(~mask[:, None, None, :], float("-inf"))
    return logits.softmax(-1)


def test_every_cross_attention_layer_found_none_invented(saved: Path) -> None:
    ckpt = open_checkpoint(saved)
    assert len(ckpt.headers) > 1  # sharded
    det = detect(ckpt.index, ckpt.config)
    assert [b.name for b in det.blocks] == [SAVED.format(i) for i in CROSS_LAYERS]
    for spec in det.blocks:
        assert spec.layout == "mllama" and spec.role == "cross"
        assert (spec.heads, spec.kv_heads, spec.head_dim) == (4, 2, 8)
        assert (spec.query_dim, spec.context_dim) == (32, 32)
        assert spec.heads_source == "config"
        assert spec.query_norm is not None and spec.query_norm.kind == "rms"
        assert spec.query_norm.width == 32 and spec.context_norm is None
        assert spec.q_norm is not None and spec.q_norm.width == 8 and spec.qk_norm_per_head
        assert spec.gate is not None and spec.gate.fn == "tanh"
        assert spec.gate.param.key == f"{spec.name}.cross_attn_attn_gate"
        assert f"{spec.name}.cross_attn_mlp_gate" in spec.extra_keys
        assert spec.residual and spec.softmax_scale == pytest.approx(8 ** -0.5)
    assert not any("self_attn" in b.name for b in det.blocks)


def test_layout_outranks_generic_layouts() -> None:
    mllama = next(lay for lay in all_layouts() if lay.name == "mllama")
    assert all(lay.priority < mllama.priority for lay in all_layouts()
               if lay.name in ("generic", "torch_mha"))


def test_text_only_causal_lm_is_detected(tmp_path: Path) -> None:
    torch.manual_seed(0)
    lm = transformers.MllamaForCausalLM(_config().text_config)
    lm.save_pretrained(tmp_path)
    ckpt = open_checkpoint(tmp_path)
    det = detect(ckpt.index, ckpt.config)
    assert [b.name.rsplit(".", 1)[-1] for b in det.blocks] == [str(i) for i in CROSS_LAYERS]
    assert all((b.heads, b.kv_heads, b.heads_source) == (4, 2, "config") for b in det.blocks)


@pytest.mark.parametrize("layer", CROSS_LAYERS)
def test_probabilities_and_output_match_library(model: Any, saved: Path, layer: int) -> None:
    ckpt = open_checkpoint(saved)
    spec = next(b for b in detect(ckpt.index, ckpt.config).blocks
                if b.name == SAVED.format(layer))
    blk = _rebuild(ckpt, spec)
    live = model.model.language_model.layers[layer]
    gen = torch.Generator().manual_seed(layer)
    x, c = torch.randn(2, 5, 32, generator=gen), torch.randn(2, 7, 32, generator=gen)
    mask = torch.ones(2, 7, dtype=torch.bool)
    mask[1, 4:] = False
    additive = torch.zeros(2, 1, 5, 7).masked_fill(~mask[:, None, None, :],
                                                    torch.finfo(torch.float32).min)
    seen: dict[str, Any] = {}
    hook = live.cross_attn.register_forward_hook(lambda m, a, out: seen.update(out=out))
    try:
        with torch.no_grad():
            live(x, cross_attention_states=c, cross_attention_mask=additive,
                 attention_mask=None, full_text_row_masked_out_mask=None)
    finally:
        hook.remove()
    attn_out, weights = seen["out"]
    with torch.no_grad():
        probs = _probs(blk, x, c, mask)
        y = blk(x, c, mask)
    assert torch.allclose(probs, weights, atol=1e-4)
    expected = x + live.cross_attn_attn_gate.tanh() * attn_out
    assert torch.allclose(y, expected, atol=1e-4)


def test_capture_reads_the_decoder_layer_call(model: Any, saved: Path) -> None:
    """The layout's capture() turns the library's per-row mask into the probe's per-key one."""
    ckpt = open_checkpoint(saved)
    det = detect(ckpt.index, ckpt.config)
    layout = next(lay for lay in all_layouts() if lay.name == "mllama")
    calls: dict[int, Any] = {}
    layers = model.model.language_model.layers
    hooks = [layers[i].register_forward_hook(
        lambda m, a, kw, out, i=i: calls.__setitem__(i, (a, kw)), with_kwargs=True)
        for i in CROSS_LAYERS]
    patches = model.model.vision_model.num_patches  # tokens per tile
    gen = torch.Generator().manual_seed(5)
    states = torch.randn(2, 2 * patches, 32, generator=gen)  # 1 image, 2 tiles
    xmask = torch.ones(2, 6, 1, 2, dtype=torch.long)
    xmask[1, :, :, 1] = 0  # second sample: its second tile is padding
    xmask[:, 0] = 0  # the first token comes before the image
    try:
        with torch.no_grad():
            model(input_ids=torch.randint(3, 99, (2, 6), generator=gen),
                  cross_attention_states=states, cross_attention_mask=xmask)
    finally:
        for h in hooks:
            h.remove()
    for spec in det.blocks:
        args, kwargs = calls[int(spec.name.rsplit(".", 1)[-1])]
        got = layout.capture(spec, args, kwargs)  # type: ignore[attr-defined]
        assert got is not None and got["encoder_hidden_states"].shape == (2, 2 * patches, 32)
        assert got["hidden_states"].shape == (2, 6, 32)
        want = torch.ones(2, 2 * patches, dtype=torch.bool)
        want[1, patches:] = False
        assert torch.equal(got["encoder_attention_mask"], want)


def test_key_mask_without_rows_seeing_an_image_keeps_every_key() -> None:
    additive = torch.full((1, 1, 3, 4), torch.finfo(torch.float32).min) * 0  # zeroed rows
    rows = torch.zeros(1, 1, 3, 1)
    assert torch.equal(key_mask(additive, rows), torch.ones(1, 4, dtype=torch.bool))


def _logit_max(path: Path) -> dict[str, float]:
    ckpt = open_checkpoint(path)
    gen = torch.Generator().manual_seed(0)
    x, c = torch.randn(2, 5, 32, generator=gen), torch.randn(2, 7, 32, generator=gen)
    out = {}
    for spec in detect(ckpt.index, ckpt.config).blocks:
        blk = _rebuild(ckpt, spec)
        with torch.no_grad():
            q, k, _ = blk.project(*blk.inputs(x, c))
            out[spec.name] = float(blk.logits(q, k).max())
    return out


def test_injected_qk_norm_gain_raises_logits_of_that_layer_only(model: Any, saved: Path,
                                                                tmp_path: Path) -> None:
    model = copy.deepcopy(model)
    with torch.no_grad():
        attn = model.model.language_model.layers[3].cross_attn
        attn.q_norm.weight.mul_(30.0)  # q_proj alone would be normalised away by q_norm
        attn.k_norm.weight.mul_(30.0)
    model.save_pretrained(tmp_path, max_shard_size="100KB")
    before, after = _logit_max(saved), _logit_max(tmp_path)
    one, three = SAVED.format(1), SAVED.format(3)
    assert after[three] > 100 * before[three]
    assert after[one] == pytest.approx(before[one], rel=1e-5)


def test_saturated_gate_and_nan_show_on_their_layer(model: Any, tmp_path: Path) -> None:
    model = copy.deepcopy(model)
    with torch.no_grad():
        model.model.language_model.layers[1].cross_attn_attn_gate.fill_(20.0)
        model.model.language_model.layers[3].cross_attn.v_proj.weight[0, 0] = float("nan")
    model.save_pretrained(tmp_path)
    ckpt = open_checkpoint(tmp_path)
    blocks = {b.name: _rebuild(ckpt, b) for b in detect(ckpt.index, ckpt.config).blocks}
    one, three = blocks[SAVED.format(1)], blocks[SAVED.format(3)]
    assert float(one.gate_value().detach()) == pytest.approx(1.0)  # type: ignore[arg-type]
    assert float(three.gate_value().detach()) == pytest.approx(float(torch.tanh(torch.tensor(0.6))))  # type: ignore[arg-type]
    x, c = torch.randn(1, 3, 32), torch.randn(1, 4, 32)
    with torch.no_grad():
        assert torch.isfinite(one(x, c)).all() and not torch.isfinite(three(x, c)).all()


def test_bfloat16_checkpoint(model: Any, tmp_path: Path) -> None:
    copy.deepcopy(model).to(torch.bfloat16).save_pretrained(tmp_path, max_shard_size="100KB")
    ckpt = open_checkpoint(tmp_path)
    assert ckpt.dtype == "bfloat16"
    det = detect(ckpt.index, ckpt.config)
    assert [b.name for b in det.blocks] == [SAVED.format(i) for i in CROSS_LAYERS]
    assert ckpt.dtype_of(det.blocks[0].q.weight.key) == "bfloat16"


def test_diagnose_end_to_end_flags_the_right_layers(model: Any, tmp_path: Path) -> None:
    from xattn_doctor.api import diagnose

    model = copy.deepcopy(model)
    layers = model.model.language_model.layers
    with torch.no_grad():
        layers[3].cross_attn.q_norm.weight.mul_(30.0)
        layers[3].cross_attn.k_norm.weight.mul_(30.0)
        layers[1].cross_attn_attn_gate.fill_(20.0)
    model.save_pretrained(tmp_path, max_shard_size="100KB")
    (report,) = diagnose([tmp_path])
    assert report.checkpoint.layout == "mllama"
    assert [b.name for b in report.blocks] == [SAVED.format(i) for i in CROSS_LAYERS]
    by_code: dict[str, set[str | None]] = {}
    for f in report.findings:
        by_code.setdefault(f.code, set()).add(f.block)
    assert by_code.get("XD101") == {SAVED.format(3)}
    assert by_code.get("XD402") == {SAVED.format(1)}
    gates = {b.name: b.metrics.gate for b in report.blocks}
    assert gates[SAVED.format(1)] == pytest.approx(1.0)


def test_capture_through_live_path_reproduces_the_library_block(model: Any, saved: Path) -> None:
    """What xattn_doctor.capture_probe does: map the saved name to the live module, hook it,
    let the layout pick the inputs; the rebuilt block then gives the library's output."""
    from xattn_doctor.layouts._livepath import live_path

    ckpt = open_checkpoint(saved)
    spec = next(b for b in detect(ckpt.index, ckpt.config).blocks if b.name == SAVED.format(3))
    layout = next(lay for lay in all_layouts() if lay.name == "mllama")
    path = live_path(set(model.state_dict()), spec)
    assert path == "model.language_model.layers.3"
    got: dict[str, Any] = {}
    seen: dict[str, Any] = {}
    live = model.get_submodule(path)
    hooks = [live.register_forward_pre_hook(
        lambda m, a, kw: got.update(layout.capture(spec, a, kw) or {}), with_kwargs=True),  # type: ignore[attr-defined]
        live.cross_attn.register_forward_hook(lambda m, a, out: seen.update(out=out[0]))]
    gen = torch.Generator().manual_seed(9)
    patches = model.model.vision_model.num_patches
    xmask = torch.ones(1, 4, 1, 2, dtype=torch.long)
    xmask[0, :, :, 1] = 0
    try:
        with torch.no_grad():
            model(input_ids=torch.randint(3, 99, (1, 4), generator=gen),
                  cross_attention_states=torch.randn(1, 2 * patches, 32, generator=gen),
                  cross_attention_mask=xmask)
    finally:
        for h in hooks:
            h.remove()
    blk = _rebuild(ckpt, spec)
    x = got["hidden_states"]
    with torch.no_grad():
        y = blk(x, got["encoder_hidden_states"], got["encoder_attention_mask"])
    assert torch.allclose(y, x + live.cross_attn_attn_gate.tanh() * seen["out"], atol=1e-4)


def test_capture_probe_then_diagnose_uses_the_captured_inputs(model: Any, saved: Path,
                                                              tmp_path: Path) -> None:
    """capture_probe on the live model writes per-block keys under the saved names."""
    from safetensors import safe_open

    import xattn_doctor

    patches = model.model.vision_model.num_patches
    gen = torch.Generator().manual_seed(3)
    xmask = torch.ones(2, 6, 1, 2, dtype=torch.long)
    xmask[1, :, :, 1] = 0
    probe = xattn_doctor.capture_probe(model, {
        "input_ids": torch.randint(3, 99, (2, 6), generator=gen),
        "cross_attention_states": torch.randn(2, 2 * patches, 32, generator=gen),
        "cross_attention_mask": xmask}, tmp_path / "probe.safetensors")
    with safe_open(str(probe), "pt") as fh:
        keys = set(fh.keys())
        mask = fh.get_tensor(f"{SAVED.format(3)}.encoder_attention_mask")
    assert keys == {f"{SAVED.format(i)}.{k}" for i in CROSS_LAYERS for k in (
        "hidden_states", "encoder_hidden_states", "encoder_attention_mask")}
    assert mask.tolist() == [[True] * 2 * patches, [True] * patches + [False] * patches]
    (report,) = xattn_doctor.diagnose([saved], probe=probe)
    assert report.probe.source == "file"
    assert [(b.name, b.inputs) for b in report.blocks] == [
        (SAVED.format(i), "probe") for i in CROSS_LAYERS]
