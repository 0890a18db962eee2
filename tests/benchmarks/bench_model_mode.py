#!/usr/bin/env python3
"""Model mode's cost: `diagnose --model auto --batch` against a plain
`model(**batch).loss.backward()` of the same model, on the README's benchmark model (mllama,
see bench_mllama.py) scaled to fit a small CPU machine. A script, not a test: it prints figures.

    python tests/benchmarks/bench_model_mode.py                 # "cpu" geometry, 3 rounds
    python tests/benchmarks/bench_model_mode.py --geometry tiny --rounds 1

Each measurement runs in a fresh subprocess, the two interleaved round by round:
    plain  transformers from_pretrained (float32) + one forward with the batch's labels +
           loss.backward()  (what any training step does)
    model  python -m xattn_doctor diagnose DIR --model auto --batch BATCH --device cpu
           --dtype float32 --format json --output /dev/null
Wall time is the parent's clock around the whole child (interpreter start and imports
included); peak RSS is the child's ru_maxrss from os.wait4. Targets (issue 10): model/plain
<= 1.5x wall time and <= 1.3x peak RSS. The parent imports only the standard library.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
SCALED = dict(hidden=512, heads=8, kv_heads=4, intermediate=1536, layers=8, cross_start=1,
              cross_stride=4, vocab=16000,
              vision=dict(hidden_size=64, num_hidden_layers=1, num_global_layers=1,
                          attention_heads=2, intermediate_size=128, image_size=224, patch_size=14),
              text_tokens=256, tiles=1)
TARGETS = {"wall": 1.5, "rss": 1.3}


def child_build(out: Path, geometry: str) -> None:
    import torch
    from safetensors.torch import save_file
    from transformers import MllamaForConditionalGeneration

    sys.path.insert(0, str(HERE))
    import bench_mllama as bm

    if geometry == "cpu":
        bm.GEOMETRIES["cpu"] = SCALED
    g = bm.geometry(geometry)
    torch.manual_seed(0)
    model = MllamaForConditionalGeneration(bm._mllama_config(g)).float()
    model.save_pretrained(str(out / "model"), max_shard_size="200MB")
    gen = torch.Generator().manual_seed(1)
    n = g["text_tokens"]
    ids = torch.randint(3, g["vocab"], (1, n), generator=gen)
    states = torch.randn(1, g["tiles"] * g["image_tokens_per_tile"], g["hidden"], generator=gen)
    save_file({"input_ids": ids, "labels": ids.clone(), "cross_attention_states": states,
               "cross_attention_mask": torch.ones(1, n, 1, g["tiles"], dtype=torch.long)},
              str(out / "batch.safetensors"))
    params = sum(p.numel() for p in model.parameters())
    print(json.dumps({"params": params, "cross_layers": g["cross_layers"]}))


def child_plain(out: Path) -> None:
    import torch
    from safetensors.torch import load_file
    from transformers import MllamaForConditionalGeneration

    model = MllamaForConditionalGeneration.from_pretrained(str(out / "model"),
                                                           dtype=torch.float32).eval()
    batch = load_file(str(out / "batch.safetensors"))
    loss = model(**batch).loss
    loss.backward()
    print(json.dumps({"loss": float(loss)}))


def run_child(cmd: list[str]) -> tuple[float, float, str]:
    """(wall seconds, peak RSS MiB, stdout) of one child, peak RSS from os.wait4."""
    t0 = time.perf_counter()
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=out, stderr=err,
                                env={**os.environ, "HF_HUB_DISABLE_PROGRESS_BARS": "1"})
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - t0
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        if proc.returncode != 0:
            raise SystemExit(f"child failed ({' '.join(cmd)}):\n{err.read().decode()[-2000:]}")
        return wall, usage.ru_maxrss / 1024, out.read().decode()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--geometry", default="cpu", help="cpu (default), or bench_mllama's")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--child", choices=["build", "plain"])
    ap.add_argument("--dir", type=Path)
    args = ap.parse_args()
    if args.child == "build":
        child_build(args.dir, args.geometry)
        return 0
    if args.child == "plain":
        child_plain(args.dir)
        return 0
    with tempfile.TemporaryDirectory(prefix="xd-bench-model-") as tmp:
        work = Path(tmp)
        me = [sys.executable, str(Path(__file__).resolve())]
        _, _, info = run_child(me + ["--child", "build", "--dir", str(work),
                                     "--geometry", args.geometry])
        print(f"geometry {args.geometry}: {info.strip()}")
        tool = [sys.executable, "-m", "xattn_doctor", "diagnose", str(work / "model"),
                "--model", "auto", "--batch", str(work / "batch.safetensors"), "--device",
                "cpu", "--dtype", "float32", "--format", "json", "--output", "/dev/null",
                "--fail-on", "never"]
        runs: dict[str, list[tuple[float, float]]] = {"plain": [], "model": []}
        for r in range(args.rounds):
            for name, cmd in (("plain", me + ["--child", "plain", "--dir", str(work)]),
                              ("model", tool)):
                wall, rss, _ = run_child(cmd)
                runs[name].append((wall, rss))
                print(f"round {r + 1} {name:5}: wall {wall:7.2f} s  peak RSS {rss:8.1f} MiB")
        med = {k: (statistics.median(w for w, _ in v), max(m for _, m in v))
               for k, v in runs.items()}
        wall_ratio = med["model"][0] / med["plain"][0]
        rss_ratio = med["model"][1] / med["plain"][1]
        print(f"plain: median wall {med['plain'][0]:.2f} s, peak RSS {med['plain'][1]:.1f} MiB")
        print(f"model: median wall {med['model'][0]:.2f} s, peak RSS {med['model'][1]:.1f} MiB")
        print(f"model/plain wall {wall_ratio:.2f}x (target <= {TARGETS['wall']}x: "
              f"{'met' if wall_ratio <= TARGETS['wall'] else 'MISSED'})")
        print(f"model/plain peak RSS {rss_ratio:.2f}x (target <= {TARGETS['rss']}x: "
              f"{'met' if rss_ratio <= TARGETS['rss'] else 'MISSED'})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
