"""The terminal report: blocks table, findings by symptom with evidence, then the remedies."""

from __future__ import annotations

import io
import math

import yaml
from rich.console import Console
from rich.table import Table

from xattn_doctor.findings import Finding, Report, Severity, Symptom
from xattn_doctor.formats import register

STYLE = {Severity.ERROR: "bold red", Severity.WARNING: "yellow", Severity.INFO: "cyan"}


def num(value: float | None) -> str:
    """4 significant digits, '-' for missing."""
    if value is None:
        return "-"
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return f"{value:.4g}"


@register
class TextFormat:
    """Human report for a terminal (colour only on a TTY)."""

    name = "text"
    summary = "human report: blocks, findings with evidence, remedies"
    extension = "txt"

    def render(self, reports: list[Report], *, fail_on: Severity | None = Severity.ERROR,
               color: bool = False, width: int = 100) -> str:
        """Every report in turn, then a trend table when there are several."""
        buf = io.StringIO()
        con = Console(file=buf, width=width, color_system="standard" if color else None,
                      force_terminal=color, highlight=False, legacy_windows=False)
        for r in reports:
            _report(con, r)
        if len(reports) > 1:
            _trends(con, reports)
        return buf.getvalue()


def _report(con: Console, r: Report) -> None:
    c = r.checkpoint
    con.rule(f"xattn-doctor {r.tool_version}: {c.path}")
    con.print(f"layout {c.layout}, {c.tensors} tensors, {c.bytes / 2**20:.1f} MiB, {c.dtype}; "
              f"ran on {r.device} in {r.dtype}")
    if r.probe.source == "synthetic":
        con.print("probe: synthetic (seeded N(0,1) features): feature scale checks are not "
                  "conclusive; pass --probe with real features")
    else:
        con.print(f"probe: {r.probe.path}")
    for s in r.probe.synthesized:
        con.print(f"  synthesised inputs for {s}")
    if r.mode == "model":
        _model_mode(con, r)
    con.print(_blocks_table(r))
    _skipped(con, r)
    _findings(con, r.findings)
    _remedies(con, r.findings)
    counts = r.counts()
    con.print(f"[bold]status: {r.status}[/] ({counts[Severity.ERROR]} errors, "
              f"{counts[Severity.WARNING]} warnings, {counts[Severity.INFO]} infos)")


def _model_mode(con: Console, r: Report) -> None:
    """Model mode's run: the loss and where the gradient went (the batch is the probe line)."""
    share = r.cross_attention_grad_share
    con.print(f"model mode: loss {num(r.loss)} ({r.loss_source}), global grad norm "
              f"{num(r.global_grad_norm)}, cross-attention share "
              f"{'n/a' if share is None else f'{100 * share:.1f} %'}", markup=False)
    for note in r.notes:
        con.print(f"  {note}", markup=False)


def _blocks_table(r: Report) -> Table:
    t = Table(title=f"{len(r.blocks)} cross-attention block(s)", title_justify="left",
              caption="logit: max scaled logit; H: attention entropy in nats (mean of heads, "
                      "lowest head); w: max attention weight; grad: gradient norm; "
                      "scale: RMS(context)/RMS(query) at the projections",
              caption_justify="left")
    for col in ("block", "heads", "q/ctx", "logit", "H mean", "H min", "w", "grad", "scale",
                "gate"):
        t.add_column(col, overflow="fold", justify="left" if col == "block" else "right")
    for b in r.blocks:
        m = b.metrics
        heads = f"{b.heads}/{b.kv_heads}" if b.kv_heads and b.kv_heads != b.heads else str(b.heads)
        t.add_row(b.name or "<root>", heads, f"{b.query_dim}/{b.context_dim}", num(m.max_logit),
                  num(m.entropy_mean), num(m.entropy_min_head), num(m.max_attention_weight),
                  num(m.grad_norm), num(m.scale_ratio), num(m.gate))
    return t


def _skipped(con: Console, r: Report) -> None:
    by_reason: dict[str, list[str]] = {}
    for s in r.skipped:
        by_reason.setdefault(s["reason"], []).append(s["name"] or "<root>")
    for reason, names in by_reason.items():
        shown = ", ".join(names[:4]) + (f" and {len(names) - 4} more" if len(names) > 4 else "")
        con.print(f"skipped {len(names)} ({reason}): {shown}", markup=False)


def _findings(con: Console, findings: list[Finding]) -> None:
    if not findings:
        con.print("[green]No findings: every block looks healthy.[/]")
        return
    for symptom in Symptom:
        group = [f for f in findings if f.symptom is symptom]
        if not group:
            continue
        con.print(f"\n[bold]{symptom.heading}[/]")
        for f in group:
            con.print(f"  [{STYLE[f.severity]}]{f.severity.value:7}[/] {f.code} "
                      f"{f.block or '<checkpoint>'}: {f.message}")
            ev = ", ".join(f"{k}={_short(v)}" for k, v in f.evidence.items() if v is not None)
            con.print(f"          evidence: {ev}", overflow="fold")


def _short(v: object) -> str:
    if isinstance(v, float):
        return num(v)
    if isinstance(v, dict):
        return "{" + ", ".join(f"{k}: {_short(x)}" for k, x in list(v.items())[:6]) + \
            (", ..." if len(v) > 6 else "") + "}"
    if isinstance(v, list) and len(v) > 8:
        return "[" + ", ".join(_short(x) for x in v[:8]) + ", ...]"
    if isinstance(v, list):
        return "[" + ", ".join(_short(x) for x in v) + "]"
    return str(v)


def _remedies(con: Console, findings: list[Finding]) -> None:
    seen: dict[str, Finding] = {}
    for f in findings:
        if f.severity is not Severity.INFO:
            seen.setdefault(f.code, f)
    if not seen:
        return
    con.print("\n[bold]Remediation[/]")
    for code, f in sorted(seen.items()):
        blocks = sorted({g.block or "<checkpoint>" for g in findings if g.code == code})
        con.print(f"  {code} ({f.symptom.value}) on {', '.join(blocks[:4])}"
                  f"{' ...' if len(blocks) > 4 else ''}: {f.remedy.summary}")
        if f.remedy.config:
            snippet = yaml.safe_dump(f.remedy.config, sort_keys=False).rstrip()
            con.print("\n".join("      " + line for line in snippet.splitlines()),
                      markup=False, highlight=False)
        if f.remedy.code_change:
            con.print("      code: " + f.remedy.code_change.replace("\n", "\n            "),
                      markup=False)
        for ref in f.remedy.references[:3]:
            con.print(f"      ref: {ref}", markup=False)
        con.print(f"      more: xattn-doctor explain {code}")


def _trends(con: Console, reports: list[Report]) -> None:
    from xattn_doctor.trend import TREND_METRICS, trend_table

    rows = trend_table(reports)
    if not rows:
        return
    t = Table(title="Trends across checkpoints", title_justify="left")
    t.add_column("block")
    t.add_column("metric")
    for r in reports:
        t.add_column(r.checkpoint.path.rsplit("/", 1)[-1], overflow="fold")
    for row in rows:
        for metric in TREND_METRICS:
            values = row.series(metric)
            if any(v is not None for v in values):
                t.add_row(row.block, metric, *[num(v) for v in values])
    con.print(t)
