"""XD105: the max logit grows at every checkpoint toward XD101's threshold."""

from __future__ import annotations

from xattn_doctor.findings import Remedy, Symptom
from xattn_doctor.rules import register
from xattn_doctor.rules._series import SeriesRule

_REFS = (
    "https://arxiv.org/abs/2302.05442",  # Dehghani et al. 2023, ViT-22B: attention logit growth
    "https://arxiv.org/abs/2309.14322",  # Wortsman et al. 2023, small-scale proxies
)


@register
class XD105(SeriesRule):
    """The block's max attention logit rose at every one of the last checkpoints.

    It is still below XD101's threshold, but a straight line through the series crosses
    it soon; the finding gives the checkpoint (or training step) where it would.

    Why:
        Attention logits that keep growing during training are the usual forerunner of
        a loss spike: once the scaled scores pass about 20 the softmax is nearly one-hot,
        its gradient vanishes for all but one key and explodes for that one. Query and
        key weights grow together, so the growth compounds rather than levels off.

    Fix:
        Bound the logits before they run away: normalise queries and keys (qk-norm),
        or add a learnable temperature clamped from below; clip the global gradient
        norm to 1.0; keep watching the max logit every 100 steps.

    References:
        - Dehghani et al. 2023, "Scaling Vision Transformers to 22 Billion Parameters"
          (attention logit growth, qk-layernorm): https://arxiv.org/abs/2302.05442
        - Wortsman et al. 2023, "Small-scale proxies for large-scale Transformer training
          instabilities": https://arxiv.org/abs/2309.14322
    """

    code = "XD105"
    slug = "logit_growth_trend"
    symptom = Symptom.GRADIENT_EXPLOSION
    summary = "max logit rises at every checkpoint toward XD101's threshold"
    metric = "max_logit"
    direction = "rising"
    watches = ("XD101", "warn_at")
    fallback_threshold = 50.0
    references = _REFS
    remedy = Remedy(
        summary="Bound the logits now (qk-norm or a clamped temperature) and clip gradients.",
        config={"gradient_clipping": {"max_grad_norm": 1.0, "clip_type": "norm"},
                "monitoring": {"log_attention_every": 100}},
        references=_REFS,
        code_change=("q = self.q_norm(q)  # LayerNorm/RMSNorm over each head's dim\n"
                     "k = self.k_norm(k)"),
    )
