#!/usr/bin/env python3
"""Benchmark xattn-doctor against a Llama-3.2-Vision-shaped (mllama) checkpoint.

A standalone script, not a pytest test (tests/benchmarks/conftest.py keeps pytest away from it).
See tests/benchmarks/README.md for what it measures and how to run it.

    python tests/benchmarks/bench_mllama.py                      # default geometry, 3 rounds
    python tests/benchmarks/bench_mllama.py --geometry tiny      # seconds, for development
    python tests/benchmarks/bench_mllama.py --depth-factor 2     # + a twice-as-deep checkpoint

Measurements, each in a fresh subprocess, interleaved round by round:

    a  read only the cross-attention tensors with safetensors.safe_open (the I/O floor)
    b  what a user does today: transformers from_pretrained + one forward with
       output_attentions=True, then entropy and max attention weight per cross-attention layer
    c  python -m xattn_doctor diagnose CKPT --probe PROBE --device DEV --format json --output /dev/null

Wall time is taken by this (parent) process around the whole subprocess, so it includes interpreter
start and imports. Peak RSS is the child's ru_maxrss as returned by os.wait4 for that one child.
Linux carries the parent's own high-water mark into a child's ru_maxrss across fork+exec, so this
orchestrator imports only the standard library and never loads a model itself: building the
checkpoint and the probe also run in subprocesses. Children a and b additionally report VmHWM
(their own mm's high-water mark, reset at exec) as a cross-check.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO_ROOT = HERE.parent.parent
SCRIPT = Path(__file__).resolve()

# --------------------------------------------------------------------------------------------------
# Geometries
# --------------------------------------------------------------------------------------------------
# Text model shapes follow Llama-3.2-Vision (mllama). The vision tower is kept small: it is saved
# (so the checkpoint has the real key layout) but never run; every measurement feeds the probe's
# encoder_hidden_states, already at text hidden size, as `cross_attention_states`. Its image_size /
# patch_size are nevertheless chosen so that one tile is exactly the probe's image tokens per tile
# ((560 // 14) ** 2 + 1 = 1601, as in the real model): transformers expands `cross_attention_mask`
# by `vision_model.num_patches`, so the two must agree.
#
# default: vocab 91264 (instead of Llama's 128256) brings the bf16 checkpoint to ~2.80e9 bytes
#          (1.40e9 parameters), which save_pretrained(max_shard_size="1GB") writes as 3-4 shards.
# large:   the text geometry of Llama-3.2-11B-Vision (40 layers, cross-attention at 3, 8, ..., 38,
#          vocab 128256): ~19.6e9 bytes in bf16; meant for a GPU machine (see README).
GEOMETRIES: dict[str, dict] = {
    "tiny": dict(
        hidden=256, heads=4, kv_heads=2, intermediate=512, layers=4, cross_start=1, cross_stride=2,
        vocab=1024,
        vision=dict(hidden_size=64, num_hidden_layers=1, num_global_layers=1, attention_heads=2,
                    intermediate_size=128, image_size=112, patch_size=14),
        text_tokens=64, tiles=1,
    ),
    "default": dict(
        hidden=2048, heads=16, kv_heads=8, intermediate=8192, layers=16, cross_start=3, cross_stride=4,
        vocab=91264,
        vision=dict(hidden_size=256, num_hidden_layers=2, num_global_layers=1, attention_heads=4,
                    intermediate_size=1024, image_size=560, patch_size=14),
        text_tokens=512, tiles=1,
    ),
    "large": dict(
        hidden=4096, heads=32, kv_heads=8, intermediate=14336, layers=40, cross_start=3, cross_stride=5,
        vocab=128256,
        vision=dict(hidden_size=256, num_hidden_layers=2, num_global_layers=1, attention_heads=4,
                    intermediate_size=1024, image_size=560, patch_size=14),
        text_tokens=2048, tiles=4,
    ),
}

TARGETS = {
    "c_over_a_time": 1.5,     # c/a (median wall time) <= 1.5
    "c_over_b_time": 0.35,    # c/b (median wall time) <= 0.35
    "c_peak_rss_mb": 600.0,   # peak RSS of c (max over rounds) <= 600 MB
    "c_rss_depth_rel": 0.10,  # c's peak RSS on the 2x deep checkpoint within 10% of the base one
}

MB = 1024 * 1024  # "MB" in this script is MiB; ru_maxrss is KiB on Linux.


def geometry(name: str, depth_factor: int = 1, layers: int | None = None) -> dict:
    g = json.loads(json.dumps(GEOMETRIES[name]))
    base_layers = layers if layers is not None else g["layers"]
    g["name"] = name
    g["depth_factor"] = depth_factor
    g["layers"] = base_layers * depth_factor
    g["cross_layers"] = list(range(g["cross_start"], g["layers"], g["cross_stride"]))
    v = g["vision"]
    g["image_tokens_per_tile"] = (v["image_size"] // v["patch_size"]) ** 2 + 1
    g["image_tokens"] = g["tiles"] * g["image_tokens_per_tile"]
    return g


# --------------------------------------------------------------------------------------------------
# Child side: these run in subprocesses and import torch/transformers lazily.
# --------------------------------------------------------------------------------------------------

def _child_report(t_start: float, payload: dict) -> None:
    import resource

    payload["inner_wall_s"] = time.perf_counter() - t_start
    payload["self_maxrss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    payload["vmhwm_mb"] = int(line.split()[1]) / 1024
    except OSError:
        pass
    sys.stdout.write("BENCH_JSON " + json.dumps(payload) + "\n")
    sys.stdout.flush()


def _mllama_config(g: dict):
    from transformers import MllamaConfig

    text = dict(
        vocab_size=g["vocab"], hidden_size=g["hidden"], num_hidden_layers=g["layers"],
        num_attention_heads=g["heads"], num_key_value_heads=g["kv_heads"],
        intermediate_size=g["intermediate"], cross_attention_layers=g["cross_layers"],
        bos_token_id=0, eos_token_id=1, pad_token_id=2, tie_word_embeddings=False,
    )
    v = g["vision"]
    n_inter = 2
    vision = dict(
        v, max_num_tiles=4, intermediate_layers_indices=list(range(n_inter)),
        vision_output_dim=v["hidden_size"] * (n_inter + 1),
    )
    return MllamaConfig(vision_config=vision, text_config=text, image_token_index=g["vocab"])


def child_build(args: argparse.Namespace) -> int:
    """Random-init (seeded) an MllamaForConditionalGeneration in bf16 and save it, sharded."""
    t0 = time.perf_counter()
    import torch
    from transformers import MllamaForConditionalGeneration

    g = json.loads(args.geometry_json)
    out = Path(args.out)
    torch.manual_seed(args.seed)
    cfg = _mllama_config(g)
    model = MllamaForConditionalGeneration._from_config(cfg, dtype=torch.bfloat16)
    model.eval()
    # The gates of a fresh model are 0 (tanh(0) = 0: the cross-attention blocks are closed). Trained
    # Llama-3.2-Vision gates are not, so give them seeded non-zero values unless --zero-gates.
    if not args.zero_gates:
        gen = torch.Generator().manual_seed(args.seed + 1)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.endswith(("cross_attn_attn_gate", "cross_attn_mlp_gate")):
                    p.copy_((torch.rand(p.shape, generator=gen) * 0.8 + 0.1).to(p.dtype))
    n_params = sum(p.numel() for p in model.parameters())
    t_init = time.perf_counter() - t0
    tmp = out.parent / (out.name + ".partial")
    if tmp.exists():
        shutil.rmtree(tmp)
    model.save_pretrained(tmp, max_shard_size=args.max_shard_size, safe_serialization=True)
    meta = dict(geometry=g, seed=args.seed, zero_gates=args.zero_gates, n_params=n_params,
                max_shard_size=args.max_shard_size, torch=torch.__version__,
                transformers=__import__("transformers").__version__)
    shards = sorted(p.name for p in tmp.glob("*.safetensors"))
    meta["shards"] = shards
    meta["bytes"] = sum((tmp / s).stat().st_size for s in shards)
    (tmp / "bench_meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    os.replace(tmp, out)  # only a complete build ever appears under the cache name
    _child_report(t0, dict(kind="build", n_params=n_params, bytes=meta["bytes"], shards=shards,
                           init_s=t_init))
    return 0


def child_probe(args: argparse.Namespace) -> int:
    t0 = time.perf_counter()
    import torch
    from safetensors.torch import save_file

    g = json.loads(args.geometry_json)
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[args.probe_dtype]
    gen = torch.Generator().manual_seed(args.seed + 2)
    hs = torch.randn(1, g["text_tokens"], g["hidden"], generator=gen).to(dtype)
    enc = torch.randn(1, g["image_tokens"], g["hidden"], generator=gen).to(dtype)
    out = Path(args.out)
    tmp = out.with_name(out.name + ".partial")
    save_file({"hidden_states": hs.contiguous(), "encoder_hidden_states": enc.contiguous()}, str(tmp),
              metadata={"seed": str(args.seed), "tiles": str(g["tiles"]),
                        "image_tokens_per_tile": str(g["image_tokens_per_tile"])})
    os.replace(tmp, out)
    _child_report(t0, dict(kind="probe", hidden_states=list(hs.shape),
                           encoder_hidden_states=list(enc.shape), dtype=args.probe_dtype))
    return 0


def _shard_map(ckpt: Path) -> dict[str, str]:
    index = ckpt / "model.safetensors.index.json"
    if index.exists():
        return json.loads(index.read_text())["weight_map"]
    from safetensors import safe_open

    with safe_open(str(ckpt / "model.safetensors"), framework="pt") as fh:
        return {k: "model.safetensors" for k in fh.keys()}  # noqa: SIM118  (a safe_open handle, not a dict)


def _is_text_cross_attn_key(key: str) -> bool:
    # Saved (legacy/Hub) names: language_model.model.layers.N.cross_attn.*, ...cross_attn_attn_gate;
    # transformers>=5 in-memory names would be model.language_model.layers.N.cross_attn.*.
    return "cross_attn" in key and ".layers." in key and "vision_model" not in key


def child_measure_a(args: argparse.Namespace) -> int:
    """Read only the cross-attention tensors with safe_open, touching each one."""
    t0 = time.perf_counter()
    import torch
    from safetensors import safe_open

    t_import = time.perf_counter() - t0
    ckpt = Path(args.ckpt)
    by_file: dict[str, list[str]] = {}
    for key, fname in _shard_map(ckpt).items():
        if _is_text_cross_attn_key(key):
            by_file.setdefault(fname, []).append(key)
    n = 0
    nbytes = 0
    checksum = 0.0
    for fname in sorted(by_file):
        with safe_open(str(ckpt / fname), framework="pt", device=args.device) as fh:
            for key in sorted(by_file[fname]):
                t = fh.get_tensor(key)
                checksum += float(t.float().sum())
                n += 1
                nbytes += t.numel() * t.element_size()
                del t
    payload = dict(kind="a", tensors=n, tensor_bytes=nbytes, files=len(by_file), checksum=checksum,
                   import_s=t_import)
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()
        payload["cuda_peak_mb"] = torch.cuda.max_memory_allocated() / MB
    _child_report(t0, payload)
    return 0


def child_measure_b(args: argparse.Namespace) -> int:
    """What a user does today: from_pretrained + one forward with output_attentions=True."""
    t0 = time.perf_counter()
    import torch
    from safetensors.torch import load_file
    from transformers import MllamaForConditionalGeneration

    t_import = time.perf_counter() - t0
    dev = torch.device(args.device)
    # output_attentions needs eager attention: with the default "sdpa" transformers only warns and
    # returns no attention weights at all.
    dtype = {"bfloat16": torch.bfloat16, "float32": torch.float32}[args.b_dtype]
    load_kwargs = dict(dtype=dtype, attn_implementation="eager")
    load_path = "cpu"
    if dev.type == "cuda":
        # device_map loads straight onto the GPU but needs `accelerate` (transformers 5 raises a
        # ValueError without it); fall back to loading on the host and moving, which costs host RSS.
        try:
            model = MllamaForConditionalGeneration.from_pretrained(args.ckpt, device_map=args.device,
                                                                   **load_kwargs)
            load_path = "device_map"
        except (ValueError, ImportError) as exc:
            if "accelerate" not in str(exc):
                raise
            model = MllamaForConditionalGeneration.from_pretrained(args.ckpt, **load_kwargs).to(dev)
            load_path = "cpu_then_to"
    else:
        model = MllamaForConditionalGeneration.from_pretrained(args.ckpt, **load_kwargs)
    model.eval()
    t_load = time.perf_counter() - t0 - t_import
    probe = load_file(args.probe)
    hs = probe["hidden_states"].to(dev, dtype)
    enc = probe["encoder_hidden_states"].to(dev, dtype)
    batch, q_len, _ = hs.shape
    k_len = enc.shape[1]
    kwargs = {}
    per_tile = model.model.vision_model.num_patches
    if k_len % per_tile == 0:
        # [B, text_len, num_images, num_tiles], 1 = attend; transformers expands it per tile by
        # vision_model.num_patches image tokens. All ones: every text token sees every tile.
        kwargs["cross_attention_mask"] = torch.ones(batch, q_len, 1, k_len // per_tile,
                                                    dtype=torch.long, device=dev)
    cross_layers = list(model.config.text_config.cross_attention_layers)
    stats = {}
    with torch.inference_mode():
        out = model(
            inputs_embeds=hs,                 # the probe's text-side hidden states as the text input
            cross_attention_states=enc,       # already at text hidden size: the vision tower is skipped
            output_attentions=True,
            use_cache=False,
            logits_to_keep=1,                 # do not charge (b) for a [Lq, vocab] logits tensor
            **kwargs,
        )
        attns = out.attentions               # one per decoder layer, self or cross by layer type
        for idx in cross_layers:
            w = attns[idx].float()            # [B, H, Lq, Lk]
            ent = -(w * w.clamp_min(1e-30).log()).sum(-1)
            stats[str(idx)] = dict(shape=list(w.shape), entropy_mean=float(ent.mean()),
                                   max_weight=float(w.max()))
            del w, ent
        if dev.type == "cuda":
            torch.cuda.synchronize()
    payload = dict(kind="b", import_s=t_import, load_s=t_load,
                   forward_s=time.perf_counter() - t0 - t_import - t_load,
                   n_attentions=len(attns), cross_layers=cross_layers, stats=stats,
                   masked=bool(kwargs), load_path=load_path, dtype=args.b_dtype)
    if dev.type == "cuda":
        payload["cuda_peak_mb"] = torch.cuda.max_memory_allocated() / MB
    _child_report(t0, payload)
    return 0


def _gemm_rate(torch) -> float:  # type: ignore[no-untyped-def]
    """This CPU's float32 matmul rate (GFLOP/s) on a k/v-projection-sized product."""
    a, w = torch.randn(1601, 2048), torch.randn(2048, 1024)
    for _ in range(2):
        a @ w
    t0, n = time.perf_counter(), 8
    for _ in range(n):
        a @ w
    return 2 * 1601 * 2048 * 1024 * n / (time.perf_counter() - t0) / 1e9


