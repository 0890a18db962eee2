"""XD601: the block normalises after the residual (post-LN)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from xattn_doctor.findings import Finding, Remedy, Severity, Symptom
from xattn_doctor.rules import register
from xattn_doctor.rules._base import BlockContext, Rule
from xattn_doctor.rules._refs import SEED, XIONG


@register
class XD601(Rule):
    """Post-LN: the norm sits after the residual add.

    Why: x = LayerNorm(x + Attn(x, c)) puts large gradients near the output at initialisation
    and needs a careful learning-rate warmup; pre-LN, x + Attn(LN(x), c), trains stably without
    one (Xiong et al.). BERT-style blocks (the BLIP-2 Q-Former) are post-LN by design: there
    this is a reason for warmup, not a bug.

    Fix: move the norm before the attention (pre-LN) when you control the architecture;
    otherwise keep a long warmup (10% of steps) and gradient clipping.

    References: Xiong et al. 2020; seed playbook, "Use pre-LayerNorm architecture".
    """

    code = "XD601"
    slug = "post-layernorm"
    symptom = Symptom.ARCHITECTURE
    severity = Severity.WARNING
    summary = "post-LN block (norm after the residual): needs warmup, pre-LN is more stable"
    references = (XIONG, SEED)
    remedy = Remedy(
        summary="Use pre-LN (norm the query before attention); else warm up for 10% of steps.",
        config={"lr_schedule": {"warmup_ratio": 0.1}, "cross_attention": {"pre_norm": True}},
        references=(XIONG, SEED),
        code_change=("# before: x = self.norm(x + self.attn(x, c))\n"
                     "x = x + self.attn(self.norm(x), c)"),
    )

    def check(self, ctx: BlockContext, opts: Mapping[str, Any]) -> list[Finding]:
        """Warn on a post-norm without a pre-norm; inform when both are present."""
        if ctx.spec.post_norm is None:
            return []
        sev = Severity.INFO if ctx.spec.query_norm is not None else Severity.WARNING
        return [self.finding(ctx, sev, "post-LN: the block normalises after the residual",
                             {"post_norm": True, "pre_norm": ctx.spec.query_norm is not None})]
