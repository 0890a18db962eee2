"""XD602: the head count was assumed, not read."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from xattn_doctor.findings import Finding, Remedy, Severity, Symptom
from xattn_doctor.rules import register
from xattn_doctor.rules._base import BlockContext, Rule


@register
class XD602(Rule):
    """The number of heads was assumed.

    Why: neither config.json, the weights (a per-head norm's width) nor --heads said how many
    heads the block has, so the documented default was used: 64-wide heads when the width
    allows, else 8, 4, 2 or 1 heads. Per-head entropies and logits depend on the split.

    Fix: put config.json beside the checkpoint, or pass --heads N (or `heads:` in the config).

    References: README, "Head count".
    """

    code = "XD602"
    slug = "heads-assumed"
    symptom = Symptom.ARCHITECTURE
    severity = Severity.INFO
    summary = "head count assumed (no config.json, per-head norm or --heads)"
    remedy = Remedy(summary="Pass --heads N or ship config.json beside the checkpoint.",
                    config={"cross_attention": {"num_heads": None}})

    def check(self, ctx: BlockContext, opts: Mapping[str, Any]) -> list[Finding]:
        """Inform when the spec's head count came from the default."""
        if ctx.spec.heads_source != "default":
            return []
        return [self.finding(ctx, Severity.INFO, f"assumed {ctx.spec.heads} heads of width "
                             f"{ctx.spec.head_dim}; pass --heads to set it",
                             {"heads": ctx.spec.heads, "head_dim": ctx.spec.head_dim})]
