"""The library surface: diagnose checkpoints into Reports (the CLI and the tests call this)."""

from __future__ import annotations

import gc
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from xattn_doctor import __version__
from xattn_doctor.checkpoint import Checkpoint, open_checkpoint
from xattn_doctor.errors import CheckpointError, NoBlocksError, UsageError
from xattn_doctor.findings import BlockResult, CheckpointInfo, Finding, ProbeInfo, Report
from xattn_doctor.layouts import Detection, detect
from xattn_doctor.layouts._base import BlockSpec
from xattn_doctor.options import Options
from xattn_doctor.prefetch import blocks_with_tensors
from xattn_doctor.probe import Probe, load_probe, synthetic
from xattn_doctor.rules import BlockContext, run_report
from xattn_doctor.rules import run as run_rules

if TYPE_CHECKING:
    from xattn_doctor.measure import RunSettings

Progress = Callable[[str, int, int], None]  # (block name, index, total)


def diagnose(paths: Sequence[str | Path], probe: str | Path | None = None,
             options: Options | None = None, progress: Progress | None = None) -> list[Report]:
    """Diagnose each checkpoint in turn with one probe; returns one Report per checkpoint."""
    opts = options or Options()
    loaded = load_probe(Path(probe), opts.seed) if probe is not None else None
    gc.freeze()  # what exists now outlives the run: each block's gc.collect() skips it
    try:
        reports = [diagnose_one(Path(p), loaded, opts, progress) for p in paths]
    finally:
        gc.unfreeze()
    if len(reports) > 1:
        from xattn_doctor.trend import trend_findings

        reports[-1].findings.extend(trend_findings(reports, opts.effective_thresholds(),
                                                   opts.disabled))
    return reports


def diagnose_one(path: Path, probe: Probe | None, opts: Options,
                 progress: Progress | None = None) -> Report:
    """Diagnose one checkpoint: detect blocks, run each, apply the rules."""
    ckpt = open_checkpoint(path)
    found = _detect(ckpt, opts)
    probe = probe or synthetic(opts.seed)
    probe.used = set()
    from xattn_doctor.measure import RunSettings
    from xattn_doctor.runtime import default_budget, resolve

    rt = resolve(opts.device, opts.dtype, ckpt.dtype)
    settings = RunSettings(rt.device, rt.dtype, opts.budget_bytes or default_budget(rt.device),
                           opts.seed)
    blocks, findings, synthesized = [], [], []
    ahead = rt.device.type == "cuda"
    for i, (spec, tensors) in enumerate(blocks_with_tensors(ckpt, found.blocks, ahead)):
        if progress:
            progress(spec.name, i, len(found.blocks))
        result, spec_findings, label = _run_block(ckpt, spec, tensors, probe, settings, opts)
        blocks.append(result)
        findings.extend(spec_findings)
        if label != "probe":
            synthesized.append(f"{spec.name}: {label}")
    probe.check_fits(found.blocks)
    report = Report(
        tool_version=__version__,
        checkpoint=_info(ckpt, found),
        probe=ProbeInfo(probe.source, str(probe.path) if probe.path else None, synthesized),
        device=str(rt.device) if rt.device.type == "cpu" else f"cuda:{rt.device.index or 0}",
        dtype=rt.dtype_name + (f" ({rt.note})" if rt.note else ""),
        blocks=blocks,
        findings=sorted(findings, key=lambda f: (-f.severity.rank, f.code, f.block or "")),
        thresholds=opts.effective_thresholds(),
        skipped=found.skipped,
    )
    add_report_findings(report, opts)
    return report


def add_report_findings(report: Report, opts: Options) -> None:
    """Add the whole-report rules' findings, keeping the findings' order (worst first)."""
    report.findings.extend(run_report(report, opts.thresholds, opts.disabled))
    report.findings.sort(key=lambda f: (-f.severity.rank, f.code, f.block or ""))


