"""XD301: the two streams reach the projections at very different scales."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from xattn_doctor.findings import Finding, Remedy, Severity, Symptom
from xattn_doctor.rules import register
from xattn_doctor.rules._base import BlockContext, Rule, fmt
from xattn_doctor.rules._refs import SEED


@register
class XD301(Rule):
    """The context and query streams arrive at mismatched scales.

    Why: scale_ratio is RMS(context) / RMS(queries) as they reach the projections (after the
    block's own pre-norms). Far from 1, one modality dominates the logits or is ignored (CLIP
    features at norm 10-50 against text embeddings at 1-5). The seed playbook warns outside
    0.1-10 (a rule of thumb). When the raw ratio is off but the block's norms bring it back,
    that is only info: the norms absorb it. With a synthetic probe the scales are the tool's
    own, so the finding is info at most: capture real features with `capture_probe`.

    Fix: normalise both streams before the cross-attention (a key/context LayerNorm beside the
    query norm), or a learnable scale on the context.

    References: seed playbook, Pattern 3 "Feature Scale Mismatch".
    """

    code = "XD301"
    slug = "feature-scale-mismatch"
    symptom = Symptom.FEATURE_SCALE_MISMATCH
    severity = Severity.WARNING
    summary = "RMS(context)/RMS(query) at the projections outside [0.1, 10]"
    options = {"low": float, "high": float}
    defaults = {"low": 0.1, "high": 10.0}
    references = (SEED,)
    remedy = Remedy(
        summary="Add a LayerNorm on the context stream (key norm) beside the query norm.",
        config={"cross_attention": {"key_norm": True, "query_norm": True}},
        references=(SEED,),
        code_change=("self.key_norm = nn.LayerNorm(context_dim)\n"
                     "k = v = self.key_norm(visual_features)"),
    )

    def check(self, ctx: BlockContext, opts: Mapping[str, Any]) -> list[Finding]:
        """Warn on the ratio at the projections; inform on a raw mismatch the norms absorb."""
        m = ctx.block.metrics
        at, raw = m.scale_ratio, m.scale_ratio_raw
        evidence = {"scale_ratio": at, "scale_ratio_raw": raw, "query_rms": m.query_rms,
                    "context_rms": m.context_rms, "synthetic_inputs": ctx.synthetic}
        if at is not None and math.isfinite(at) and not opts["low"] <= at <= opts["high"]:
            sev = Severity.INFO if ctx.synthetic else Severity.WARNING
            note = " (synthetic inputs: capture real features to confirm)" if ctx.synthetic else ""
            return [self.finding(ctx, sev, f"context/query RMS ratio {fmt(at)} at the projections "
                                 f"is outside [{fmt(opts['low'])}, {fmt(opts['high'])}]{note}",
                                 evidence)]
        if raw is not None and math.isfinite(raw) and not opts["low"] <= raw <= opts["high"]:
            return [self.finding(ctx, Severity.INFO, f"raw context/query RMS ratio {fmt(raw)} is "
                                 f"off, but the block's norms bring it to {fmt(at)}", evidence)]
        return []
