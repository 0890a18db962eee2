"""diffusers: the `attn2` cross-attention of UNet2DConditionModel and PixArtTransformer2DModel,
built and saved by diffusers itself."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest

torch = pytest.importorskip("torch", reason="the diffusers family tests build models with torch")
diffusers = pytest.importorskip(
    "diffusers", reason="the diffusers family tests build UNet2DConditionModel and PixArt")

from diffusers.models.attention_processor import AttnProcessor

from xattn_doctor.attention import RebuiltBlock
from xattn_doctor.checkpoint import open_checkpoint
from xattn_doctor.layouts import all_layouts, detect
from xattn_doctor.layouts._nocross import explain_no_blocks

pytestmark = pytest.mark.family

CONTEXT = 24
# attention_head_dim means the number of heads in a UNet: (2, 8) per down block, reversed for
# up blocks, the last for the mid block.
UNET_HEADS = {
    "down_blocks.0.attentions.0.transformer_blocks.0": (2, 16, 32),
    "down_blocks.1.attentions.0.transformer_blocks.0": (8, 8, 64),
    "mid_block.attentions.0.transformer_blocks.0": (8, 8, 64),
    "up_blocks.0.attentions.0.transformer_blocks.0": (8, 8, 64),
    "up_blocks.0.attentions.1.transformer_blocks.0": (8, 8, 64),
    "up_blocks.1.attentions.0.transformer_blocks.0": (2, 16, 32),
    "up_blocks.1.attentions.1.transformer_blocks.0": (2, 16, 32),
}
PIXART_BLOCKS = ["transformer_blocks.0.attn2", "transformer_blocks.1.attn2"]


def _unet() -> Any:
    torch.manual_seed(0)
    unet = diffusers.UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32, 64),
        layers_per_block=1, down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=CONTEXT, attention_head_dim=(2, 8), norm_num_groups=8)
    with torch.no_grad():  # give norm2 a non-trivial affine part
        for name, mod in unet.named_modules():
            if name.endswith("norm2") and "transformer_blocks" in name:
                mod.weight.uniform_(0.5, 1.5)
                mod.bias.uniform_(-0.2, 0.2)
    return unet.float().eval()


def _pixart() -> Any:
    torch.manual_seed(0)
    return diffusers.PixArtTransformer2DModel(
        num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8,
        num_layers=2, cross_attention_dim=16, caption_channels=CONTEXT, sample_size=8,
        patch_size=2, norm_num_groups=8).float().eval()


@pytest.fixture(scope="module")
def unet() -> Any:
    return _unet()


@pytest.fixture(scope="module")
def unet_dir(unet: Any, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("unet")
    unet.save_pretrained(out, max_shard_size="300KB")
    return out


@pytest.fixture(scope="module")
def pixart() -> Any:
    return _pixart()


@pytest.fixture(scope="module")
def pixart_dir(pixart: Any, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("pixart")
    pixart.save_pretrained(out)
    return out


def _rebuild(ckpt: Any, spec: Any) -> RebuiltBlock:
    tensors = ckpt.load(dict(spec.refs()))
    return RebuiltBlock(spec, {k: v.float() for k, v in tensors.items()})


def _probs(blk: RebuiltBlock, x: Any, c: Any, mask: Any) -> Any:
    q, k, _ = blk.project(*blk.inputs(x, c))
    logits = blk.logits(q, k).float()
    if mask is not None:
        logits = logits.masked_fill(~mask[:, None, None, :], float("-inf"))
    return logits.softmax(-1)


def _record(model: Any, modules: list[str]) -> tuple[dict[str, Any], list[Any]]:
    """Per attn2 module: its probabilities, call inputs, output and norm2's input."""
    model.set_attn_processor(AttnProcessor())  # the processor that materialises probabilities
    rec: dict[str, Any] = {m: {} for m in modules}
    hooks = []
    for name in modules:
        attn = model.get_submodule(name)
        scores = attn.get_attention_scores

        def wrapped(q: Any, k: Any, m: Any = None, _s: Any = scores, _r: Any = rec[name]) -> Any:
            _r["probs"] = _s(q, k, m)
            return _r["probs"]

        attn.get_attention_scores = wrapped
        hooks.append(attn.register_forward_hook(
            lambda mod, a, kw, out, r=rec[name]: r.update(args=a, kwargs=kw, out=out),
            with_kwargs=True))
        block = model.get_submodule(name.rsplit(".", 1)[0])
        if getattr(block, "norm2", None) is not None:
            hooks.append(block.norm2.register_forward_pre_hook(
                lambda mod, a, r=rec[name]: r.update(x=a[0])))
    return rec, hooks


