"""XD402: a gate has saturated at +-1."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from xattn_doctor.findings import Finding, Remedy, Severity, Symptom
from xattn_doctor.rules import register
from xattn_doctor.rules._base import BlockContext, Rule, fmt
from xattn_doctor.rules._refs import FLAMINGO, SEED


@register
class XD402(Rule):
    """The gate is saturated (|tanh(alpha)| > 0.99).

    Why: a tanh gate near +-1 has a vanishing derivative, so it can no longer close; the
    cross-attention output enters the residual stream at full strength, and alpha keeps
    growing without effect. Flamingo's gates open gradually from 0.

    Fix: weight decay on the gate parameter, a lower learning rate for gates, or clamp alpha.

    References: Flamingo; seed playbook, "Gated Cross-Attention".
    """

    code = "XD402"
    slug = "gate-saturated"
    symptom = Symptom.GATING
    severity = Severity.WARNING
    summary = "gate value |fn(alpha)| > 0.99: saturated, no longer trainable"
    options = {"above": float}
    defaults = {"above": 0.99}
    references = (FLAMINGO, SEED)
    remedy = Remedy(
        summary="Slow the gate down: weight decay or a lower learning rate on gate parameters.",
        config={"cross_attention": {"gate_lr_multiplier": 0.1, "gate_weight_decay": 0.05}},
        references=(FLAMINGO,),
    )

    def check(self, ctx: BlockContext, opts: Mapping[str, Any]) -> list[Finding]:
        """Warn when the largest gate magnitude exceeds `above`."""
        g = ctx.block.metrics.gate_abs_max
        if g is None or not g > opts["above"]:
            return []
        return [self.finding(ctx, Severity.WARNING, f"gate at {fmt(ctx.block.metrics.gate)} "
                             f"(|max| {fmt(g)} > {fmt(opts['above'])}): saturated",
                             {"gate": ctx.block.metrics.gate, "gate_abs_max": g})]
