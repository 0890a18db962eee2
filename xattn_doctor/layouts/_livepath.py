"""Where a block lives in a live model when the checkpoint was saved under other prefixes.

transformers 5 saves some models under legacy prefixes (`MllamaForConditionalGeneration`:
live `model.language_model.layers.3`, saved `language_model.model.layers.3`). The live module
is the one whose state-dict keys, relative to it, are the block's relative keys; among several
(identical layers), the one sharing the longest dotted suffix with the saved name. Works on
key names only: no torch import.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable

from xattn_doctor.layouts._base import BlockSpec, join


def live_prefix(keys: Iterable[str], spec: BlockSpec) -> str | None:
    """The live module path of `spec` among a live model's state-dict `keys` (None: not found
    or ambiguous)."""
    keyset = keys if isinstance(keys, (set, frozenset)) else set(keys)
    head = spec.name + "." if spec.name else ""
    rel = sorted(k[len(head):] for k in spec.keys() if k.startswith(head))  # noqa: SIM118
    if not rel:
        return None
    if all(join(spec.name, r) in keyset for r in rel):
        return spec.name
    anchor = rel[0]
    found = {k[: -len(anchor)].rstrip(".") for k in keyset
             if k == anchor or k.endswith("." + anchor)}
    found = {p for p in found if all(join(p, r) in keyset for r in rel)}
    ranked = sorted(((_shared_suffix(p, spec.name), p) for p in found), reverse=True)
    if not ranked or (len(ranked) > 1 and ranked[0][0] == ranked[1][0]):
        return None
    return ranked[0][1]


def live_path(keys: Collection[str], spec: BlockSpec, saved: str | None = None) -> str | None:
    """The live path of the block (or of `saved`, a module path renamed like the block's),
    given the live model's state-dict `keys`."""
    prefix = live_prefix(keys, spec)
    if prefix is None or saved is None:
        return prefix
    common = _shared_suffix(prefix, spec.name)
    old = _drop_tail(spec.name, common)
    new = _drop_tail(prefix, common)
    if old and not (saved == old or saved.startswith(old + ".")):
        return None
    rest = saved[len(old):].lstrip(".") if old else saved
    return join(new, rest) if new else rest


def _shared_suffix(a: str, b: str) -> int:
    """How many trailing dotted components `a` and `b` share."""
    n = 0
    for x, y in zip(reversed(a.split(".")), reversed(b.split("."))):
        if x != y:
            break
        n += 1
    return n


def _drop_tail(path: str, n: int) -> str:
    parts = path.split(".")
    return ".".join(parts[: len(parts) - n]) if n else path