def c_matmul_gflop(g: dict, budget: int = 64 * MB) -> float:
    """The matmul work of (c), GFLOP: per cross-attention block, the q/k/v projections and
    scores of every query (statistics), then the forward and backward of the proxy loss on the
    budget-sized query subsample (as xattn_doctor.measure sizes it), whose k/v side (weight
    and context gradients) covers every key."""
    d, h, kvh, lq, lk = g["hidden"], g["heads"], g["kv_heads"], g["text_tokens"], g["image_tokens"]
    hd = d // h
    keep = max(1, min(lq, budget // (h * lk * 4 * 8)))
    kv = 2 * 2 * lk * d * kvh * hd                      # k and v projections
    stats = 2 * lq * d * d + kv + 2 * h * lq * lk * hd  # q, k, v, scores: every query
    sub_q = 2 * keep * d * d if keep < lq else 0        # q again for the subsample
    fwd = sub_q + 2 * 2 * h * keep * lk * hd + 2 * keep * d * d  # scores, p.v, o
    bwd = 2 * kv + 2 * (2 * 2 * h * keep * lk * hd) + 2 * (2 * keep * d * d) * 2  # k/v, attn, o, q
    return len(g["cross_layers"]) * (stats + fwd + bwd) / 1e9


def child_info(args: argparse.Namespace) -> int:
    t0 = time.perf_counter()
    info = {}
    for mod in ("torch", "transformers", "safetensors"):
        try:
            info[mod] = __import__(mod).__version__
        except Exception as exc:
            info[mod] = f"unavailable ({exc.__class__.__name__})"
    try:
        import torch

        info["torch_threads"] = torch.get_num_threads()
        info["gemm_fp32_gflops"] = _gemm_rate(torch)
        info["cpu_capability"] = torch.backends.cpu.get_cpu_capability()
        if torch.cuda.is_available():
            info["cuda_device"] = torch.cuda.get_device_name(0)
    except Exception:
        pass
    _child_report(t0, dict(kind="info", **info))
    return 0


# --------------------------------------------------------------------------------------------------
# Parent side: standard library only.
# --------------------------------------------------------------------------------------------------

class Run:
    def __init__(self, rc: int | None, wall_s: float, maxrss_mb: float, stdout: str, stderr: str,
                 timed_out: bool = False) -> None:
        self.rc, self.wall_s, self.maxrss_mb = rc, wall_s, maxrss_mb
        self.stdout, self.stderr, self.timed_out = stdout, stderr, timed_out

    @property
    def report(self) -> dict | None:
        for line in self.stdout.splitlines():
            if line.startswith("BENCH_JSON "):
                return json.loads(line[len("BENCH_JSON "):])
        return None

    def tail(self, n: int = 15) -> str:
        return "\n".join((self.stderr or self.stdout).strip().splitlines()[-n:])


def run_child(cmd: list[str], *, cwd: Path, env: dict, timeout: float) -> Run:
    """Run `cmd`; wall time around the whole process, peak RSS from os.wait4 for that child only."""
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, cwd=str(cwd), env=env, stdout=out, stderr=err,
                                stdin=subprocess.DEVNULL, start_new_session=True)
        fired = threading.Event()

        def _kill() -> None:
            fired.set()
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)

        timer = threading.Timer(timeout, _kill)
        timer.start()
        try:
            _, status, ru = os.wait4(proc.pid, 0)
        except BaseException:  # e.g. Ctrl-C: the child is in its own session, so stop it here
            _kill()
            os.waitpid(proc.pid, 0)
            raise
        finally:
            timer.cancel()
        wall = time.perf_counter() - t0
        proc.returncode = os.waitstatus_to_exitcode(status)  # reaped here; keep Popen consistent
        out.seek(0)
        err.seek(0)
        return Run(proc.returncode, wall, ru.ru_maxrss / 1024, out.read(), err.read(),
                   timed_out=fired.is_set())