def test_unet_every_attn2_found_with_per_block_heads(unet_dir: Path) -> None:
    ckpt = open_checkpoint(unet_dir)
    assert len(ckpt.headers) > 1  # sharded
    det = detect(ckpt.index, ckpt.config)
    assert {b.name for b in det.blocks} == set(UNET_HEADS)
    for spec in det.blocks:
        heads, head_dim, width = UNET_HEADS[spec.name]
        assert spec.layout == "diffusers_attn2" and spec.role == "cross"
        assert (spec.heads, spec.kv_heads, spec.head_dim) == (heads, heads, head_dim)
        assert (spec.query_dim, spec.context_dim, spec.heads_source) == (width, CONTEXT, "config")
        assert spec.query_norm is not None and spec.query_norm.kind == "layer"
        assert spec.query_norm.weight.key == f"{spec.name}.norm2.weight"  # type: ignore[union-attr]
        assert spec.q.weight.key == f"{spec.name}.attn2.to_q.weight"
        assert spec.o is not None and spec.o.weight.key == f"{spec.name}.attn2.to_out.0.weight"
        assert spec.residual and spec.gate is None and spec.context_norm is None
        assert not any(".attn1." in key for key in spec.keys())  # noqa: SIM118


def test_layout_outranks_generic_layouts() -> None:
    ours = next(lay for lay in all_layouts() if lay.name == "diffusers_attn2")
    assert all(lay.priority < ours.priority for lay in all_layouts()
               if lay.name in ("generic", "torch_mha"))


def test_unet_probabilities_and_output_match_library(unet: Any, unet_dir: Path) -> None:
    ckpt = open_checkpoint(unet_dir)
    specs = detect(ckpt.index, ckpt.config).blocks
    rec, hooks = _record(unet, [f"{s.name}.attn2" for s in specs])
    gen = torch.Generator().manual_seed(1)
    text = torch.randn(2, 6, CONTEXT, generator=gen)
    keep = torch.ones(2, 6, dtype=torch.bool)
    keep[1, 4:] = False
    try:
        with torch.no_grad():
            unet(torch.randn(2, 4, 4, 4, generator=gen), 10, encoder_hidden_states=text,
                 encoder_attention_mask=keep.long())
    finally:
        for h in hooks:
            h.remove()
    for spec in specs:
        r = rec[f"{spec.name}.attn2"]
        blk = _rebuild(ckpt, spec)
        x, heads = r["x"], spec.heads
        lib = r["probs"].reshape(2, heads, *r["probs"].shape[1:])
        with torch.no_grad():
            assert torch.allclose(_probs(blk, x, text, keep), lib, atol=1e-4), spec.name
            assert torch.allclose(blk(x, text, keep), x + r["out"], atol=1e-4), spec.name


def test_pixart_attn2_found_without_query_norm(pixart_dir: Path) -> None:
    ckpt = open_checkpoint(pixart_dir)
    det = detect(ckpt.index, ckpt.config)
    assert [b.name for b in det.blocks] == PIXART_BLOCKS
    for spec in det.blocks:
        assert (spec.heads, spec.head_dim, spec.heads_source) == (2, 8, "config")
        assert (spec.query_dim, spec.context_dim) == (16, 16)
        assert spec.query_norm is None and spec.residual and spec.q.bias is not None
    assert not any("attn1" in b.name for b in det.blocks)


