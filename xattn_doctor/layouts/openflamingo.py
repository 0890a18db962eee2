"""OpenFlamingo (open_flamingo 2.x): the gated cross-attention blocks its FlamingoLMMixin adds to
a language model, and its Perceiver resampler.

Key names. `init_flamingo` registers the blocks twice: as `lang_encoder.gated_cross_attn_layers.N`
and, through the FlamingoLayer wrapping each decoder layer, as
`lang_encoder.<decoder layers>.N.gated_cross_attn_layer` (`model.layers` for LLaMA,
`transformer.blocks` for MPT, `gpt_neox.layers` for RedPajama, ...). OpenFlamingo's own training
checkpoints keep only the latter; a full `state_dict()` holds both (one module, two names), and a
deduplicating save keeps either. Both copies are reported as one block, named by the
FlamingoLayer path. The resampler is `perceiver.layers.N.0` with `perceiver.latents`.

Heads: OpenFlamingo builds every block with the library defaults, 8 heads of 64 (inner width 512);
no config field holds them (a config.json beside the weights describes the language model, not
these blocks). They are reported with heads_source "config" (fixed by the architecture).
"""

from __future__ import annotations

import re
from dataclasses import replace
from typing import Any

from xattn_doctor.layouts import register
from xattn_doctor.layouts._base import (
    BlockSpec,
    HeadsSource,
    KeyIndex,
    ModelConfig,
    default_heads,
)
from xattn_doctor.layouts._lucidrains import (
    capture_gated,
    capture_resampler,
    gated_modules,
    gated_xattn,
    resampler_attention,
    resampler_modules,
)

MIRROR = re.compile(r"^(?:(?P<root>.*)\.)?gated_cross_attn_layers\.(?P<n>\d+)$")
LIBRARY_HEADS = 8  # GatedCrossAttentionBlock and PerceiverResampler as OpenFlamingo builds them
HEADS_NOTE = ("Heads: OpenFlamingo builds these blocks with 8 heads of 64 (its defaults, not in "
              "any config file); --heads overrides.")


def _heads(inner: int) -> tuple[int, HeadsSource]:
    """8 heads of 64 when the width is OpenFlamingo's fixed 512 (not assumed: the library
    builds every block so), else the documented default."""
    if inner == LIBRARY_HEADS * 64:
        return LIBRARY_HEADS, "config"
    return default_heads(inner), "default"


def _is_openflamingo(module: str) -> bool:
    return module.rsplit(".", 1)[-1] == "gated_cross_attn_layer" or bool(MIRROR.match(module))


def _primary_of(mirror: str, modules: list[str]) -> str | None:
    """The FlamingoLayer path (`<root>.<layers>.N.gated_cross_attn_layer`) of a mirror copy."""
    found = MIRROR.match(mirror)
    assert found is not None
    root, n = found.group("root") or "", found.group("n")
    tail = f".{n}.gated_cross_attn_layer"
    return next((m for m in modules if m.endswith(tail) and (not root or m.startswith(root + "."))
                 and not MIRROR.match(m)), None)


def _mirror_only(spec: BlockSpec) -> BlockSpec:
    """A block saved under one name only. Under `gated_cross_attn_layers.N` it is also the
    live `<decoder layers>.N.gated_cross_attn_layer`, which a captured probe names: alias it."""
    found = MIRROR.match(spec.name)
    if found is None:
        return replace(spec, notes=spec.notes + (HEADS_NOTE,))
    root, n = found.group("root"), found.group("n")
    live = f"{root + '.' if root else ''}*.{n}.gated_cross_attn_layer"
    return replace(spec, aliases=(live,), notes=spec.notes + (HEADS_NOTE,))


@register
class OpenFlamingo:
    """OpenFlamingo's gated cross-attention blocks (both key names) and Perceiver resampler."""

    name = "openflamingo"
    priority = 60

    def match(self, index: KeyIndex, config: ModelConfig) -> list[BlockSpec]:
        """Every gated block under OpenFlamingo's names; the resampler when there are any."""
        modules = [m for m in gated_modules(index) if _is_openflamingo(m)]
        specs = {m: gated_xattn(index, m, self.name, _heads) for m in modules}
        found: list[BlockSpec] = []
        mirrors: dict[str, str] = {}
        for m in modules:
            primary = _primary_of(m, modules) if MIRROR.match(m) else None
            if primary is not None and specs[primary] is not None:
                mirrors[primary] = m
        for m, spec in specs.items():
            if spec is None or m in mirrors.values():
                continue
            mirror = specs.get(mirrors.get(m, ""))
            found.append(self._with_mirror(spec, mirror) if mirror else _mirror_only(spec))
        if found:
            found += [replace(s, notes=s.notes + (HEADS_NOTE,)) for s in (
                resampler_attention(index, r, self.name, _heads)
                for r in resampler_modules(index)) if s is not None]
        return found

    @staticmethod
    def _with_mirror(spec: BlockSpec, mirror: BlockSpec) -> BlockSpec:
        return replace(spec, extra_keys=spec.extra_keys + tuple(sorted(mirror.keys())),
                       aliases=(mirror.name,),
                       notes=spec.notes + (HEADS_NOTE, f"Also saved as {mirror.name} (the same "
                                           "module under FlamingoLMMixin's second name); read "
                                           "from here."))

    def capture(self, spec: BlockSpec, args: tuple[Any, ...],
                kwargs: dict[str, Any]) -> dict[str, Any] | None:
        """GatedCrossAttentionBlock(x, media, ...) or resampler PerceiverAttention(media, latents)."""
        if spec.kv_includes_queries:
            return capture_resampler(args, kwargs)
        return capture_gated(args, kwargs)

