"""Model mode (`diagnose CHECKPOINT --model ... --batch ...`): build the model, run one forward
on the batch with every block tapped, one backward of the model's own loss (or the proxy), then
measure each block on what reached it with the one per-block engine.

The proxy loss, used only when the model returns no loss: the mean square of the model's first
floating output (`loss`, else `logits`, `sample`, `last_hidden_state`, else the first floating
tensor it returns), computed in float32. It sends a gradient through every block that shaped
the output; its value is not a training loss and is reported as `loss_source: "proxy"`.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from xattn_doctor import __version__
from xattn_doctor.checkpoint import open_checkpoint
from xattn_doctor.errors import UsageError
from xattn_doctor.findings import CheckpointInfo, ProbeInfo, Report
from xattn_doctor.live.batch import load_batch
from xattn_doctor.live.blocks import find_blocks
from xattn_doctor.live.build import build, check_blocks_loaded
from xattn_doctor.live.engine import measure_live
from xattn_doctor.live.memory import Limits, check_fits
from xattn_doctor.live.tap import InputTap
from xattn_doctor.live.weights import LiveWeights, global_grad_norm, total_norm
from xattn_doctor.options import Options

OUTPUT_FIELDS = ("logits", "sample", "last_hidden_state", "prediction_logits")
PROXY = "proxy: mean square of the model's output {name} (the model returned no loss)"


def diagnose_model(checkpoint: Path, model_spec: str, batch_path: Path, opts: Options,
                   limits: Limits | None = None) -> Report:
    """One model-mode report: the live model's blocks under its own loss on `batch_path`."""
    from xattn_doctor.measure import RunSettings
    from xattn_doctor.runtime import default_budget, resolve

    ckpt = open_checkpoint(checkpoint)
    rt = resolve(opts.device, opts.dtype, ckpt.dtype)
    check_fits(ckpt, rt.device, rt.dtype, limits)
    built = build(model_spec, ckpt, rt.dtype)
    model = built.model.to(rt.device).eval()  # eval: no dropout, one deterministic forward
    specs = [s for s in find_blocks(model, opts.heads) if opts.wants(s.name)]
    if not specs:
        raise UsageError(checkpoint, "every cross-attention block is excluded by the config")
    weights = LiveWeights(model, specs)
    check_blocks_loaded(built, {b: {r: ref.key for r, ref in refs.items()}
                                for b, refs in weights.refs.items()})
    batch = load_batch(batch_path, model, rt.device, rt.dtype)
    torch.manual_seed(opts.seed)
    model.zero_grad(set_to_none=True)
    with InputTap(model, specs) as tap:
        output = _forward(model, batch)
    loss, source, note = model_loss(output)
    if loss.requires_grad:
        torch.autograd.backward(loss)
    del output
    settings = RunSettings(rt.device, rt.dtype, opts.budget_bytes or default_budget(rt.device),
                           opts.seed)
    blocks, findings, skipped = measure_live(specs, weights, tap.records, settings, opts,
                                             ckpt.dtype)
    glob = global_grad_norm(model)
    xattn = total_norm({b.name: b.metrics.real_grad_norm or 0.0 for b in blocks})
    value = float(loss.detach().float())
    report = Report(
        tool_version=__version__,
        checkpoint=CheckpointInfo(path=str(ckpt.path), tensors=len(ckpt.where),
                                  bytes=ckpt.nbytes, dtype=ckpt.dtype,
                                  layout=_layout(blocks),
                                  config=str(ckpt.config_path) if ckpt.config_path else None),
        probe=ProbeInfo("model", str(batch_path), []),
        device=str(rt.device) if rt.device.type == "cpu" else f"cuda:{rt.device.index or 0}",
        dtype=rt.dtype_name + (f" ({rt.note})" if rt.note else ""),
        blocks=blocks,
        findings=findings,
        thresholds=opts.effective_thresholds(),
        skipped=skipped,
        mode="model", loss=value, loss_source=source, global_grad_norm=glob,
        loss_finite=math.isfinite(value),
        cross_attention_grad_norm=xattn if glob is not None else None,
        cross_attention_grad_share=(xattn / glob) ** 2 if glob else None,
        notes=built.notes + ([note] if note else []),
    )
    from xattn_doctor.api import add_report_findings

    add_report_findings(report, opts)
    return report


def _forward(model: nn.Module, batch: dict[str, Any]) -> Any:
    try:
        return model(**batch)
    except (TypeError, ValueError, RuntimeError, IndexError) as e:
        raise UsageError(None, f"the model's forward failed on this batch ({type(e).__name__}: "
                               f"{' '.join(str(e).split())[:300]})") from None


def model_loss(output: Any) -> tuple[Tensor, str, str | None]:
    """The model's own loss when it returned one, else the documented proxy."""
    own = _field(output, "loss")
    if isinstance(own, Tensor) and own.numel() == 1:
        return own, "model", None
    for name in OUTPUT_FIELDS:
        t = _field(output, name)
        if isinstance(t, Tensor) and t.is_floating_point():
            return t.float().pow(2).mean(), "proxy", PROXY.format(name=f"'{name}'")
    t = _first_float(output)
    if t is None:
        raise UsageError(None, "the model returned no loss and no floating-point output to "
                               "take the proxy loss on")
    return t.float().pow(2).mean(), "proxy", PROXY.format(name="(its first float tensor)")


def _field(output: Any, name: str) -> Any:
    if isinstance(output, dict):
        return output.get(name)
    return getattr(output, name, None) if not isinstance(output, Tensor) else None


def _first_float(output: Any) -> Tensor | None:
    if isinstance(output, Tensor):
        return output if output.is_floating_point() else None
    items = output.values() if isinstance(output, dict) else \
        output if isinstance(output, (list, tuple)) else []
    for item in items:
        got = _first_float(item)
        if got is not None:
            return got
    return None


def _layout(blocks: list[Any]) -> str:
    names = sorted({b.layout for b in blocks})
    return names[0] if len(names) == 1 else "mixed:" + ",".join(names)