def child_env(args: argparse.Namespace) -> dict:
    env = dict(os.environ)
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("TRANSFORMERS_OFFLINE", "1")
    env.setdefault("TRANSFORMERS_VERBOSITY", "error")
    env.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    if args.threads:
        for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
            env[var] = str(args.threads)
    return env


def self_cmd(*parts: str) -> list[str]:
    return [sys.executable, str(SCRIPT), *parts]


def ensure_checkpoint(args: argparse.Namespace, g: dict, env: dict) -> Path:
    name = f"mllama-{g['name']}-L{g['layers']}-s{args.seed}{'-zg' if args.zero_gates else ''}"
    out = args.workdir / name
    if (out / "config.json").exists() and (out / "bench_meta.json").exists():
        meta = json.loads((out / "bench_meta.json").read_text())
        if meta.get("geometry") != g:
            sys.exit(f"{out} exists but was built for another geometry; delete it to rebuild")
        print(f"  checkpoint (cached): {out}  [{meta['bytes'] / 1e9:.2f} GB, "
              f"{len(meta['shards'])} shard(s), {meta['n_params'] / 1e9:.3f}e9 params]", flush=True)
        return out
    print(f"  building checkpoint {out} ({g['layers']} layers, cross-attention at "
          f"{g['cross_layers']}) ...", flush=True)
    r = run_child(self_cmd("_build", "--out", str(out), "--geometry-json", json.dumps(g),
                           "--seed", str(args.seed), "--max-shard-size", args.max_shard_size,
                           *(["--zero-gates"] if args.zero_gates else [])),
                  cwd=REPO_ROOT, env=env, timeout=args.build_timeout)
    if r.rc != 0 or r.report is None:
        sys.exit(f"building {out} failed (rc={r.rc}):\n{r.tail(30)}")
    rep = r.report
    print(f"  built in {r.wall_s:.1f} s (peak RSS {r.maxrss_mb:.0f} MB): {rep['bytes'] / 1e9:.2f} GB, "
          f"{len(rep['shards'])} shard(s), {rep['n_params'] / 1e9:.3f}e9 params", flush=True)
    return out


