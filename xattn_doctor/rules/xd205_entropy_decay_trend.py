"""XD205: the lowest head's attention entropy falls at every checkpoint toward collapse."""

from __future__ import annotations

from xattn_doctor.findings import Remedy, Symptom
from xattn_doctor.rules import register
from xattn_doctor.rules._series import SeriesRule

_REFS = ("https://arxiv.org/abs/2303.06296",)  # Zhai et al. 2023, entropy collapse


@register
class XD205(SeriesRule):
    """The block's lowest-entropy head lost entropy at every one of the last checkpoints.

    It is still above the collapse threshold (0.5 nats by default), but a straight line
    through the series reaches it soon; the finding gives where.

    Why:
        A head whose entropy keeps falling is converging on a single key: it stops
        reading the other modality and its gradients become spiky. Entropy collapse
        tends to come before, and then with, loss instability.

    Fix:
        Keep attention spread while there is time: attention dropout of about 0.1, a
        small entropy regulariser on the cross-attention weights, or a bound on the
        logits (qk-norm, sigma-reparametrisation of the query/key projections).

    References:
        - Zhai et al. 2023, "Stabilizing Transformer Training by Preventing Attention
          Entropy Collapse": https://arxiv.org/abs/2303.06296
    """

    code = "XD205"
    slug = "entropy_decay_trend"
    symptom = Symptom.ATTENTION_COLLAPSE
    summary = "lowest head entropy falls at every checkpoint toward collapse"
    metric = "entropy_min_head"
    direction = "falling"
    watches = ("XD201", "nats")
    fallback_threshold = 0.5
    references = _REFS
    remedy = Remedy(
        summary="Keep attention spread: attention dropout and a small entropy regulariser.",
        config={"cross_attention": {"dropout": 0.1},
                "monitoring": {"log_attention_every": 100}},
        references=_REFS,
        code_change=("entropy = -(attn * attn.clamp_min(1e-9).log()).sum(-1).mean()\n"
                     "loss = loss + 0.01 * (2.0 - entropy).clamp_min(0)"),
    )
