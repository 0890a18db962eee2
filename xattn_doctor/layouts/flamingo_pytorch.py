"""flamingo-pytorch (lucidrains): `GatedCrossAttentionBlock` (text attends to media, tanh-gated)
and the Perceiver resampler's `PerceiverAttention` (latents attend to media and themselves),
wherever they sit (FlamingoPaLM: `layers.N.1`, `perceiver_resampler.layers.N.0`).

Heads: config.json `heads` (or `dim_head`), as passed to FlamingoPaLM, else the library's
default 64-wide heads.
"""

from __future__ import annotations

from typing import Any

from xattn_doctor.layouts import register
from xattn_doctor.layouts._base import BlockSpec, KeyIndex, ModelConfig
from xattn_doctor.layouts._lucidrains import (
    capture_gated,
    capture_resampler,
    config_heads,
    gated_modules,
    gated_xattn,
    resampler_attention,
    resampler_modules,
)


@register
class FlamingoPytorch:
    """Gated cross-attention and resampler blocks in flamingo-pytorch's key layout."""

    name = "flamingo_pytorch"
    priority = 55

    def match(self, index: KeyIndex, config: ModelConfig) -> list[BlockSpec]:
        """Every gated cross-attention block and resampler attention."""
        heads = config_heads(config, ("heads",), ("dim_head",))
        found = [gated_xattn(index, m, self.name, heads) for m in gated_modules(index)]
        found += [resampler_attention(index, m, self.name, heads)
                  for m in resampler_modules(index)]
        return [s for s in found if s is not None]

    def capture(self, spec: BlockSpec, args: tuple[Any, ...],
                kwargs: dict[str, Any]) -> dict[str, Any] | None:
        """The block's inputs: (x, media) for gated blocks, (media, latents) for the resampler."""
        if spec.kv_includes_queries:
            return capture_resampler(args, kwargs)
        return capture_gated(args, kwargs)
