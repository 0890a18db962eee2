"""XD203: one key is the top key of most queries."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from xattn_doctor.findings import Finding, Remedy, Severity, Symptom
from xattn_doctor.rules import register
from xattn_doctor.rules._base import BlockContext, Rule, fmt
from xattn_doctor.rules._refs import SEED, SINKS


@register
class XD203(Rule):
    """One key takes the top of most queries' attention.

    Why: when the same key is every query's favourite, the block may have collapsed onto it
    (the seed playbook's "all queries attend to a single key"). But attention sinks are normal:
    a single key that soaks up spare weight while attention stays spread elsewhere is benign
    (Gu et al.). So: a warning when the shared top key comes with low entropy, info when the
    block's normalised entropy is still healthy (a sink).

    Fix: when it is collapse, as XD201. When it is a sink, nothing; if the sink key is padding
    or a special token, mask it with encoder_attention_mask in training.

    References: seed playbook, Pattern 2; Gu et al. 2025.
    """

    code = "XD203"
    slug = "single-key-dominates"
    symptom = Symptom.ATTENTION_COLLAPSE
    severity = Severity.WARNING
    summary = "one key is the top key of >= 90% of queries (info when entropy stays healthy)"
    options = {"share": float, "healthy_entropy": float, "uniform_entropy": float}
    defaults = {"share": 0.9, "healthy_entropy": 0.5, "uniform_entropy": 0.999}
    references = (SEED, SINKS)
    remedy = Remedy(
        summary="If entropy is low, treat as collapse (dropout, entropy regulariser, qk-norm); "
                "a sink with healthy entropy needs nothing.",
        config={"cross_attention": {"dropout": 0.1},
                "regularization": {"attention_entropy": {"weight": 0.01, "target": 2.0}}},
        references=(SEED, SINKS),
    )

    def check(self, ctx: BlockContext, opts: Mapping[str, Any]) -> list[Finding]:
        """Warn for a collapse onto one key; inform for a benign sink."""
        m = ctx.block.metrics
        share = m.top_key_share
        if share is None or not math.isfinite(share) or share < opts["share"]:
            return []
        if (m.valid_keys_mean or 0) < 2:
            return []
        ent = m.entropy_norm_mean if m.entropy_norm_mean is not None else math.nan
        if math.isfinite(ent) and ent > opts["uniform_entropy"]:
            return []  # (near-)uniform attention: argmax ties, not a favourite key
        sink = math.isfinite(ent) and ent >= opts["healthy_entropy"]
        evidence = {"top_key_share": share, "top_key_index": m.top_key_index,
                    "entropy_norm_mean": ent, "entropy_mean": m.entropy_mean}
        if sink:
            return [self.finding(ctx, Severity.INFO, f"key {m.top_key_index} is the top key of "
                                 f"{fmt(100 * share, 3)}% of queries, with healthy entropy "
                                 f"({fmt(ent, 3)} of the maximum): an attention sink", evidence)]
        return [self.finding(ctx, Severity.WARNING, f"key {m.top_key_index} is the top key of "
                             f"{fmt(100 * share, 3)}% of queries and entropy is low "
                             f"({fmt(ent, 3)} of the maximum)", evidence)]
