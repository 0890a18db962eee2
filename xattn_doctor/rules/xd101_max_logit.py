"""XD101: the largest attention logit is past softmax saturation."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from xattn_doctor.findings import Finding, Remedy, Severity, Symptom
from xattn_doctor.rules import register
from xattn_doctor.rules._base import BlockContext, Rule, fmt
from xattn_doctor.rules._refs import DEHGHANI, GEMMA2, KIMI, SEED, WORTSMAN


@register
class XD101(Rule):
    """Attention logits have grown past softmax saturation.

    Why: the largest scaled pre-softmax score (after any qk-norm and temperature) measures how
    peaked attention can get. Past about 50, exp() puts essentially all mass on one key and the
    softmax Jacobian vanishes for the rest (Gemma 2 soft-caps logits at 50 for this reason).
    Logits keep growing once they start: QK-Clip (Kimi K2) caps each head at 100, and
    Wortsman et al. saw every run whose max logit passed 1e4 diverge. Warning at 50, error
    at 100 by default.

    Fix: add qk-norm (LayerNorm/RMSNorm on q and k per head) to the cross-attention, or soft-cap
    the logits (cap * tanh(l / cap)); clip gradients (max_grad_norm 1.0) and warm up the
    learning rate. `xattn-doctor suggest-config` tries qk-norm on the block and shows the
    logit before and after.

    References: Wortsman et al. 2023; Dehghani et al. 2023; Gemma 2; Kimi K2; seed playbook,
    Pattern 1.
    """

    code = "XD101"
    slug = "attention-logit-growth"
    symptom = Symptom.GRADIENT_EXPLOSION
    severity = Severity.ERROR
    summary = "max attention logit past softmax saturation (>= 50 warning, >= 100 error)"
    options = {"warn_at": float, "error_at": float}
    defaults = {"warn_at": 50.0, "error_at": 100.0}
    references = (WORTSMAN, DEHGHANI, GEMMA2, KIMI, SEED)
    remedy = Remedy(
        summary="Normalise q and k (qk-norm) or soft-cap the logits; clip gradients at 1.0.",
        config={"cross_attention": {"qk_norm": True, "logit_softcap": 50.0},
                "gradient_clipping": {"max_grad_norm": 1.0, "clip_type": "norm"}},
        references=(WORTSMAN, DEHGHANI, GEMMA2),
        code_change=("q = self.q_norm(q.view(B, L, H, d))  # nn.RMSNorm(d) per head\n"
                     "k = self.k_norm(k.view(B, S, H, d))"),
    )

    def check(self, ctx: BlockContext, opts: Mapping[str, Any]) -> list[Finding]:
        """Warn or fail on the block's max logit."""
        value = ctx.block.metrics.max_logit
        if value is None or not math.isfinite(value) or value < opts["warn_at"]:
            return []
        sev = Severity.ERROR if value >= opts["error_at"] else Severity.WARNING
        limit = opts["error_at"] if sev is Severity.ERROR else opts["warn_at"]
        return [self.finding(ctx, sev, f"max attention logit {fmt(value)} >= {fmt(limit)}: "
                             "softmax is saturated", remedy=self._remedy_for(ctx), evidence={
                                 "max_logit": value, "threshold": limit,
                                 "max_attention_weight": ctx.block.metrics.max_attention_weight,
                                 "spectral_max_logit": ctx.block.metrics.spectral_max_logit,
                                 "qk_norm": ctx.block.qk_norm})]

    def _remedy_for(self, ctx: BlockContext) -> Remedy:
        """With qk-norm already in place, the norm gains are what grew: cap those instead."""
        if not ctx.block.qk_norm:
            return self.remedy
        return Remedy(
            summary="The block already has qk-norm, so its gains have grown: soft-cap the logits "
                    "or cap the qk-norm gains (QK-Clip); clip gradients at 1.0.",
            config={"cross_attention": {"logit_softcap": 50.0, "qk_norm_gain_max": 3.0},
                    "gradient_clipping": {"max_grad_norm": 1.0, "clip_type": "norm"}},
            references=(KIMI, GEMMA2, WORTSMAN),
            code_change=("logits = 50.0 * torch.tanh(logits / 50.0)  # soft-cap\n"
                         "self.q_norm.weight.data.clamp_(max=3.0)  # after each step"),
        )