def ensure_probe(args: argparse.Namespace, g: dict, env: dict) -> Path:
    out = args.workdir / (f"probe-{g['name']}-q{g['text_tokens']}-k{g['image_tokens']}-d{g['hidden']}"
                          f"-s{args.seed}-{args.probe_dtype}.safetensors")
    if out.exists():
        print(f"  probe (cached): {out}", flush=True)
        return out
    r = run_child(self_cmd("_probe", "--out", str(out), "--geometry-json", json.dumps(g),
                           "--seed", str(args.seed), "--probe-dtype", args.probe_dtype),
                  cwd=REPO_ROOT, env=env, timeout=600)
    if r.rc != 0 or r.report is None:
        sys.exit(f"writing the probe failed (rc={r.rc}):\n{r.tail(30)}")
    rep = r.report
    print(f"  probe written: {out}  hidden_states {rep['hidden_states']}, encoder_hidden_states "
          f"{rep['encoder_hidden_states']} ({rep['dtype']})", flush=True)
    return out


def warm_page_cache(paths: list[Path]) -> None:
    """Read files once through a small buffer so that every measurement starts with a warm cache."""
    buf = bytearray(8 * MB)
    view = memoryview(buf)
    for p in paths:
        with open(p, "rb", buffering=0) as fh:
            while fh.readinto(view):
                pass


