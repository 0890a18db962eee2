"""XD201: attention entropy has collapsed (queries attend to almost nothing but one key)."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from xattn_doctor.findings import Finding, Remedy, Severity, Symptom
from xattn_doctor.rules import register
from xattn_doctor.rules._base import BlockContext, Rule, fmt
from xattn_doctor.rules._refs import SEED, ZHAI


def threshold(opts: Mapping[str, Any], valid_keys: float | None) -> float:
    """min(nats, fraction * ln(valid keys)): 0.5 nats, scaled down for short key sets."""
    n = valid_keys or 0.0
    scaled = opts["fraction"] * math.log(n) if n > 1 else 0.0
    return float(min(opts["nats"], scaled))


@register
class XD201(Rule):
    """Attention entropy has collapsed.

    Why: entropy (nats, per query, averaged over queries) near zero means each query puts
    nearly all weight on one key, so the block ignores most of the other stream; Zhai et al.
    show entropy collapse precedes divergence. The seed playbook calls < 0.5 nats collapsed
    (a rule of thumb). With few keys even uniform attention has low entropy (ln n), so the
    threshold is min(0.5 nats, 0.25 ln n). Error when the heads' mean is below it; a warning
    when at least half of the heads are; info for single heads (a sharp retrieval head can be
    exactly right).

    Fix: attention dropout (0.1), an entropy regulariser (target 2.0 nats, weight 0.01), qk-norm
    or sigma-reparametrisation against the logit growth that drives it, more heads.

    References: Zhai et al. 2023; seed playbook, Pattern 2.
    """

    code = "XD201"
    slug = "attention-entropy-collapse"
    symptom = Symptom.ATTENTION_COLLAPSE
    severity = Severity.ERROR
    summary = "attention entropy below min(0.5 nats, 0.25 ln n_keys) (mean of heads: error)"
    options = {"nats": float, "fraction": float, "head_share": float}
    defaults = {"nats": 0.5, "fraction": 0.25, "head_share": 0.5}
    references = (ZHAI, SEED)
    remedy = Remedy(
        summary="Add attention dropout and an entropy regulariser; bound the logits (qk-norm).",
        config={"cross_attention": {"dropout": 0.1, "qk_norm": True},
                "regularization": {"attention_entropy": {"weight": 0.01, "target": 2.0}}},
        references=(ZHAI, SEED),
        code_change=("ent = -(attn * attn.clamp_min(1e-9).log()).sum(-1).mean()\n"
                     "loss = loss + 0.01 * (ent - 2.0) ** 2"),
    )

    def check(self, ctx: BlockContext, opts: Mapping[str, Any]) -> list[Finding]:
        """Grade the collapse by how many heads are below the threshold."""
        m = ctx.block.metrics
        heads = [h for h in m.head_entropy if math.isfinite(h)]
        if not heads or m.entropy_mean is None:
            return []
        limit = threshold(opts, m.valid_keys_mean)
        low = [i for i, h in enumerate(m.head_entropy) if math.isfinite(h) and h < limit]
        if not low:
            return []
        evidence = {"entropy_mean": m.entropy_mean, "entropy_min_head": m.entropy_min_head,
                    "threshold_nats": limit, "collapsed_heads": low, "heads": len(heads),
                    "valid_keys": m.valid_keys_mean, "head_entropy": m.head_entropy}
        if m.entropy_mean < limit:
            return [self.finding(ctx, Severity.ERROR, f"mean attention entropy {fmt(m.entropy_mean)}"
                                 f" nats < {fmt(limit)}: attention has collapsed", evidence)]
        sev = Severity.WARNING if len(low) >= opts["head_share"] * len(heads) else Severity.INFO
        return [self.finding(ctx, sev, f"{len(low)} of {len(heads)} heads below {fmt(limit)} nats"
                             f" (lowest {fmt(m.entropy_min_head)})", evidence)]
