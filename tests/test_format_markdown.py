"""Markdown output: status lines, blocks table, findings by symptom, remediation, trend."""

from __future__ import annotations

import re

import pytest
import yaml
from report_factory import (
    CLIP_REMEDY,
    L3,
    L8,
    block,
    finding,
    healthy_report,
    report,
    sample_report,
)

from xattn_doctor import formats
from xattn_doctor.findings import Report, Severity
from xattn_doctor.formats.markdown import code_span, fence


def render(reports: list[Report], fail_on: Severity | None = Severity.ERROR) -> str:
    """Render with the registered markdown format."""
    return formats.get("markdown").render(reports, fail_on=fail_on)


def section(text: str, heading: str) -> str:
    """The text under `heading` up to the next heading of the same or higher level."""
    level = len(heading) - len(heading.lstrip("#"))
    start = text.index(heading + "\n")
    rest = text[start + len(heading) + 1:]
    stop = re.search(rf"^#{{1,{level}}} ", rest, re.M)
    return rest[: stop.start()] if stop else rest


def table_rows(text: str) -> list[list[str]]:
    """The cells of every table row in `text`."""
    return [[c.strip() for c in re.split(r"(?<!\\)\|", line)[1:-1]]
            for line in text.splitlines() if line.startswith("| ")]


def test_status_line_per_checkpoint() -> None:
    text = render([sample_report(), healthy_report()])
    assert text.startswith("## xattn-doctor\n\n")
    assert ("1. :x: `runs/ckpt-1000/model.safetensors`: **error** "
            "(1 error, 2 warnings, 2 info), fails `--fail-on error`\n") in text
    assert ("2. :white_check_mark: `runs/ckpt-2000/model.safetensors`: **healthy** "
            "(0 errors, 0 warnings, 0 info), passes `--fail-on error`\n") in text


@pytest.mark.parametrize(("fail_on", "tail"), [
    (None, ":warning: `runs/ckpt-1000/model.safetensors`: **error** (1 error, 2 warnings, "
           "2 info), never fails"),
    (Severity.WARNING, ":x: `runs/ckpt-1000/model.safetensors`: **error** (1 error, 2 warnings, "
                       "2 info), fails `--fail-on warning`"),
])
def test_status_line_follows_fail_on(fail_on: Severity | None, tail: str) -> None:
    assert f"1. {tail}\n" in render([sample_report()], fail_on)


def test_warning_only_report_passes_the_error_gate() -> None:
    rep = report(blocks=[block(L3)], findings=[finding("XD201", Severity.WARNING, L3, "low")])
    assert "1. :warning: " in render([rep])
    assert "passes `--fail-on error`" in render([rep])


def test_blocks_table() -> None:
    text = section(render([sample_report()]), "### 1. `runs/ckpt-1000/model.safetensors`")
    rows = table_rows(text)
    assert rows[0] == ["Block", "Layout", "Heads", "Max logit", "Entropy mean",
                       "Entropy min head", "Max weight", "Grad norm", "Scale ratio", "Gate"]
    assert rows[2] == [f"`{L3}`", "mllama", "32", "123.5", "1.235", "0.3124", "0.9987",
                       "45.68", "12.35", "0.8123"]
    assert rows[3][-1] == "-0.985"
    assert all(len(r) == len(rows[0]) for r in rows)


def test_missing_metrics_are_dashes() -> None:
    rows = table_rows(render([healthy_report()]))
    assert rows[2] == [f"`{L3}`", "mllama", "32", "12", "-", "-", "-", "-", "-", "0.1"]


def test_findings_grouped_by_symptom_in_order() -> None:
    text = section(render([sample_report()]), "#### Findings")
    groups = re.findall(r"^\*\*(.+)\*\*$", text, re.M)
    assert groups == ["Gradient explosion", "Attention collapse", "Feature scale mismatch",
                      "Gating", "Architecture"]
    assert (f"- **XD101** error `{L3}`: max logit 123.5 exceeds 100\n"
            "  - evidence: max_logit=123.5, threshold=100, head=7") in text
    assert "- **XD601** info: no block uses qk-norm" in text


def test_no_findings() -> None:
    assert "#### Findings\n\nNo findings.\n" in render([healthy_report()])


def test_remediation_section() -> None:
    text = section(render([sample_report()]), "### Remediation")
    assert re.findall(r"^#### (XD\d+)", text, re.M) == ["XD101", "XD201", "XD301", "XD402",
                                                      "XD601"]
    xd101 = section(text, f"#### XD101 (`{L3}`)")
    assert xd101.startswith("\nClip gradients and normalise queries and keys.\n")
    config = re.search(r"```yaml\n(.*?)```", xd101, re.S)
    assert config is not None and yaml.safe_load(config.group(1)) == CLIP_REMEDY.config
    assert "Code change:\n\n```python\nq = self.q_norm(q)\nk = self.k_norm(k)\n```" in xd101
    assert "References:\n\n- https://arxiv.org/abs/2302.05442" in xd101
    assert "#### XD601 (checkpoint)" in text


def test_remediation_lists_every_block_once() -> None:
    reports = [sample_report(), sample_report("runs/ckpt-2000/model.safetensors")]
    assert f"#### XD101 (`{L3}`)\n" in render(reports)


def test_trend_table_only_with_several_reports() -> None:
    assert "### Trend" not in render([sample_report()])
    text = section(render([sample_report(), healthy_report()]), "### Trend")
    rows = table_rows(text)
    assert rows[0] == ["Block", "Metric", "#1", "#2", "Change"]
    assert [f"`{L3}`", "max logit", "123.5", "12", "-111.5"] in rows
    assert [f"`{L8}`", "gate", "-0.985", "0.2", "+1.185"] in rows
    assert [f"`{L3}`", "grad norm", "45.68", "-", "-"] in rows


def test_pipes_in_names_are_escaped() -> None:
    rep = report(blocks=[block("a|b")])
    rows = table_rows(render([rep]))
    assert rows[2][0] == "`a\\|b`"


@pytest.mark.parametrize(("text", "span"), [
    ("plain", "`plain`"), ("a`b", "``a`b``"), ("`x`", "`` `x` ``")])
def test_code_span(text: str, span: str) -> None:
    assert code_span(text) == span


def test_fence_outgrows_inner_backticks() -> None:
    assert fence("x = '```'", "python") == "````python\nx = '```'\n````"


def test_render_is_deterministic() -> None:
    reports = [sample_report(), healthy_report()]
    assert render(reports) == render(reports)
    assert render(reports).endswith("\n") and not render(reports).endswith("\n\n")