def test_pixart_probabilities_output_and_capture_match_library(pixart: Any,
                                                               pixart_dir: Path) -> None:
    ckpt = open_checkpoint(pixart_dir)
    specs = detect(ckpt.index, ckpt.config).blocks
    layout = next(lay for lay in all_layouts() if lay.name == "diffusers_attn2")
    rec, hooks = _record(pixart, [s.name for s in specs])
    gen = torch.Generator().manual_seed(2)
    keep = torch.ones(2, 5, dtype=torch.bool)
    keep[0, 3:] = False
    try:
        with torch.no_grad():
            pixart(torch.randn(2, 4, 8, 8, generator=gen),
                   encoder_hidden_states=torch.randn(2, 5, CONTEXT, generator=gen),
                   encoder_attention_mask=keep.long(), timestep=torch.tensor([3, 7]),
                   added_cond_kwargs={"resolution": None, "aspect_ratio": None})
    finally:
        for h in hooks:
            h.remove()
    for spec in specs:
        r = rec[spec.name]
        got = layout.capture(spec, r["args"], r["kwargs"])  # type: ignore[attr-defined]
        assert got is not None and torch.equal(got["encoder_attention_mask"], keep)
        x, c = got["hidden_states"], got["encoder_hidden_states"]
        blk = _rebuild(ckpt, spec)
        lib = r["probs"].reshape(2, spec.heads, *r["probs"].shape[1:])
        with torch.no_grad():
            assert torch.allclose(_probs(blk, x, c, keep), lib, atol=1e-4), spec.name
            assert torch.allclose(blk(x, c, keep), x + r["out"], atol=1e-4), spec.name


def _logit_max(path: Path) -> dict[str, float]:
    ckpt = open_checkpoint(path)
    out = {}
    for spec in detect(ckpt.index, ckpt.config).blocks:
        blk = _rebuild(ckpt, spec)
        gen = torch.Generator().manual_seed(0)
        x = torch.randn(2, 9, spec.query_dim, generator=gen)
        c = torch.randn(2, 6, spec.context_dim, generator=gen)
        with torch.no_grad():
            q, k, _ = blk.project(*blk.inputs(x, c))
            out[spec.name] = float(blk.logits(q, k).max())
    return out


def test_injected_qk_scale_raises_logits_of_that_block_only(unet: Any, unet_dir: Path,
                                                            tmp_path: Path) -> None:
    unet = copy.deepcopy(unet)
    target = "mid_block.attentions.0.transformer_blocks.0"
    with torch.no_grad():
        attn = unet.get_submodule(f"{target}.attn2")
        attn.to_q.weight.mul_(30.0)
        attn.to_k.weight.mul_(30.0)
    unet.save_pretrained(tmp_path)
    before, after = _logit_max(unet_dir), _logit_max(tmp_path)
    assert after[target] > 100 * before[target]
    for name in set(UNET_HEADS) - {target}:
        assert after[name] == pytest.approx(before[name], rel=1e-5)


def test_nan_shows_on_its_block_only(pixart: Any, tmp_path: Path) -> None:
    pixart = copy.deepcopy(pixart)
    with torch.no_grad():
        pixart.transformer_blocks[1].attn2.to_v.weight[0, 0] = float("nan")
    pixart.save_pretrained(tmp_path)
    ckpt = open_checkpoint(tmp_path)
    x, c = torch.randn(1, 4, 16), torch.randn(1, 3, 16)
    finite = {}
    for spec in detect(ckpt.index, ckpt.config).blocks:
        with torch.no_grad():
            finite[spec.name] = bool(torch.isfinite(_rebuild(ckpt, spec)(x, c)).all())
    assert finite == {PIXART_BLOCKS[0]: True, PIXART_BLOCKS[1]: False}


