"""Format registry: each module here registers one renderer with `@register`."""

from __future__ import annotations

import importlib
import pkgutil
from typing import TypeVar

from xattn_doctor.formats._base import Renderer

_FORMATS: dict[str, Renderer] = {}
_LOADED = False
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
    global _LOADED
    if not _LOADED:
        for info in pkgutil.iter_modules(__path__):
            if not info.name.startswith("_"):
                importlib.import_module(f"{__name__}.{info.name}")
        _LOADED = True


def names() -> list[str]:
    """Registered format names, text first, then alphabetical."""
    _load()
    return sorted(_FORMATS, key=lambda n: (n != "text", n))


def get(name: str) -> Renderer:
    """The renderer called `name` (KeyError if none)."""
    _load()
    return _FORMATS[name]


__all__ = ["Renderer", "get", "names", "register"]