def tool_available(args: argparse.Namespace, env: dict) -> tuple[bool, str]:
    r = run_child([sys.executable, "-c", "import xattn_doctor.cli"], cwd=args.tool_root, env=env,
                  timeout=300)
    if r.rc == 0:
        return True, ""
    return False, r.tail(3)


def measure(which: str, args: argparse.Namespace, ckpt: Path, probe: Path, env: dict) -> dict:
    if which == "a":
        cmd, cwd = self_cmd("_measure_a", "--ckpt", str(ckpt), "--device", args.device), REPO_ROOT
    elif which == "b":
        cmd = self_cmd("_measure_b", "--ckpt", str(ckpt), "--probe", str(probe), "--device", args.device,
                       "--b-dtype", args.b_dtype)
        cwd = REPO_ROOT
    else:
        cmd = [sys.executable, "-m", "xattn_doctor", "diagnose", str(ckpt), "--probe", str(probe),
               "--device", args.device, "--format", "json", "--output", "/dev/null",
               *args.tool_arg]
        cwd = args.tool_root
    r = run_child(cmd, cwd=cwd, env=env, timeout=args.timeout)
    ok = (r.rc in args.c_ok_codes) if which == "c" else (r.rc == 0 and r.report is not None)
    res = dict(ok=ok and not r.timed_out, rc=r.rc, wall_s=r.wall_s, peak_rss_mb=r.maxrss_mb,
               timed_out=r.timed_out)
    if r.report is not None:
        res["child"] = r.report
    if not res["ok"]:
        res["error"] = r.tail()
    return res


