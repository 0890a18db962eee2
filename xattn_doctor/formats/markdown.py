"""GitHub-flavoured Markdown for a PR comment or a job summary.

A status line per checkpoint; per checkpoint its blocks and its findings grouped by symptom;
one remediation section over all findings; with several checkpoints, the metric trend.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable

import yaml

from xattn_doctor.findings import BlockResult, Finding, Remedy, Report, Severity, Symptom
from xattn_doctor.formats import register
from xattn_doctor.formats._common import counts_text, evidence_text, failing, num, rule_code
from xattn_doctor.trend import TREND_METRICS, trend_table

BLOCK_COLUMNS = ("Block", "Layout", "Heads", "Max logit", "Entropy mean", "Entropy min head",
                 "Max weight", "Grad norm", "Scale ratio", "Gate")
METRIC_LABELS = {"max_logit": "max logit", "entropy_min_head": "entropy min head",
                 "gate": "gate", "grad_norm": "grad norm", "scale_ratio": "scale ratio"}


@register
class MarkdownRenderer:
    """Markdown for PR comments and `$GITHUB_STEP_SUMMARY`."""

    name = "markdown"
    summary = "Markdown for PR comments and job summaries"
    extension = "md"

    def render(self, reports: list[Report], *, fail_on: Severity | None = Severity.ERROR,
               color: bool = False, width: int = 100) -> str:
        """The whole document; `color` and `width` do not apply."""
        parts = ["## xattn-doctor", _status_lines(reports, fail_on)]
        parts += [_checkpoint(i, r) for i, r in enumerate(reports, 1)]
        parts.append(_remediation([f for r in reports for f in r.findings]))
        if len(reports) > 1:
            parts.append(_trend(reports))
        return "\n\n".join(p for p in parts if p) + "\n"


def _status_lines(reports: list[Report], fail_on: Severity | None) -> str:
    return "\n".join(f"{i}. {status_line(r, fail_on)}" for i, r in enumerate(reports, 1))


def status_line(report: Report, fail_on: Severity | None) -> str:
    """One checkpoint's verdict: icon, path, status, counts, gate."""
    fail = failing(report, fail_on)
    icon = ":x:" if fail else {"healthy": ":white_check_mark:"}.get(report.status, ":warning:")
    gate = "never fails" if fail_on is None else (
        f"{'fails' if fail else 'passes'} `--fail-on {fail_on.value}`")
    return (f"{icon} {code_span(report.checkpoint.path)}: **{report.status}** "
            f"({counts_text(report)}), {gate}")


def _checkpoint(index: int, report: Report) -> str:
    parts = [f"### {index}. {code_span(report.checkpoint.path)}", _context(report),
             blocks_table(report.blocks), "#### Findings", _findings(report.findings)]
    return "\n\n".join(parts)


def _context(report: Report) -> str:
    c = report.checkpoint
    probe = f"probe: {report.probe.source}"
    if report.probe.path:
        probe += f" {code_span(report.probe.path)}"
    if report.probe.synthesized:
        probe += f" (synthesized: {', '.join(report.probe.synthesized)})"
    return (f"Layout {c.layout}, {c.tensors} tensors, checkpoint dtype {c.dtype}, "
            f"ran in {report.dtype} on {report.device}; {probe}.")


def blocks_table(blocks: list[BlockResult]) -> str:
    """The blocks and their contract metrics, 4 significant digits."""
    if not blocks:
        return "No cross-attention block was measured."
    align = ["---", "---"] + ["---:"] * (len(BLOCK_COLUMNS) - 2)
    rows = [_row(BLOCK_COLUMNS), _row(align)] + [_row(_block_cells(b)) for b in blocks]
    return "\n".join(rows)


def _block_cells(b: BlockResult) -> list[str]:
    m = b.metrics
    values = (m.max_logit, m.entropy_mean, m.entropy_min_head, m.max_attention_weight,
              m.grad_norm, m.scale_ratio, m.gate)
    return [code_span(b.name), b.layout, str(b.heads)] + [num(v) for v in values]


def _findings(findings: list[Finding]) -> str:
    if not findings:
        return "No findings."
    parts = []
    for symptom in Symptom:
        group = [f for f in findings if f.symptom is symptom]
        if group:
            parts.append(f"**{symptom.heading}**\n\n" + "\n".join(_finding(f) for f in group))
    return "\n\n".join(parts)


def _finding(f: Finding) -> str:
    where = f" {code_span(f.block)}" if f.block else ""
    line = f"- **{f.code}** {f.severity.value}{where}: {_inline(f.message)}"
    if f.evidence:
        line += f"\n  - evidence: {_inline(evidence_text(f.evidence))}"
    return line


def _remediation(findings: list[Finding]) -> str:
    by_code: dict[str, list[Finding]] = {}
    for f in findings:
        by_code.setdefault(rule_code(f.code), []).append(f)
    if not by_code:
        return ""
    sections = [_remedy_section(code, by_code[code]) for code in sorted(by_code)]
    return "### Remediation\n\n" + "\n\n".join(sections)


def _remedy_section(code: str, findings: list[Finding]) -> str:
    blocks = ", ".join(dict.fromkeys(code_span(f.block) if f.block else "checkpoint"
                                     for f in findings))
    remedies = {json.dumps(f.remedy.to_json(), sort_keys=True): f.remedy for f in findings}
    body = "\n\n".join(remedy_text(r) for r in remedies.values())
    return f"#### {code} ({blocks})\n\n{body}"


def remedy_text(remedy: Remedy) -> str:
    """A remedy: its summary, the config as YAML, the code change, the references."""
    parts = [_inline(remedy.summary)]
    config = remedy.to_json()["config"]
    if config:
        parts.append(fence(yaml.safe_dump(config, sort_keys=True, default_flow_style=False),
                           "yaml"))
    if remedy.code_change:
        parts.append("Code change:\n\n" + fence(remedy.code_change, "python"))
    if remedy.references:
        parts.append("References:\n\n" + "\n".join(f"- {r}" for r in remedy.references))
    return "\n\n".join(parts)


def _trend(reports: list[Report]) -> str:
    heads = ["Block", "Metric"] + [f"#{i}" for i in range(1, len(reports) + 1)] + ["Change"]
    rows = [_row(heads), _row(["---", "---"] + ["---:"] * (len(heads) - 2))]
    for trend in trend_table(reports):
        for metric in TREND_METRICS:
            series = trend.series(metric)
            if any(v is not None for v in series):
                rows.append(_row([code_span(trend.block), METRIC_LABELS[metric]]
                                 + [num(v) for v in series] + [_change(series)]))
    return "### Trend\n\n" + "\n".join(rows)


def _change(series: Iterable[float | None]) -> str:
    known = [v for v in series if v is not None]
    if len(known) < 2:
        return "-"
    delta = known[-1] - known[0]
    return ("+" if delta > 0 else "") + num(delta)


def _row(cells: Iterable[str]) -> str:
    return "| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |"


def _inline(text: str) -> str:
    return " ".join(text.split())


def code_span(text: str) -> str:
    """`text` as an inline code span that survives backticks inside it."""
    ticks = "`" * (max((len(m) for m in re.findall(r"`+", text)), default=0) + 1)
    pad = " " if text.startswith("`") or text.endswith("`") else ""
    return f"{ticks}{pad}{text}{pad}{ticks}"


def fence(text: str, lang: str = "") -> str:
    """A fenced code block longer than any backtick run inside `text`."""
    ticks = "`" * max(3, max((len(m) for m in re.findall(r"`+", text)), default=0) + 1)
    return f"{ticks}{lang}\n{text.rstrip()}\n{ticks}"
