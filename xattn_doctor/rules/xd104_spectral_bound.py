"""XD104: the weights allow logits far past saturation (a worst case, from weights alone)."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from xattn_doctor.findings import Finding, Remedy, Severity, Symptom
from xattn_doctor.rules import register
from xattn_doctor.rules._base import BlockContext, Rule, fmt
from xattn_doctor.rules._refs import DEHGHANI, ZHAI


@register
class XD104(Rule):
    """The spectral bound says some input could drive a logit past saturation.

    Why: Zhai et al. bound attention entropy from below by the spectral norm of W_q W_k^T. The
    tool computes, per head, sigma_max of the query-key map (biases included) times the largest
    input norms the pre-norms allow (or, without pre-norms, the largest seen in the probe), so
    the largest logit any such input could produce. It is a worst case, not an observation:
    this rule informs and never fails a build.

    Fix: qk-norm bounds the logits by the norm gains alone; sigma-reparametrisation (Zhai et
    al.) or weight decay on the q/k projections shrink the bound.

    References: Zhai et al. 2023; Dehghani et al. 2023.
    """

    code = "XD104"
    slug = "spectral-logit-bound"
    symptom = Symptom.GRADIENT_EXPLOSION
    severity = Severity.INFO
    fails_build = False
    summary = "worst-case logit from the weights' spectral norms is past saturation (info only)"
    options = {"at": float}
    defaults = {"at": 100.0}
    references = (ZHAI, DEHGHANI)
    remedy = Remedy(
        summary="Bound logits structurally: qk-norm, or weight decay on q/k projections.",
        config={"cross_attention": {"qk_norm": True}, "optimizer": {"weight_decay": 0.05}},
        references=(ZHAI, DEHGHANI),
    )

    def check(self, ctx: BlockContext, opts: Mapping[str, Any]) -> list[Finding]:
        """Inform when the bound reaches `at`."""
        m = ctx.block.metrics
        b = m.spectral_max_logit
        if b is None or not math.isfinite(b) or b < opts["at"]:
            return []
        return [self.finding(ctx, Severity.INFO, f"weights allow a logit of up to {fmt(b)} "
                             f"(observed {fmt(m.max_logit)}; radii from {m.spectral_bound_source})",
                             {"spectral_max_logit": b, "observed_max_logit": m.max_logit,
                              "radius_source": m.spectral_bound_source})]
