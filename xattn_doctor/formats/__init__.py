"""Format registry: each module here registers one renderer with `@register`."""

from __future__ import annotations

from typing import TypeVar

from xattn_doctor._plugins import load
from xattn_doctor.formats._base import Renderer

_FORMATS: dict[str, Renderer] = {}
T = TypeVar("T")


def register(cls: type[T]) -> type[T]:
    """Class decorator: instantiate the renderer and add it under its `name`."""
    inst = cls()
    name: str = getattr(inst, "name")  # noqa: B009  (T is any renderer class)
    if name in _FORMATS:
        raise ValueError(f"format {name!r} registered twice")
    _FORMATS[name] = inst  # type: ignore[assignment]
    return cls


def _load() -> None:
    load(__name__, __path__)


def names() -> list[str]:
    """Registered format names, text first, then alphabetical."""
    _load()
    return sorted(_FORMATS, key=lambda n: (n != "text", n))


def get(name: str) -> Renderer:
    """The renderer called `name` (KeyError if none)."""
    _load()
    return _FORMATS[name]


__all__ = ["Renderer", "get", "names", "register"]
