"""XD405: the effective gate grows at every checkpoint toward saturation."""

from __future__ import annotations

from xattn_doctor.findings import Remedy, Symptom
from xattn_doctor.rules import register
from xattn_doctor.rules._series import SeriesRule

_REFS = ("https://arxiv.org/abs/2204.14198",)  # Alayrac et al. 2022, Flamingo tanh gates


@register
class XD405(SeriesRule):
    """The block's effective gate |tanh(alpha)| grew at every one of the last checkpoints.

    It is still below saturation (0.99 by default), but a straight line through the
    series reaches it soon; the finding gives where.

    Why:
        A tanh gate near +-1 no longer gates: the cross-attention output enters the
        residual stream at full strength, and d tanh / d alpha = 1 - tanh^2 goes to zero,
        so the gate can no longer be trained back. A gate that climbs steadily is
        usually driven by a learning rate too high for this one scalar.

    Fix:
        Give the gate parameters their own optimizer group with a lower learning rate
        (about a tenth) and no weight decay, and log the gate values as training runs.

    References:
        - Alayrac et al. 2022, "Flamingo: a Visual Language Model for Few-Shot Learning"
          (tanh-gated cross-attention): https://arxiv.org/abs/2204.14198
    """

    code = "XD405"
    slug = "gate_saturation_trend"
    symptom = Symptom.GATING
    summary = "|gate| rises at every checkpoint toward saturation"
    metric = "gate"
    direction = "rising"
    magnitude = True
    watches = ("XD402", "above")
    fallback_threshold = 0.99
    references = _REFS
    remedy = Remedy(
        summary="Slow the gates down: their own parameter group with a lower learning rate.",
        config={"cross_attention": {"use_gating": True},
                "monitoring": {"log_attention_every": 100}},
        references=_REFS,
        code_change=("gates = [p for n, p in model.named_parameters() if 'gate' in n]\n"
                     "rest = [p for n, p in model.named_parameters() if 'gate' not in n]\n"
                     "opt = AdamW([{'params': rest},\n"
                     "             {'params': gates, 'lr': lr * 0.1, 'weight_decay': 0.0}],"
                     " lr=lr)"),
    )
