"""Turn the attention masks transformers builds internally back into a probe's [B, Lk] key mask.

Used by layouts' `capture` methods; works on live tensors through their methods only, so this
module (like every layout) never imports torch.
"""

from __future__ import annotations

from typing import Any


def key_mask(mask: Any) -> Any:
    """A [B, Lk] bool mask (True = may be attended to) from a 2-, 3- or 4-D library mask.

    A 2-D mask is the user's keep mask (1/True keeps). A 3-D [B, Lq, Lk] or 4-D
    [B, 1|H, Lq, Lk] mask is the library's expanded one: boolean (True keeps) or additive
    (0 keeps, a large negative value drops); it is per query, and a key counts as valid when
    any query may attend to it (the probe format has no per-query masks).
    Returns None when `mask` is None or not a tensor of rank 2 to 4.
    """
    if mask is None or not hasattr(mask, "dim") or not 2 <= mask.dim() <= 4:
        return None
    if mask.dtype.is_floating_point:
        valid = mask > 0.5 if mask.dim() == 2 else mask > -1.0
    else:
        valid = mask.bool()
    while valid.dim() > 2:
        valid = valid.any(dim=1)
    return valid


def keep_or_bias_mask(mask: Any) -> Any:
    """A [B, Lk] bool mask from a user-style mask of rank >= 2: a keep mask (bool or 0/1), or an
    additive bias (0 keeps, a large negative value drops). Extra middle dimensions (per query or
    per head) are reduced: a key is valid when any query may attend to it."""
    if mask.dtype.is_floating_point and bool((mask < 0).any()):
        keep = mask > -1.0
    else:
        keep = mask.bool()
    return keep.reshape(keep.shape[0], -1, keep.shape[-1]).any(1)
