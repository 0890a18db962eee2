"""XD401: no gradient reaches the block: it can never learn."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from xattn_doctor.findings import Finding, Remedy, Severity, Symptom
from xattn_doctor.rules import register
from xattn_doctor.rules._base import BlockContext, Rule
from xattn_doctor.rules._refs import FLAMINGO, SEED


@register
class XD401(Rule):
    """Every parameter of the attention path gets exactly zero gradient.

    Why: with a tanh gate at 0 AND an all-zero output projection, d/d(gate) is tanh'(0) times
    an output that is zero, and every other gradient is multiplied by tanh(0) = 0: the block is
    dead and stays dead. The seed playbook's own template and config (`use_gating: true` with
    `init_method: "zero"`) do exactly this. Flamingo zero-initialises only the gate. Measured,
    not inferred: the tool backpropagates and finds every gradient exactly 0.

    Fix: zero-initialise the gate only; initialise the output projection normally (Xavier).

    References: Flamingo (gates at 0, projections trained); seed playbook notes.
    """

    code = "XD401"
    slug = "dead-gated-block"
    symptom = Symptom.GATING
    severity = Severity.ERROR
    summary = "all attention-path gradients exactly zero (gate at 0 with a zero output projection)"
    references = (FLAMINGO, SEED)
    remedy = Remedy(
        summary="Zero-initialise only the gate; give the output projection a normal init.",
        config={"cross_attention": {"use_gating": True, "gate_init": 0.0,
                                    "init_method": "xavier"}},
        references=(FLAMINGO,),
        code_change=("nn.init.zeros_(self.gate)  # gate only\n"
                     "nn.init.xavier_uniform_(self.cross_attn.out_proj.weight)"),
    )

    def check(self, ctx: BlockContext, opts: Mapping[str, Any]) -> list[Finding]:
        """Fail when the measured gradients of the attention path are all exactly zero."""
        m = ctx.block.metrics
        if not m.zero_grad:
            return []
        o = m.weight_norms.get("o.weight")
        why = "gate at 0 and zero output projection" if m.gate_abs_max == 0 and o == 0 else \
            "no gradient reaches it"
        return [self.finding(ctx, Severity.ERROR, f"block is dead: every attention-path gradient "
                             f"is exactly 0 ({why})",
                             {"gate": m.gate, "out_proj_norm": o, "grad_norms": m.grad_norms})]
