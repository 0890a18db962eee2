"""Resolve `--device` and `--dtype` to what torch can run here."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from xattn_doctor.errors import UsageError

CPU_BUDGET = 64 * 2**20
CUDA_BUDGET = 2**30

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16,
          "float64": torch.float64}


@dataclass(frozen=True)
class Runtime:
    """Where and in which dtype the probe runs, and why the dtype was chosen."""

    device: torch.device
    dtype: torch.dtype
    note: str | None = None

    @property
    def dtype_name(self) -> str:
        """'bfloat16' etc."""
        return str(self.dtype).replace("torch.", "")


def resolve_device(name: str) -> torch.device:
    """`auto` is CUDA when available, else CPU; `cuda[:N]` must exist."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError as e:
        raise UsageError(None, f"--device {name!r} is not a device (auto, cpu, cuda, cuda:N)") from e
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise UsageError(None, f"--device {name}: CUDA is not available on this machine")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise UsageError(None, f"--device {name}: only {torch.cuda.device_count()} CUDA "
                                   "device(s)")
    elif dev.type != "cpu":
        raise UsageError(None, f"--device {name!r}: use auto, cpu, cuda or cuda:N")
    return dev


def resolve(device: str, dtype: str, checkpoint_dtype: str) -> Runtime:
    """Pick the device, then the dtype: `auto` is the checkpoint's own where it runs here."""
    dev = resolve_device(device)
    if dtype != "auto" and dtype not in DTYPES:
        raise UsageError(None, f"--dtype {dtype!r}: use auto, float32, bfloat16 or float16")
    wanted = checkpoint_dtype if dtype == "auto" else dtype
    chosen = DTYPES.get(wanted, torch.float32)
    if chosen not in (torch.float32, torch.float64) and not _runs(dev, chosen):
        return Runtime(dev, torch.float32, f"{wanted} is not supported on {dev}; ran float32")
    if dtype == "auto" and dev.type == "cpu" and chosen in (torch.bfloat16, torch.float16) \
            and not cpu_has_native(chosen):
        return Runtime(dev, torch.float32, f"this CPU has no native {wanted} (emulated, "
                                           "~100x slower); ran float32, --dtype forces it")
    note = None if wanted in DTYPES else f"checkpoint dtype {wanted} has no probe dtype; ran float32"
    return Runtime(dev, chosen, note)


NATIVE_FLAGS = {torch.bfloat16: {"avx512_bf16", "amx_bf16", "bf16"},
                torch.float16: {"avx512_fp16", "amx_fp16", "fphp", "asimdhp"}}


def cpu_has_native(dtype: torch.dtype) -> bool:
    """True when /proc/cpuinfo lists an instruction set for `dtype` matrix work."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as fh:
            flags = {w for line in fh if line.lower().startswith(("flags", "features"))
                     for w in line.split(":", 1)[-1].split()}
    except OSError:
        return False
    return bool(flags & NATIVE_FLAGS.get(dtype, set()))


def _runs(dev: torch.device, dtype: torch.dtype) -> bool:
    """True when a matmul, softmax, layer norm and backward work in `dtype` on `dev`."""
    try:
        a = torch.ones(4, 4, device=dev, dtype=dtype, requires_grad=True)
        y = torch.nn.functional.layer_norm(torch.softmax(a @ a, -1), (4,))
        torch.autograd.backward(y.sum())
        return True
    except (RuntimeError, NotImplementedError):
        return False


def default_budget(device: torch.device) -> int:
    """Bytes for score tiles and the backward when the config sets none: 64 MiB on a CPU (the
    resident set CI boxes have room for); on a GPU 1 GiB, or an eighth of what is free if less,
    so that long contexts run in few large tiles rather than many small kernel launches."""
    if device.type != "cuda":
        return CPU_BUDGET
    try:
        free, _ = torch.cuda.mem_get_info(device)
    except RuntimeError:
        return CPU_BUDGET
    return max(CPU_BUDGET, min(CUDA_BUDGET, free // 8))