def _detect(ckpt: Checkpoint, opts: Options) -> Detection:
    from xattn_doctor.layouts._peft import describe_lora, lora_under

    try:
        found = detect(ckpt.index, ckpt.config, opts.heads)
    except ValueError as e:
        raise UsageError(ckpt.path, str(e)) from e
    lora = describe_lora(ckpt.index)
    if lora is not None and (not found.blocks or lora_under(ckpt.index, found.blocks)):
        raise UsageError(ckpt.path, f"this is {lora}")
    kept = [b for b in found.blocks if opts.wants(b.name)]
    found.skipped += [{"name": b.name, "layout": b.layout, "reason": "excluded by config"}
                      for b in found.blocks if not opts.wants(b.name)]
    found.blocks = kept
    if not kept:
        raise NoBlocksError(ckpt.path, _no_blocks_message(ckpt, found))
    for spec in kept:
        problem = spec.shape_problem(ckpt.index)
        if problem:
            raise CheckpointError(ckpt.path, f"block {spec.name or '<root>'}: {problem}")
    return found


def _no_blocks_message(ckpt: Checkpoint, found: Detection) -> str:
    from xattn_doctor.layouts._nocross import explain_no_blocks

    return explain_no_blocks(ckpt.index, ckpt.config, found.tried)


def _run_block(ckpt: Checkpoint, spec: BlockSpec, tensors: dict[str, Any], probe: Probe,
               settings: RunSettings, opts: Options) -> tuple[BlockResult, list[Finding], str]:
    result = measure_block(spec, tensors, probe, settings)
    findings = judge_block(result, spec, probe.source, settings, ckpt.dtype, opts)
    return result, findings, result.inputs


def measure_block(spec: BlockSpec, tensors: dict[str, Any], probe: Probe,
                  settings: RunSettings) -> BlockResult:
    """Rebuild one block from its tensors (by role; from a file or a live model) and measure
    it on the inputs `probe` gives it. `tensors` is emptied: the caller's copies go early."""
    from xattn_doctor.attention import RebuiltBlock
    from xattn_doctor.measure import measure

    cast = {r: t.to(settings.device, settings.dtype) if t.is_floating_point() else t
            for r, t in tensors.items()}
    block = RebuiltBlock(spec, cast)
    tensors.clear()  # the caller's loop still names this dict: drop the file-dtype copies now
    del cast
    inputs = probe.inputs_for(spec, block.p("learned_queries"))
    metrics = measure(block, inputs, settings)
    del block
    release_memory()
    return BlockResult(
        name=spec.name, layout=spec.layout, heads=spec.heads, query_dim=spec.query_dim,
        context_dim=spec.context_dim, pre_norm=spec.query_norm is not None,
        qk_norm=spec.q_norm is not None or spec.k_norm is not None, gated=spec.gate is not None,
        metrics=metrics, kv_heads=spec.kv_heads, head_dim=spec.head_dim,
        post_norm=spec.post_norm is not None, key_norm=spec.context_norm is not None,
        heads_source=spec.heads_source, inputs=inputs.label,
    )


def judge_block(result: BlockResult, spec: BlockSpec, probe_source: str, settings: RunSettings,
                file_dtype: str, opts: Options) -> list[Finding]:
    """The per-block rules' findings on a measured block."""
    ctx = BlockContext(result, spec, probe_source, str(settings.dtype).replace("torch.", ""),
                       file_dtype)
    return run_rules(ctx, opts.thresholds, opts.disabled)


def release_memory() -> None:
    """Free the block just measured and hand the freed heap back to the OS (glibc keeps it
    otherwise, and the resident set would grow block after block)."""
    gc.collect()
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _info(ckpt: Checkpoint, found: Detection) -> CheckpointInfo:
    layouts = Counter(b.layout for b in found.blocks)
    layout = next(iter(layouts)) if len(layouts) == 1 else "mixed:" + ",".join(sorted(layouts))
    return CheckpointInfo(path=str(ckpt.path), tensors=len(ckpt.where), bytes=ckpt.nbytes,
                          dtype=ckpt.dtype, layout=layout,
                          config=str(ckpt.config_path) if ckpt.config_path else None)
