"""Try a structural fix on a sick block before recommending it, and measure the difference.

The block is rebuilt from the same tensors with `dataclasses.replace(spec, ...)` (plus any
re-initialised tensor), run on the same inputs as the diagnosis (the same probe, or the same
seeded synthetic features), and measured by the same code. `before` is the diagnosis' own
metric; `after` the fixed block's. Nothing is written back to the checkpoint.
"""

from __future__ import annotations

import gc
import math
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from xattn_doctor.attention import RebuiltBlock
from xattn_doctor.checkpoint import Checkpoint, open_checkpoint
from xattn_doctor.errors import UsageError
from xattn_doctor.findings import Metrics, Report
from xattn_doctor.fixes import PLANS, RANK, judge, sick_blocks, to_simulate
from xattn_doctor.layouts import detect
from xattn_doctor.layouts._base import BlockSpec, Norm
from xattn_doctor.measure import RunSettings, measure
from xattn_doctor.options import Options
from xattn_doctor.probe import Probe, load_probe, synthetic
from xattn_doctor.runtime import default_budget, resolve

Tensors = dict[str, Tensor]


@dataclass(frozen=True)
class Simulation:
    """One fix tried on one block for one finding: the metric before and after."""

    code: str
    block: str
    fix: str
    metric: str
    before: float
    after: float
    threshold: str
    resolved: bool

    def to_json(self) -> dict[str, Any]:
        """The `simulations:` entry (numbers to 4 significant digits)."""
        return {"code": self.code, "block": self.block, "fix": self.fix, "metric": self.metric,
                "before": round_sig(self.before), "after": round_sig(self.after),
                "threshold": self.threshold, "resolved": self.resolved}


def round_sig(value: float, digits: int = 4) -> float | str:
    """`value` to `digits` significant digits; non-finite values as strings."""
    if not math.isfinite(value):
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
    return float(f"{value:.{digits}g}")


def diagnose_and_simulate(path: Path, probe_path: Path | None,
                          opts: Options) -> tuple[Report, list[Simulation]]:
    """Diagnose one checkpoint, then try the fixes its findings call for on the sick blocks."""
    from xattn_doctor.api import diagnose_one

    probe = load_probe(probe_path, opts.seed) if probe_path is not None else synthetic(opts.seed)
    report = diagnose_one(path, probe, opts)
    return report, simulate(path, probe, opts, report.to_json())


def simulate(path: Path, probe: Probe, opts: Options,
             report: Mapping[str, Any]) -> list[Simulation]:
    """Try each fix a sick block calls for; one Simulation per (finding, block, fix)."""
    sick = {b: codes for b, codes in sick_blocks(report).items() if to_simulate(codes)}
    if not sick:
        return []
    blocks = {b["name"]: b for b in report["blocks"]}
    thresholds = report.get("thresholds", {})
    ckpt = open_checkpoint(path)
    specs = _specs(ckpt, opts)
    rt = resolve(opts.device, opts.dtype, ckpt.dtype)
    settings = RunSettings(rt.device, rt.dtype, opts.budget_bytes or default_budget(rt.device),
                           opts.seed)
    out: list[Simulation] = []
    for name, codes in sick.items():
        for fix in to_simulate(codes) if name in specs else []:
            after = run_fixed(ckpt, specs[name], fix, probe, settings)
            if after is not None:
                out += [_record(code, name, fix, PLANS[code].metric, blocks[name], after,
                                thresholds) for code in codes if PLANS[code].metric]
    return sorted(out, key=lambda s: (s.block, s.code, RANK[s.fix]))


def _specs(ckpt: Checkpoint, opts: Options) -> dict[str, BlockSpec]:
    try:
        found = detect(ckpt.index, ckpt.config, opts.heads)
    except ValueError as e:
        raise UsageError(ckpt.path, str(e)) from e
    return {s.name: s for s in found.blocks}


def _record(code: str, name: str, fix: str, metric: str | None, block: Mapping[str, Any],
            after: Metrics, thresholds: Mapping[str, Mapping[str, Any]]) -> Simulation:
    assert metric is not None
    before = _as_float(block["metrics"].get(metric))
    value = _as_float(getattr(after, metric))
    ok, text = judge(code, value, thresholds, block)
    return Simulation(code, name, fix, metric, before, value, text, ok)


def _as_float(value: Any) -> float:
    if isinstance(value, str):  # a report's JSON spells non-finite values as strings
        return float(value)
    return math.nan if value is None else float(value)


def run_fixed(ckpt: Checkpoint, spec: BlockSpec, fix: str | None, probe: Probe,
              settings: RunSettings) -> Metrics | None:
    """Measure `spec` with `fix` applied (None: unchanged); None when the fix cannot apply."""
    tensors = ckpt.load(dict(spec.refs()))
    cast = {r: t.to(settings.device, settings.dtype) if t.is_floating_point() else t
            for r, t in tensors.items()}
    fixed = apply(fix, spec, cast, settings.seed) if fix else (spec, cast)
    if fixed is None:
        return None
    block = RebuiltBlock(*fixed)
    inputs = probe.inputs_for(spec, block.p("learned_queries"))
    try:
        return measure(block, inputs, settings)
    finally:
        del block, tensors, cast
        gc.collect()


def apply(fix: str, spec: BlockSpec, tensors: Tensors,
          seed: int = 0) -> tuple[BlockSpec, Tensors] | None:
    """`spec` and its tensors with one fix applied, or None when it does not apply here."""
    if fix == "qk_norm":
        if spec.q_norm is not None or spec.k_norm is not None:
            return None
        unit = Norm("rms", spec.head_dim, eps=1e-6)
        return replace(spec, q_norm=unit, k_norm=unit, qk_norm_per_head=True), tensors
    if fix == "softcap":
        return (replace(spec, softcap=50.0), tensors) if spec.softcap is None else None
    if fix == "temperature_floor":
        if spec.temperature is None or spec.temperature_min >= 0.5:
            return None
        return replace(spec, temperature_min=0.5), tensors
    if fix == "key_norm":
        if spec.context_norm is not None:
            return None
        return replace(spec, context_norm=Norm("layer", spec.context_dim)), tensors
    if fix == "reinit_out_proj":
        return _reinit_out(spec, tensors, seed)
    return None


def _reinit_out(spec: BlockSpec, tensors: Tensors, seed: int) -> tuple[BlockSpec, Tensors] | None:
    """Xavier-uniform output projection, zero bias; the gate is left as it is (at 0)."""
    w = tensors.get("o.weight")
    if spec.o is None or w is None:
        return None
    gen = torch.Generator().manual_seed(seed)
    fresh = torch.empty(w.shape, dtype=torch.float32)
    torch.nn.init.xavier_uniform_(fresh, generator=gen)
    out = dict(tensors)
    out["o.weight"] = fresh.to(w.device, w.dtype)
    if "o.bias" in out:
        out["o.bias"] = torch.zeros_like(out["o.bias"])
    return spec, out