def test_bfloat16_checkpoint(unet: Any, tmp_path: Path) -> None:
    copy.deepcopy(unet).to(torch.bfloat16).save_pretrained(tmp_path)
    ckpt = open_checkpoint(tmp_path)
    assert ckpt.dtype == "bfloat16"
    det = detect(ckpt.index, ckpt.config)
    assert {b.name for b in det.blocks} == set(UNET_HEADS)
    assert ckpt.dtype_of(det.blocks[0].q.weight.key) == "bfloat16"


def test_sd3_dual_attention_attn2_is_self_attention(tmp_path: Path) -> None:
    torch.manual_seed(0)
    diffusers.SD3Transformer2DModel(
        sample_size=8, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=8,
        num_attention_heads=2, joint_attention_dim=16, caption_projection_dim=16,
        pooled_projection_dim=16, out_channels=4, pos_embed_max_size=8,
        dual_attention_layers=(0,), qk_norm="rms_norm").save_pretrained(tmp_path)
    ckpt = open_checkpoint(tmp_path)
    assert "transformer_blocks.0.attn2.to_q.weight" in ckpt.index
    det = detect(ckpt.index, ckpt.config)
    assert not any("attn2" in b.name for b in det.blocks)
    assert any(s["name"].endswith("attn2") and s["layout"] == "diffusers_attn2"
               for s in det.skipped)
    assert {s["name"] for s in det.skipped if s["layout"] == "diffusers_joint"} == {
        "transformer_blocks.0.attn", "transformer_blocks.1.attn"}
    message = explain_no_blocks(ckpt.index, ckpt.config, det.tried)
    assert message.startswith("no cross-attention: this is a Stable Diffusion 3")


def test_flux_joint_attention_is_not_cross_attention(tmp_path: Path) -> None:
    torch.manual_seed(0)
    diffusers.FluxTransformer2DModel(
        patch_size=1, in_channels=4, num_layers=1, num_single_layers=1, attention_head_dim=8,
        num_attention_heads=2, joint_attention_dim=16, pooled_projection_dim=16,
        axes_dims_rope=(2, 2, 4)).save_pretrained(tmp_path)
    ckpt = open_checkpoint(tmp_path)
    det = detect(ckpt.index, ckpt.config)
    assert det.blocks == []
    assert {s["name"] for s in det.skipped} == {"transformer_blocks.0.attn",
                                                "single_transformer_blocks.0.attn"}
    assert "Flux" in explain_no_blocks(ckpt.index, ckpt.config, det.tried)


def test_diagnose_end_to_end_flags_the_scaled_block(unet: Any, tmp_path: Path) -> None:
    from xattn_doctor.api import diagnose

    unet = copy.deepcopy(unet)
    target = "up_blocks.1.attentions.0.transformer_blocks.0"
    with torch.no_grad():
        attn = unet.get_submodule(f"{target}.attn2")
        attn.to_q.weight.mul_(30.0)
        attn.to_k.weight.mul_(30.0)
    unet.save_pretrained(tmp_path)
    (report,) = diagnose([tmp_path])
    assert report.checkpoint.layout == "diffusers_attn2"
    assert {b.name for b in report.blocks} == set(UNET_HEADS)
    assert {b.name: b.heads for b in report.blocks} == {k: v[0] for k, v in UNET_HEADS.items()}
    assert {f.block for f in report.findings if f.code == "XD101"} == {target}


