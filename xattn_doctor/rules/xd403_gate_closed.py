"""XD403: a gate is (still) closed."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from xattn_doctor.findings import Finding, Remedy, Severity, Symptom
from xattn_doctor.rules import register
from xattn_doctor.rules._base import BlockContext, Rule, fmt
from xattn_doctor.rules._refs import FLAMINGO


@register
class XD403(Rule):
    """The gate is closed (|tanh(alpha)| ~ 0).

    Why: Flamingo initialises tanh gates at 0 so a new cross-attention block starts as the
    identity; that is normal at initialisation. In a trained checkpoint, a gate still at 0
    means the model has learned to ignore the other modality through this block (or that its
    gradients never arrive: see XD401).

    Fix: in a trained model, check the gate's learning rate and that it is in the optimiser;
    a larger learning rate for gates or a small positive init (e.g. 0.01) helps it open.

    References: Flamingo.
    """

    code = "XD403"
    slug = "gate-closed"
    symptom = Symptom.GATING
    severity = Severity.INFO
    summary = "gate value ~0: normal at initialisation, a modality ignored in a trained model"
    options = {"below": float}
    defaults = {"below": 1e-3}
    references = (FLAMINGO,)
    remedy = Remedy(
        summary="Normal at init; in a trained model make sure the gate trains (lr, optimiser).",
        config={"cross_attention": {"gate_init": 0.0, "gate_lr_multiplier": 1.0}},
        references=(FLAMINGO,),
    )

    def check(self, ctx: BlockContext, opts: Mapping[str, Any]) -> list[Finding]:
        """Inform when every gate entry is below `below` in magnitude (and the block is not dead)."""
        m = ctx.block.metrics
        if m.gate_abs_max is None or m.gate_abs_max >= opts["below"] or m.zero_grad:
            return []
        return [self.finding(ctx, Severity.INFO, f"gate at {fmt(m.gate)}: closed (normal at "
                             "initialisation; in a trained model this block is ignored)",
                             {"gate": m.gate, "gate_abs_max": m.gate_abs_max})]
