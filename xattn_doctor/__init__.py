"""xattn-doctor: find and explain unstable cross-attention blocks in a checkpoint."""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version
from typing import Any

try:
    __version__ = version("xattn-doctor")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0+unknown"

__all__ = ["__version__", "capture_probe", "diagnose"]


def diagnose(*args: Any, **kwargs: Any) -> Any:
    """Diagnose checkpoints; see `xattn_doctor.api.diagnose` (imported lazily: it needs torch)."""
    from xattn_doctor.api import diagnose as _diagnose

    return _diagnose(*args, **kwargs)


def capture_probe(*args: Any, **kwargs: Any) -> Any:
    """Record what reaches each cross-attention block; see `xattn_doctor.live.capture.capture_probe`."""
    from xattn_doctor.live.capture import capture_probe as _capture

    return _capture(*args, **kwargs)
