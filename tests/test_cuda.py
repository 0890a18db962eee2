"""CUDA runs agree with CPU runs (skipped without a GPU; `tests/benchmarks/gpu_check.sh` runs them)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from xattn_doctor.api import diagnose
from xattn_doctor.options import Options

FIX = Path(__file__).resolve().parent.parent / "fixtures"
pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


@pytest.mark.parametrize("name", ["healthy", "logit_explosion", "stack6", "attention_collapse"])
def test_cuda_float32_matches_cpu(name: str) -> None:
    folder = FIX / name
    probe = folder / "probe.safetensors"
    cpu = diagnose([folder], probe=probe, options=Options(device="cpu", dtype="float32"))[0]
    gpu = diagnose([folder], probe=probe, options=Options(device="cuda", dtype="float32"))[0]
    assert gpu.device == "cuda:0"
    for a, b in zip(cpu.blocks, gpu.blocks):
        assert b.metrics.max_logit == pytest.approx(a.metrics.max_logit, rel=1e-3, abs=1e-3)
        assert b.metrics.entropy_mean == pytest.approx(a.metrics.entropy_mean, rel=1e-3, abs=1e-3)
        assert b.metrics.grad_norm == pytest.approx(a.metrics.grad_norm, rel=1e-3)
    assert {(f.code, f.block) for f in cpu.findings} == {(f.code, f.block) for f in gpu.findings}


def test_cuda_bf16_runs_in_bf16_and_accumulates_in_float32() -> None:
    folder = FIX / "stack6"
    rep = diagnose([folder], probe=folder / "probe.safetensors",
                   options=Options(device="cuda", dtype="bfloat16"))[0]
    assert rep.dtype.startswith("bfloat16")
    ref = diagnose([folder], probe=folder / "probe.safetensors",
                   options=Options(device="cpu", dtype="float32"))[0]
    for a, b in zip(ref.blocks, rep.blocks):
        assert b.metrics.entropy_mean == pytest.approx(a.metrics.entropy_mean, rel=0.05, abs=0.02)
    assert any(f.code == "XD101" for f in rep.findings)


def test_cuda_default_budget_is_larger_and_bounded() -> None:
    from xattn_doctor.runtime import CPU_BUDGET, CUDA_BUDGET, default_budget

    free, _ = torch.cuda.mem_get_info()
    got = default_budget(torch.device("cuda"))
    assert CPU_BUDGET <= got <= CUDA_BUDGET
    assert got == max(CPU_BUDGET, min(CUDA_BUDGET, free // 8))
