"""XD106: the block's gradient norm grows at every checkpoint toward the explosion threshold."""

from __future__ import annotations

from xattn_doctor.findings import Remedy, Symptom
from xattn_doctor.rules import register
from xattn_doctor.rules._series import SeriesRule

_REFS = (
    "https://arxiv.org/abs/2002.04745",  # Xiong et al. 2020, pre-LN gradients
    "https://pytorch.org/docs/stable/generated/torch.nn.utils.clip_grad_norm_.html",
)


@register
class XD106(SeriesRule):
    """The block's gradient norm on the probe rose at every one of the last checkpoints.

    It is still below XD102's warning threshold (10 by default), but a straight line
    through the series crosses it soon; the finding gives where.

    Why:
        The gradient reaching a cross-attention block on a fixed probe should stay
        roughly level once training has settled. Steady growth means the block's
        weights are moving toward a sharper region (large logits, saturated softmax,
        growing residual stream); clipping then starts to bite on every step and the
        run is close to a loss spike.

    Fix:
        Clip the global gradient norm to 1.0, and the cross-attention parameters
        separately to 0.5; lengthen the warmup; check that the block is pre-norm.

    References:
        - Xiong et al. 2020, "On Layer Normalization in the Transformer Architecture":
          https://arxiv.org/abs/2002.04745
        - PyTorch `clip_grad_norm_`:
          https://pytorch.org/docs/stable/generated/torch.nn.utils.clip_grad_norm_.html
    """

    code = "XD106"
    slug = "grad_norm_trend"
    symptom = Symptom.GRADIENT_EXPLOSION
    summary = "gradient norm rises at every checkpoint toward the explosion threshold"
    metric = "grad_norm"
    direction = "rising"
    watches = ("XD102", "warn_at")
    fallback_threshold = 10.0
    references = _REFS
    remedy = Remedy(
        summary="Clip gradients (cross-attention separately, tighter) and lengthen warmup.",
        config={"gradient_clipping": {"max_grad_norm": 1.0, "clip_type": "norm"},
                "lr_schedule": {"warmup_steps": 5000}},
        references=_REFS,
        code_change=("xattn = [p for n, p in model.named_parameters() if 'cross_attn' in n]\n"
                     "torch.nn.utils.clip_grad_norm_(xattn, max_norm=0.5)"),
    )