@pytest.mark.parametrize("which", ["unet", "pixart"])
def test_capture_points_reproduce_the_library_sub_block(which: str, unet: Any, unet_dir: Path,
                                                        pixart: Any, pixart_dir: Path) -> None:
    """What xattn_doctor.capture_probe does: hook the layout's capture modules (the query
    stream enters norm2, the context attn2), merge what capture() picks from each call."""
    from xattn_doctor.layouts._livepath import live_path

    model, saved = (unet, unet_dir) if which == "unet" else (pixart, pixart_dir)
    ckpt = open_checkpoint(saved)
    layout = next(lay for lay in all_layouts() if lay.name == "diffusers_attn2")
    specs = detect(ckpt.index, ckpt.config).blocks
    got: dict[str, dict[str, Any]] = {s.name: {} for s in specs}
    outs: dict[str, Any] = {}
    hooks = []
    for spec in specs:
        for point in layout.capture_modules(spec):  # type: ignore[attr-defined]
            mod = model.get_submodule(live_path(set(model.state_dict()), spec, point))
            hooks.append(mod.register_forward_pre_hook(
                lambda m, a, kw, s=spec: got[s.name].update(layout.capture(s, a, kw) or {}),  # type: ignore[attr-defined]
                with_kwargs=True))
        attn = spec.name if spec.name.endswith("attn2") else f"{spec.name}.attn2"
        hooks.append(model.get_submodule(attn).register_forward_hook(
            lambda m, a, out, n=spec.name: outs.__setitem__(n, out)))
    gen = torch.Generator().manual_seed(4)
    keep = torch.ones(2, 5, dtype=torch.bool)
    keep[1, 2:] = False
    text = torch.randn(2, 5, CONTEXT, generator=gen)
    try:
        with torch.no_grad():
            if which == "unet":
                model(torch.randn(2, 4, 4, 4, generator=gen), 10, encoder_hidden_states=text,
                      encoder_attention_mask=keep.long())
            else:
                model(torch.randn(2, 4, 8, 8, generator=gen), encoder_hidden_states=text,
                      encoder_attention_mask=keep.long(), timestep=torch.tensor([3, 7]),
                      added_cond_kwargs={"resolution": None, "aspect_ratio": None})
    finally:
        for h in hooks:
            h.remove()
    for spec in specs:
        inputs = got[spec.name]
        assert torch.equal(inputs["encoder_attention_mask"], keep)
        x = inputs["hidden_states"]
        with torch.no_grad():
            y = _rebuild(ckpt, spec)(x, inputs["encoder_hidden_states"], keep)
        assert torch.allclose(y, x + outs[spec.name], atol=1e-4), spec.name


def test_capture_probe_then_diagnose_uses_the_captured_inputs(unet: Any, unet_dir: Path,
                                                              tmp_path: Path) -> None:
    """capture_probe hooks norm2 (query stream) and attn2 (context) of each block."""
    from safetensors import safe_open

    import xattn_doctor

    gen = torch.Generator().manual_seed(6)
    keep = torch.ones(2, 5, dtype=torch.long)
    keep[0, 3:] = 0
    probe = xattn_doctor.capture_probe(unet, {
        "sample": torch.randn(2, 4, 4, 4, generator=gen), "timestep": 10,
        "encoder_hidden_states": torch.randn(2, 5, CONTEXT, generator=gen),
        "encoder_attention_mask": keep}, tmp_path / "probe.safetensors")
    with safe_open(str(probe), "pt") as fh:
        keys = set(fh.keys())
        x = fh.get_tensor(f"{next(iter(UNET_HEADS))}.hidden_states")
    assert keys == {f"{b}.{k}" for b in UNET_HEADS for k in (
        "hidden_states", "encoder_hidden_states", "encoder_attention_mask")}
    assert x.shape == (2, 16, 32)  # the 4x4 latent's tokens, at the block's width
    (report,) = xattn_doctor.diagnose([unet_dir], probe=probe)
    assert {b.name: b.inputs for b in report.blocks} == {b: "probe" for b in UNET_HEADS}



def _ldm_names(unet: Any, layers_per_block: int) -> dict[str, str]:
    """diffusers attention-module path -> its path in an original (CompVis / Stability)
    single-file checkpoint: input_blocks / middle_block / output_blocks."""
    out = {"mid_block.attentions.0": "model.diffusion_model.middle_block.1"}
    for name, _ in unet.named_modules():
        parts = name.split(".")
        if len(parts) != 4 or parts[2] != "attentions":
            continue
        i, j = int(parts[1]), int(parts[3])
        if parts[0] == "down_blocks":
            out[name] = f"model.diffusion_model.input_blocks.{1 + i * (layers_per_block + 1) + j}.1"
        elif parts[0] == "up_blocks":
            out[name] = f"model.diffusion_model.output_blocks.{i * (layers_per_block + 2) + j}.1"
    return out


