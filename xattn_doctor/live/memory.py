"""Will the model fit? An estimate from the checkpoint's headers, made before anything loads,
so model mode refuses (exit 2, both figures named) instead of being OOM-killed mid-load.

Needed: the weights in the run dtype, a gradient of the same size for every floating weight,
and an activation margin of half the weights plus 256 MiB (one forward and backward of one
batch; a stated allowance, not a measurement).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from xattn_doctor.checkpoint import Checkpoint
from xattn_doctor.errors import UsageError
from xattn_doctor.st_header import FLOAT_DTYPES

MARGIN_FIXED = 256 * 2**20
MARGIN_SHARE = 0.5


@dataclass(frozen=True)
class Limits:
    """Bytes available: RAM (MemAvailable), and the device's free memory (None on CPU)."""

    ram: int
    device: int | None = None


def needed_bytes(ckpt: Checkpoint, dtype: torch.dtype) -> int:
    """Weights + gradients + activation margin, in bytes, for the run dtype."""
    size = torch.empty((), dtype=dtype).element_size()
    floats = other = 0
    for key, header in ckpt.where.items():
        info = header.tensors[key]
        n = 1
        for d in info.shape:
            n *= d
        if info.dtype in FLOAT_DTYPES:
            floats += n
        else:
            other += info.end - info.start
    weights = floats * size + other
    return weights + floats * size + int(MARGIN_SHARE * weights) + MARGIN_FIXED


def available(device: torch.device) -> Limits:
    """What this machine has free now."""
    free_dev = None
    if device.type == "cuda":
        free_dev = int(torch.cuda.mem_get_info(device)[0])
    return Limits(ram=_mem_available(), device=free_dev)


def check_fits(ckpt: Checkpoint, device: torch.device, dtype: torch.dtype,
               limits: Limits | None = None) -> int:
    """Raise UsageError when the model cannot fit; returns the bytes it needs."""
    need = needed_bytes(ckpt, dtype)
    have = limits or available(device)
    where, free = ("device " + str(device), have.device) if device.type == "cuda" \
        else ("available RAM", have.ram)
    if free is not None and need > free:
        raise UsageError(ckpt.path, f"model mode needs about {_mib(need)} (weights, gradients "
                                    f"and an activation margin) but {where} has {_mib(free)} "
                                    "free; refused before loading (try --dtype bfloat16, or "
                                    "a larger device)")
    return need


def _mem_available() -> int:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    import os

    return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES"))


def _mib(n: int) -> str:
    return f"{n / 2**20:,.0f} MiB"
