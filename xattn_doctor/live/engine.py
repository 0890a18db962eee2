"""Measure a live model's blocks on exactly what reached them.

The one per-block engine (`api.measure_block`, then the rules) runs on the live weights and the
tapped inputs; the real gradients the model's own loss left in `.grad` are added to each block's
metrics before the rules see them. Model mode and the monitor both call this.
"""

from __future__ import annotations

from collections.abc import Sequence

from xattn_doctor.api import judge_block, measure_block
from xattn_doctor.findings import BlockResult, Finding
from xattn_doctor.layouts._base import BlockSpec
from xattn_doctor.live.tap import Records
from xattn_doctor.live.weights import LiveWeights, total_norm
from xattn_doctor.measure import RunSettings
from xattn_doctor.options import Options
from xattn_doctor.probe import Probe

NOT_REACHED = "not reached in this forward pass (no inputs to measure it on)"


def records_probe(records: Records, seed: int = 0) -> Probe:
    """The tapped inputs as a probe of per-block keys (source 'model')."""
    tensors = {f"{name}.{key}" if name else key: t
               for name, rec in records.items() for key, t in rec.items()}
    return Probe("model", None, tensors, seed)


def measure_live(specs: Sequence[BlockSpec], weights: LiveWeights, records: Records,
                 settings: RunSettings, opts: Options, weights_dtype: str,
                 ) -> tuple[list[BlockResult], list[Finding], list[dict[str, str]]]:
    """Each reached block measured on its own inputs, with its real gradients; blocks the
    forward did not reach are returned as skipped, never measured on stand-ins."""
    probe = records_probe(records, settings.seed)
    blocks: list[BlockResult] = []
    findings: list[Finding] = []
    skipped: list[dict[str, str]] = []
    for spec in specs:
        if spec.name not in records:
            skipped.append({"name": spec.name, "layout": spec.layout, "reason": NOT_REACHED})
            continue
        result = measure_block(spec, weights.block_tensors(spec), probe, settings)
        result.inputs = "model"
        real = weights.grad_norms(spec)
        if real:
            result.metrics.real_grad_norms = real
            result.metrics.real_grad_norm = total_norm(real)
        blocks.append(result)
        findings.extend(judge_block(result, spec, "model", settings, weights_dtype, opts))
    return blocks, findings, skipped