def fmt(x: float | None, spec: str = ".2f") -> str:
    return "-" if x is None else format(x, spec)


def verdict(ok: bool | None) -> str:
    return "n/a" if ok is None else ("PASS" if ok else "FAIL")


def median_of(runs: list[dict], field: str) -> float | None:
    vals = [r[field] for r in runs if r.get("ok")]
    return statistics.median(vals) if vals else None


def max_of(runs: list[dict], field: str) -> float | None:
    vals = [r[field] for r in runs if r.get("ok")]
    return max(vals) if vals else None


def machine_info(args: argparse.Namespace, env: dict) -> dict:
    info = dict(
        date=_dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        platform=platform.platform(), python=platform.python_version(), cpu_count=os.cpu_count(),
        affinity=len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        loadavg=list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
    )
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    info["cpu"] = line.split(":", 1)[1].strip()
                    break
        with open("/proc/meminfo") as fh:
            info["mem_total_gb"] = int(fh.readline().split()[1]) / 1024 / 1024
    except OSError:
        pass
    r = run_child(self_cmd("_info"), cwd=REPO_ROOT, env=env, timeout=300)
    if r.report:
        info.update({k: v for k, v in r.report.items()
                     if k not in ("kind", "inner_wall_s", "self_maxrss_mb", "vmhwm_mb")})
    try:
        info["tool_commit"] = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=args.tool_root, capture_output=True,
            text=True, timeout=30).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        info["tool_commit"] = None
    return info


