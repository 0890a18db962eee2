#!/usr/bin/env bash
# One command for a machine with a GPU: the CUDA tests, then the benchmark on CUDA at the larger
# geometry (hidden 4096, 32/8 heads, 4 tiles x 1601 image tokens, 2048 text tokens).
# Usage: bash tests/benchmarks/gpu_check.sh [OUT_DIR]
set -euo pipefail
cd "$(dirname "$0")/../.."
out=${1:-bench-out}
mkdir -p "$out"
python3 -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print(torch.cuda.get_device_name(0))"
PYTHONUNBUFFERED=1 python3 -m pytest -q -m cuda tests/test_cuda.py 2>&1 | tee "$out/cuda-tests.log"
PYTHONUNBUFFERED=1 python3 tests/benchmarks/bench_mllama.py --device cuda --geometry large \
    --layers 20 --rounds 3 --workdir "$out" --json "$out/bench-cuda.json" 2>&1 | tee "$out/bench-cuda.log"
