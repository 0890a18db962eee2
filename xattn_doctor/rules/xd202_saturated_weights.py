"""XD202: most queries put more than 99% of their weight on a single key."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from xattn_doctor.findings import SATURATED_WEIGHT as SATURATED
from xattn_doctor.findings import Finding, Remedy, Severity, Symptom
from xattn_doctor.rules import register
from xattn_doctor.rules._base import BlockContext, Rule, fmt
from xattn_doctor.rules._refs import SEED, ZHAI


@register
class XD202(Rule):
    """Most queries' attention is saturated on one key (max weight > 0.99).

    Why: the seed playbook alerts when the max attention weight exceeds 0.99 (a rule of
    thumb). One saturated query is often exactly right (retrieval is sharp), so this looks at
    the share of (batch, head, query) rows whose largest weight exceeds 0.99, and never fails a
    build on its own: at most a warning, when at least half of the rows are saturated.

    Fix: as for entropy collapse: attention dropout, qk-norm or a logit soft-cap, a lower
    learning rate for the q/k projections.

    References: seed playbook, "Monitor Attention Weights"; Zhai et al. 2023.
    """

    code = "XD202"
    slug = "saturated-attention-weights"
    symptom = Symptom.ATTENTION_COLLAPSE
    severity = Severity.WARNING
    summary = "share of queries with max attention weight > 0.99 is >= 0.5 (warning at most)"
    options = {"share": float}
    defaults = {"share": 0.5}
    references = (SEED, ZHAI)
    remedy = Remedy(
        summary="Soften attention: attention dropout, qk-norm or logit soft-cap.",
        config={"cross_attention": {"dropout": 0.1, "qk_norm": True}},
        references=(SEED, ZHAI),
    )

    def check(self, ctx: BlockContext, opts: Mapping[str, Any]) -> list[Finding]:
        """Warn when the saturated share reaches `share`."""
        m = ctx.block.metrics
        share = m.saturated_query_share
        if share is None or not math.isfinite(share) or share < opts["share"]:
            return []
        return [self.finding(ctx, Severity.WARNING, f"{fmt(100 * share, 3)}% of queries put > "
                             f"{SATURATED} of their weight on one key",
                             {"saturated_query_share": share,
                              "max_attention_weight": m.max_attention_weight})]
