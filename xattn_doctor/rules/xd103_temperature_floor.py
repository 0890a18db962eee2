"""XD103: a learnable temperature has run down to its clamp floor."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from xattn_doctor.findings import Finding, Remedy, Severity, Symptom
from xattn_doctor.rules import register
from xattn_doctor.rules._base import BlockContext, Rule, fmt
from xattn_doctor.rules._refs import SEED, WORTSMAN


@register
class XD103(Rule):
    """A learnable attention temperature sits at its clamp floor.

    Why: logits are divided by clamp(temperature, floor) (the seed playbook clamps at 0.1). A
    temperature that has run down to the floor multiplies every logit by up to 1/floor and the
    optimiser is still pushing it lower: the block is sharpening attention as far as it is
    allowed to, the usual prelude to logit growth.

    Fix: keep the temperature above its floor (a higher floor, weight decay on it, or freeze it
    at 1.0), or replace it with qk-norm, which bounds the logits without a free scale.

    References: seed playbook, Pattern 1 "Attention logit temperature"; Wortsman et al. 2023.
    """

    code = "XD103"
    slug = "temperature-at-floor"
    symptom = Symptom.GRADIENT_EXPLOSION
    severity = Severity.WARNING
    summary = "learnable temperature at (or below) its clamp floor"
    options = {"tolerance": float}
    defaults = {"tolerance": 0.05}
    references = (SEED, WORTSMAN)
    remedy = Remedy(
        summary="Raise the temperature floor or freeze the temperature; prefer qk-norm.",
        config={"cross_attention": {"temperature": 1.0, "learnable_temperature": False,
                                    "qk_norm": True}},
        references=(SEED, WORTSMAN),
        code_change="self.temperature.requires_grad_(False)  # or clamp(min=0.5)",
    )

    def check(self, ctx: BlockContext, opts: Mapping[str, Any]) -> list[Finding]:
        """Fire when the temperature is within `tolerance` (relative) of its floor."""
        t = ctx.block.metrics.temperature
        floor = ctx.spec.temperature_min
        if t is None or t > floor * (1 + opts["tolerance"]):
            return []
        return [self.finding(ctx, self.severity, f"temperature {fmt(t)} is at its clamp floor "
                             f"{fmt(floor)}: logits are scaled up {fmt(1 / floor)}x",
                             {"temperature": t, "floor": floor,
                              "max_logit": ctx.block.metrics.max_logit})]
