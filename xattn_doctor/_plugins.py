"""The one discovery mechanism behind the layout, rule and format registries."""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Iterable
from functools import cache


@cache
def import_siblings(package: str, path: tuple[str, ...]) -> None:
    """Import every public module of `package` once (each registers itself on import)."""
    for info in pkgutil.iter_modules(list(path)):
        if not info.name.startswith("_"):
            importlib.import_module(f"{package}.{info.name}")


def load(package: str, path: Iterable[str]) -> None:
    """`import_siblings` for a package's `__name__` and `__path__`."""
    import_siblings(package, tuple(path))