def main_bench(argv: list[str]) -> int:
    p = argparse.ArgumentParser(
        description="Benchmark xattn-doctor on a Llama-3.2-Vision-shaped checkpoint (see README.md).")
    p.add_argument("--geometry", choices=sorted(GEOMETRIES), default="default")
    p.add_argument("--layers", type=int, default=None,
                   help="override the geometry's text layer count (before --depth-factor)")
    p.add_argument("--depth-factor", type=int, default=1,
                   help="also build a checkpoint this many times deeper and compare c's peak RSS")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--measure", default="a,b,c", help="which of a,b,c to run on the base checkpoint")
    p.add_argument("--deep-measure", default="a,c",
                   help="which of a,b,c to run on the deep checkpoint (with --depth-factor > 1)")
    p.add_argument("--device", default="cpu", help="cpu or cuda[:N], for b and c (and a)")
    p.add_argument("--b-dtype", choices=["bfloat16", "float32"], default="bfloat16",
                   help="dtype b loads and runs the model in (bf16 matmuls are very slow on CPUs "
                        "without native bf16 support, e.g. AVX2-only)")
    p.add_argument("--workdir", type=Path, default=REPO_ROOT / "bench-out",
                   help="cache for checkpoints and probes (default: bench-out/ in the repo root)")
    p.add_argument("--tool-root", type=Path, default=REPO_ROOT,
                   help="directory `python -m xattn_doctor` runs in (default: this repo's root)")
    p.add_argument("--tool-arg", action="append", default=[],
                   help="extra argument for `xattn-doctor diagnose` (repeatable)")
    p.add_argument("--c-ok-codes", default="0,1",
                   help="exit codes of c that count as a completed run (1: findings at --fail-on)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--probe-dtype", choices=["float32", "bfloat16"], default="float32")
    p.add_argument("--zero-gates", action="store_true",
                   help="keep the fresh model's zero tanh gates (default: seeded values in [0.1, 0.9])")
    p.add_argument("--max-shard-size", default="1GB")
    p.add_argument("--threads", type=int, default=0,
                   help="OMP/MKL thread count for every child (default: library defaults)")
    p.add_argument("--timeout", type=float, default=3600, help="seconds per measurement")
    p.add_argument("--build-timeout", type=float, default=7200)
    p.add_argument("--no-warm-cache", action="store_true",
                   help="do not read the checkpoint files once before measuring")
    p.add_argument("--json", type=Path, default=None, help="also write all figures to this file")
    args = p.parse_args(argv)
    args.c_ok_codes = {int(x) for x in args.c_ok_codes.split(",") if x.strip()}
    measure_base = [m for m in args.measure.split(",") if m]
    measure_deep = [m for m in args.deep_measure.split(",") if m] if args.depth_factor > 1 else []
    for m in measure_base + measure_deep:
        if m not in ("a", "b", "c"):
            p.error(f"unknown measurement {m!r}")
    if args.depth_factor < 1 or args.rounds < 1:
        p.error("--depth-factor and --rounds must be >= 1")
    args.workdir = args.workdir.resolve()
    args.workdir.mkdir(parents=True, exist_ok=True)
    args.tool_root = args.tool_root.resolve()
    env = child_env(args)

    print("== machine", flush=True)
    info = machine_info(args, env)
    for k, v in info.items():
        print(f"  {k}: {v}")

    print("== inputs", flush=True)
    g = geometry(args.geometry, 1, args.layers)
    ckpt = ensure_checkpoint(args, g, env)
    probe = ensure_probe(args, g, env)
    deep_ckpt = None
    if args.depth_factor > 1:
        g_deep = geometry(args.geometry, args.depth_factor, args.layers)
        deep_ckpt = ensure_checkpoint(args, g_deep, env)

    c_available, c_why = True, ""
    if "c" in measure_base + measure_deep:
        c_available, c_why = tool_available(args, env)
        if not c_available:
            print(f"  (c) unavailable: `python -m xattn_doctor` cannot start in {args.tool_root}: "
                  f"{c_why.splitlines()[-1] if c_why else ''}", flush=True)

    if not args.no_warm_cache:
        files = [f for d in (ckpt, deep_ckpt) if d for f in sorted(d.glob("*.safetensors"))]
        warm_page_cache(files + [probe])

    plan = [("base", m, ckpt) for m in measure_base] + [("deep", m, deep_ckpt) for m in measure_deep]
    results: dict[str, dict[str, list[dict]]] = {"base": {}, "deep": {}}
    print(f"== measuring ({args.rounds} round(s), order rotates each round)", flush=True)
    for rnd in range(args.rounds):
        order = plan[rnd % len(plan):] + plan[:rnd % len(plan)]
        for which_ckpt, m, path in order:
            if m == "c" and not c_available:
                res = dict(ok=False, unavailable=True, error=c_why)
            else:
                res = measure(m, args, path, probe, env)
            res["round"] = rnd + 1
            results[which_ckpt].setdefault(m, []).append(res)
            tag = f"{which_ckpt}/{m}"
            if res.get("unavailable"):
                print(f"  round {rnd + 1} {tag:7s} unavailable", flush=True)
            elif res["ok"]:
                extra = ""
                ch = res.get("child") or {}
                if "vmhwm_mb" in ch:
                    extra = f"  (VmHWM {ch['vmhwm_mb']:.0f} MB, in-process {ch['inner_wall_s']:.2f} s)"
                print(f"  round {rnd + 1} {tag:7s} {res['wall_s']:8.2f} s {res['peak_rss_mb']:9.0f} MB"
                      f"{extra}", flush=True)
            else:
                print(f"  round {rnd + 1} {tag:7s} FAILED rc={res['rc']} "
                      f"{'(timeout)' if res.get('timed_out') else ''}\n    "
                      + "\n    ".join((res.get("error") or "").splitlines()), flush=True)

    # ---- table ------------------------------------------------------------------------------
    print("\n== results (wall s includes interpreter start and imports; RSS = child peak, MB)")
    cols = [(w, m) for w in ("base", "deep") for m in ("a", "b", "c") if results[w].get(m)]
    head = "round " + "".join(f"{w + '/' + m:>22s}" for w, m in cols)
    print(head)
    for rnd in range(args.rounds):
        row = f"{rnd + 1:<6d}"
        for w, m in cols:
            r = results[w][m][rnd]
            row += f"{('{:8.2f} s {:8.0f} MB'.format(r['wall_s'], r['peak_rss_mb'])) if r.get('ok') else 'n/a':>22s}"
        print(row)
    row = "median"
    for w, m in cols:
        t, rss = median_of(results[w][m], "wall_s"), median_of(results[w][m], "peak_rss_mb")
        row += f"{(f'{t:8.2f} s {rss:8.0f} MB') if t is not None else 'n/a':>22s}"
    print(row)

    base = results["base"]
    ta, tb, tc = (median_of(base.get(m, []), "wall_s") for m in "abc")
    rss_c = max_of(base.get("c", []), "peak_rss_mb")
    rss_c_deep = max_of(results["deep"].get("c", []), "peak_rss_mb")
    c_over_a = tc / ta if tc is not None and ta else None
    c_over_b = tc / tb if tc is not None and tb else None
    depth_rel = (rss_c_deep / rss_c - 1.0) if rss_c and rss_c_deep is not None else None
    checks = {
        "c_over_a_time": dict(value=c_over_a, target=f"<= {TARGETS['c_over_a_time']}",
                              ok=None if c_over_a is None else c_over_a <= TARGETS["c_over_a_time"]),
        "c_over_b_time": dict(value=c_over_b, target=f"<= {TARGETS['c_over_b_time']}",
                              ok=None if c_over_b is None else c_over_b <= TARGETS["c_over_b_time"]),
        "c_peak_rss_mb": dict(value=rss_c, target=f"<= {TARGETS['c_peak_rss_mb']:.0f}",
                              ok=None if rss_c is None else rss_c <= TARGETS["c_peak_rss_mb"]),
        "c_rss_depth_rel": dict(value=depth_rel, target=f"|x| <= {TARGETS['c_rss_depth_rel']}",
                                ok=None if depth_rel is None
                                else abs(depth_rel) <= TARGETS["c_rss_depth_rel"]),
    }
    print("\n== targets (times: medians over rounds; RSS: max over rounds)")
    print(f"  c/a wall time            {fmt(c_over_a, '8.3f'):>10s}   target <= 1.5    "
          f"{verdict(checks['c_over_a_time']['ok'])}")
    print(f"  c/b wall time            {fmt(c_over_b, '8.3f'):>10s}   target <= 0.35   "
          f"{verdict(checks['c_over_b_time']['ok'])}")
    print(f"  c peak RSS (MB)          {fmt(rss_c, '8.0f'):>10s}   target <= 600    "
          f"{verdict(checks['c_peak_rss_mb']['ok'])}")
    if args.depth_factor > 1:
        change = fmt(None if depth_rel is None else 100 * depth_rel, '+.1f')
        print(f"  c peak RSS x{args.depth_factor} deep (MB) {fmt(rss_c_deep, '8.0f'):>10s}   "
              f"change {change} % vs base, target within 10 %   "
              f"{verdict(checks['c_rss_depth_rel']['ok'])}")
    else:
        print("  c peak RSS vs depth      (run with --depth-factor 2)              n/a")
    if not c_available:
        print(f"  (c) unavailable: {c_why.splitlines()[-1] if c_why else 'xattn_doctor.cli missing'}")
    rate = info.get("gemm_fp32_gflops")
    if rate and ta and args.device == "cpu":
        work = c_matmul_gflop(g)
        floor = (ta + work / rate) / ta
        checks["c_over_a_floor"] = dict(value=floor, matmul_gflop=work, gemm_gflops=rate)
        print(f"  c/a floor on this CPU    {floor:10.3f}   ({work:.0f} GFLOP of float32 matmuls at "
              f"the measured {rate:.0f} GFLOP/s = {work / rate:.2f} s, on top of a's {ta:.2f} s)")
    own = __import__("resource").getrusage(__import__("resource").RUSAGE_SELF).ru_maxrss / 1024
    print(f"  (orchestrator peak RSS {own:.0f} MB: a child's ru_maxrss is never below it)")

    if args.json:
        doc = dict(machine=info, args={k: (str(v) if isinstance(v, Path) else
                                           sorted(v) if isinstance(v, set) else v)
                                       for k, v in vars(args).items() if k != "json"},
                   geometry=g, checkpoint=str(ckpt), deep_checkpoint=str(deep_ckpt) if deep_ckpt else None,
                   probe=str(probe), results=results,
                   medians={w: {m: dict(wall_s=median_of(rs, "wall_s"),
                                        peak_rss_mb=median_of(rs, "peak_rss_mb"))
                                for m, rs in results[w].items()} for w in results},
                   targets=checks, orchestrator_maxrss_mb=own)
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(doc, indent=2) + "\n")
        print(f"\nfigures written to {args.json}")
    failed = [f"{w}/{m}" for w in results for m, rs in results[w].items()
              if m != "c" and any(not r.get("ok") for r in rs)]
    return 1 if failed else 0


def main(argv: list[str]) -> int:
    if argv and argv[0] in ("_build", "_probe", "_measure_a", "_measure_b", "_info"):
        p = argparse.ArgumentParser(prog=f"bench_mllama.py {argv[0]}")
        p.add_argument("--out")
        p.add_argument("--geometry-json")
        p.add_argument("--seed", type=int, default=0)
        p.add_argument("--max-shard-size", default="1GB")
        p.add_argument("--zero-gates", action="store_true")
        p.add_argument("--probe-dtype", default="float32")
        p.add_argument("--ckpt")
        p.add_argument("--probe")
        p.add_argument("--device", default="cpu")
        p.add_argument("--b-dtype", default="bfloat16")
        args = p.parse_args(argv[1:])
        return {"_build": child_build, "_probe": child_probe, "_measure_a": child_measure_a,
                "_measure_b": child_measure_b, "_info": child_info}[argv[0]](args)
    return main_bench(argv)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
