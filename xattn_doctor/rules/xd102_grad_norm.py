"""XD102: the block's gradient norm under the proxy loss is exploding."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from xattn_doctor.findings import Finding, Remedy, Severity, Symptom
from xattn_doctor.rules import register
from xattn_doctor.rules._base import BlockContext, Rule, fmt
from xattn_doctor.rules._refs import FLAMINGO, SEED


@register
class XD102(Rule):
    """The block's parameter gradients are exploding.

    Why: the tool backpropagates a proxy loss <y, g> / (B * Lq) (g standard normal, the gradient
    a mean-reduced loss sends into the block) and takes the global norm of the block's parameter
    gradients. The seed playbook flags a total gradient norm above 100 as an explosion; 10 is
    a warning here. These numbers are rules of thumb (no paper sets them): set them from your
    own healthy runs.

    Fix: clip gradients by global norm (1.0, as Flamingo), clip cross-attention parameters
    separately and more strictly (0.5), lower the learning rate or lengthen warmup.

    References: seed playbook, "Monitor Gradient Norms" and "Per-Layer Norm Clipping";
    Flamingo (clip 1.0).
    """

    code = "XD102"
    slug = "gradient-norm-explosion"
    symptom = Symptom.GRADIENT_EXPLOSION
    severity = Severity.ERROR
    summary = "block gradient norm under the proxy loss is large (>= 10 warning, >= 100 error)"
    options = {"warn_at": float, "error_at": float}
    defaults = {"warn_at": 10.0, "error_at": 100.0}
    references = (SEED, FLAMINGO)
    remedy = Remedy(
        summary="Clip gradients (global 1.0; cross-attention parameters 0.5) and warm up longer.",
        config={"gradient_clipping": {"max_grad_norm": 1.0, "clip_type": "norm",
                                      "cross_attention_max_grad_norm": 0.5}},
        references=(SEED, FLAMINGO),
        code_change=("xattn = [p for n, p in model.named_parameters() if 'cross_attn' in n]\n"
                     "torch.nn.utils.clip_grad_norm_(xattn, max_norm=0.5)"),
    )

    def check(self, ctx: BlockContext, opts: Mapping[str, Any]) -> list[Finding]:
        """Warn or fail on the global gradient norm of the block."""
        m = ctx.block.metrics
        value = m.grad_norm
        if value is None or not math.isfinite(value) or value < opts["warn_at"]:
            return []
        sev = Severity.ERROR if value >= opts["error_at"] else Severity.WARNING
        top = max(m.grad_norms.items(), key=lambda kv: kv[1], default=("", 0.0))
        return [self.finding(ctx, sev, f"gradient norm {fmt(value)} (largest: {top[0]} "
                             f"{fmt(top[1])})", {"grad_norm": value, "grad_norms": m.grad_norms,
                                                 "input_grad_norms": m.input_grad_norms,
                                                 "backward_queries": m.backward_queries})]
