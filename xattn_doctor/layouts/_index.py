"""What a layout reads from a checkpoint: its key names and shapes, and its config.json.

Both are plain data, read from headers and JSON; no tensor data and no torch.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any


class KeyIndex:
    """Key names and shapes of a checkpoint (read from headers; no tensor data)."""

    def __init__(self, shapes: Mapping[str, tuple[int, ...]]) -> None:
        self.shapes: dict[str, tuple[int, ...]] = dict(shapes)

    def __contains__(self, key: object) -> bool:
        return key in self.shapes

    def shape(self, key: str) -> tuple[int, ...] | None:
        """The shape of `key`, or None if absent."""
        return self.shapes.get(key)

    def with_suffix(self, suffix: str) -> list[str]:
        """Prefixes P such that P + suffix is a key (P keeps its trailing dot, or is '')."""
        return sorted(k[: -len(suffix)] for k in self.shapes if k.endswith(suffix)
                      and (len(k) == len(suffix) or k[-len(suffix) - 1] == "."))

    def under(self, prefix: str) -> list[str]:
        """All keys that start with `prefix` (give it with its trailing dot)."""
        return [k for k in self.shapes if k.startswith(prefix)]


class ModelConfig:
    """config.json, with lookups that also search nested sub-configs."""

    NESTED = ("text_config", "qformer_config", "vision_config", "perceiver_config",
              "decoder", "encoder", "llm_config", "language_config")

    def __init__(self, data: Mapping[str, Any] | None = None) -> None:
        self.data: dict[str, Any] = dict(data or {})

    def __bool__(self) -> bool:
        return bool(self.data)

    def section(self, name: str) -> ModelConfig:
        """A nested sub-config (empty when absent or not a mapping)."""
        sub = self.data.get(name)
        return ModelConfig(sub if isinstance(sub, Mapping) else None)

    def get(self, *names: str, default: Any = None) -> Any:
        """The first of `names` found at the top level, else in a nested config."""
        for n in names:
            if n in self.data and self.data[n] is not None:
                return self.data[n]
        for sub in self.NESTED:
            section = self.section(sub)
            if section:
                for n in names:
                    if n in section.data and section.data[n] is not None:
                        return section.data[n]
        return default

    def get_int(self, *names: str) -> int | None:
        """Like `get`, but only a positive integer counts."""
        value = self.get(*names)
        return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 \
            else None
