"""XD603: the tool could not tell self- from cross-attention."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from xattn_doctor.findings import Finding, Remedy, Severity, Symptom
from xattn_doctor.rules import register
from xattn_doctor.rules._base import BlockContext, Rule


@register
class XD603(Rule):
    """Diagnosed as cross-attention without proof that it is one.

    Why: the block's key/value input has the query's width and its name says neither "cross"
    nor "self", and no other block in the checkpoint is recognisably cross-attention, so it was
    diagnosed as cross-attention. Self-attention would be probed with unrelated streams.

    Fix: name the module as cross-attention, or restrict the blocks with `blocks.include` /
    `blocks.exclude` patterns in the config.

    References: README, "A model the tool does not recognise".
    """

    code = "XD603"
    slug = "cross-attention-assumed"
    symptom = Symptom.ARCHITECTURE
    severity = Severity.INFO
    summary = "could not tell self- from cross-attention; diagnosed as cross-attention"
    remedy = Remedy(summary="Select blocks explicitly with blocks.include in the config.",
                    config={"blocks": {"include": ["*.cross_attn"]}})

    def check(self, ctx: BlockContext, opts: Mapping[str, Any]) -> list[Finding]:
        """Inform for blocks detected with an ambiguous role."""
        if ctx.spec.role != "ambiguous":
            return []
        return [self.finding(ctx, Severity.INFO, "equal widths and a neutral name: assumed to be "
                             "cross-attention", {"query_dim": ctx.spec.query_dim,
                                                 "context_dim": ctx.spec.context_dim})]
