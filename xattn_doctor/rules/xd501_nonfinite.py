"""XD501: NaN or Inf in weights, inputs, logits, outputs or gradients."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from xattn_doctor.findings import Finding, Remedy, Severity, Symptom
from xattn_doctor.rules import register
from xattn_doctor.rules._base import BlockContext, Rule
from xattn_doctor.rules._refs import MIXED, SEED


@register
class XD501(Rule):
    """Non-finite values (NaN/Inf) in the block.

    Why: any NaN or Inf in a weight, an activation or a gradient spreads through every later
    step; the seed playbook lists "parameters become NaN" as the end state of gradient
    explosion. In fp16, logits or activations past 65504 overflow to Inf. The evidence names
    where it was found: weight:<role>, input:<stream>, logits, output, grad:<role>.

    Fix: restore from the last finite checkpoint; clip gradients; check the NaN monitor every
    10 steps; in fp16 use dynamic loss scaling or move to bf16.

    References: seed playbook (check_nan_every: 10); Micikevicius et al. 2018.
    """

    code = "XD501"
    slug = "non-finite-values"
    symptom = Symptom.NUMERICS
    severity = Severity.ERROR
    summary = "NaN or Inf in weights, probe inputs, logits, output or gradients"
    references = (SEED, MIXED)
    remedy = Remedy(
        summary="Roll back to a finite checkpoint; clip gradients; monitor NaNs; prefer bf16.",
        config={"gradient_clipping": {"max_grad_norm": 1.0},
                "monitoring": {"check_nan_every": 10}, "mixed_precision": {"dtype": "bfloat16"}},
        references=(SEED, MIXED),
    )

    def check(self, ctx: BlockContext, opts: Mapping[str, Any]) -> list[Finding]:
        """Fail on any non-finite count."""
        bad = ctx.block.metrics.nonfinite
        if not bad:
            return []
        where = ", ".join(f"{k} ({v})" for k, v in sorted(bad.items())[:6])
        more = f" and {len(bad) - 6} more" if len(bad) > 6 else ""
        return [self.finding(ctx, Severity.ERROR, f"non-finite values in {where}{more}",
                             {"nonfinite": dict(bad), "dtype": ctx.dtype})]
