"""Errors the tool reports as one line and exit code 2 (bad input, never a bug)."""

from __future__ import annotations

from pathlib import Path


class DoctorError(Exception):
    """An input problem: `path` (may be None) and what is wrong with it, as one line."""

    kind = "error"

    def __init__(self, path: str | Path | None, detail: str) -> None:
        super().__init__(detail)
        self.path = str(path) if path is not None else None
        self.detail = " ".join(str(detail).split())

    def __str__(self) -> str:
        path = self.path
        if path and not path.isprintable():  # a newline in a file name must not break the line
            path = repr(path)
        where = f"{path}: " if path else ""
        return f"{where}{self.detail}"


class CheckpointError(DoctorError):
    """The checkpoint cannot be read: missing, malformed, hostile or empty."""


class PickleRefused(CheckpointError):
    """A pickle checkpoint; never unpickled."""

    def __init__(self, path: str | Path) -> None:
        super().__init__(
            path,
            "pickle checkpoints are never unpickled (they can run arbitrary code); convert it "
            "to safetensors where you trust it, e.g. `python -c \"import torch; from "
            "safetensors.torch import save_file; sd = torch.load('IN', weights_only=True); "
            "save_file({k: v.contiguous() for k, v in sd.items()}, 'OUT.safetensors')\"`, "
            "or `model.save_pretrained(dir, safe_serialization=True)`",
        )


class ProbeError(DoctorError):
    """The probe file is unreadable or does not fit the blocks."""


class NoBlocksError(DoctorError):
    """No cross-attention block was recognised in the checkpoint."""


class ConfigError(DoctorError):
    """The thresholds/config file is invalid."""


class UsageError(DoctorError):
    """Options that contradict each other or the checkpoint."""