@pytest.mark.parametrize(("context", "head_dims", "want"), [
    (768, 8, "SD 1.x"), (2048, (1, 2), "SDXL")], ids=["sd1", "sdxl"])
def test_single_file_sd_unet_takes_heads_from_its_version(context: int, head_dims: Any,
                                                          want: str, tmp_path: Path) -> None:
    """A UNet saved under the original single-file names, without config.json: SD 1.x has 8
    heads everywhere, SD 2.x / SDXL 64-wide heads. The heads must be the library's, and the
    rebuilt block's probabilities equal the library's."""
    from safetensors.torch import save_file

    torch.manual_seed(0)
    unet = diffusers.UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(64, 128),
        layers_per_block=1, down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=context, attention_head_dim=head_dims, norm_num_groups=8).eval()
    names = _ldm_names(unet, 1)
    sd = {}
    for key, value in unet.state_dict().items():
        mod = next((m for m in names if key.startswith(m + ".")), None)
        if mod is not None:
            sd[names[mod] + key[len(mod):]] = value.contiguous()
    save_file(sd, str(tmp_path / "sd.safetensors"))
    ckpt = open_checkpoint(tmp_path / "sd.safetensors")
    specs = detect(ckpt.index, ckpt.config).blocks
    by_ldm = {v: k for k, v in names.items()}
    assert len(specs) == len(names)
    for spec in specs:
        ldm_attn = spec.name.rsplit(".transformer_blocks", 1)[0]
        lib = unet.get_submodule(f"{by_ldm[ldm_attn]}.transformer_blocks.0.attn2")
        assert spec.layout == "diffusers_attn2" and spec.heads == lib.heads, spec.name
        assert spec.heads_source == "config" and any(want in n for n in spec.notes)
    spec = specs[0]
    lib_name = f"{by_ldm[spec.name.rsplit('.transformer_blocks', 1)[0]]}.transformer_blocks.0"
    rec, hooks = _record(unet, [f"{lib_name}.attn2"])
    gen = torch.Generator().manual_seed(1)
    text = torch.randn(1, 5, context, generator=gen)
    try:
        with torch.no_grad():
            unet(torch.randn(1, 4, 8, 8, generator=gen), 10, encoder_hidden_states=text)
    finally:
        for h in hooks:
            h.remove()
    r = rec[f"{lib_name}.attn2"]
    blk = _rebuild(ckpt, spec)
    with torch.no_grad():
        lib_probs = r["probs"].reshape(1, spec.heads, *r["probs"].shape[1:])
        assert torch.allclose(_probs(blk, r["x"], text, None), lib_probs, atol=1e-4)


def test_misshapen_norm2_is_refused_not_dropped(tmp_path: Path) -> None:
    """A norm2 weight that is not a vector: exit 2 naming it, not a block run without it."""
    from safetensors.torch import save_file
    from typer.testing import CliRunner

    from xattn_doctor.cli import app

    b = "down_blocks.0.attentions.0.transformer_blocks.0"
    sd = {f"{b}.attn2.to_q.weight": torch.zeros(32, 32), f"{b}.attn2.to_k.weight": torch.zeros(32, 8),
          f"{b}.attn2.to_v.weight": torch.zeros(32, 8), f"{b}.attn2.to_out.0.weight": torch.zeros(32, 32),
          f"{b}.norm2.weight": torch.zeros(32, 2)}
    save_file(sd, str(tmp_path / "m.safetensors"))
    r = CliRunner().invoke(app, ["diagnose", str(tmp_path / "m.safetensors")])
    assert r.exit_code == 2 and f"{b}.norm2.weight" in r.output and "[32, 2]" in r.output
