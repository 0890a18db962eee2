"""XD502: values that a float16 run would overflow (or nearly)."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from xattn_doctor.findings import Finding, Remedy, Severity, Symptom
from xattn_doctor.rules import register
from xattn_doctor.rules._base import BlockContext, Rule, fmt
from xattn_doctor.rules._refs import MIXED

FP16_MAX = 65504.0


@register
class XD502(Rule):
    """Activations or logits near or past the float16 range.

    Why: float16 tops out at 65504. A logit, projection output or block output beyond it becomes
    Inf, and softmax of Inf is NaN; within a factor of 8 of it, one more step of growth
    overflows. This applies when the checkpoint is float16 (or the probe ran in float16),
    whatever dtype the tool itself ran in: the values are measured, then compared with the
    range. bfloat16 has float32's range and is not affected.

    Fix: train in bfloat16; or keep fp16 with dynamic loss scaling and qk-norm / a logit cap so
    attention scores stay small.

    References: Micikevicius et al. 2018 (fp16 range, loss scaling).
    """

    code = "XD502"
    slug = "float16-overflow"
    symptom = Symptom.NUMERICS
    severity = Severity.ERROR
    summary = "float16 checkpoint with values past 65504 (error) or within 8x of it (warning)"
    options = {"warn_fraction": float}
    defaults = {"warn_fraction": 0.125}
    references = (MIXED,)
    remedy = Remedy(
        summary="Move to bfloat16, or keep fp16 with dynamic loss scaling and bounded logits.",
        config={"mixed_precision": {"dtype": "bfloat16", "loss_scaling": "dynamic"},
                "cross_attention": {"qk_norm": True}},
        references=(MIXED,),
    )

    def check(self, ctx: BlockContext, opts: Mapping[str, Any]) -> list[Finding]:
        """Compare the largest activation and logit with the float16 range."""
        if "float16" not in (ctx.checkpoint_dtype, ctx.dtype) or ctx.dtype == "bfloat16" \
                and ctx.checkpoint_dtype != "float16":
            return []
        m = ctx.block.metrics
        peak = max((v for v in (m.max_abs_activation, m.max_logit)
                    if v is not None and math.isfinite(v)), default=None)
        if peak is None or peak < FP16_MAX * opts["warn_fraction"]:
            return []
        sev = Severity.ERROR if peak >= FP16_MAX else Severity.WARNING
        verb = "past" if sev is Severity.ERROR else "within 8x of"
        return [self.finding(ctx, sev, f"largest value {fmt(peak)} is {verb} the float16 maximum "
                             f"{fmt(FP16_MAX)}", {"max_abs_activation": m.max_abs_activation,
                                                  "max_logit": m.max_logit,
                                                  "checkpoint_dtype": ctx.checkpoint_dtype})]
