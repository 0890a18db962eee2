"""JUnit XML for CI test reports: a testsuite per checkpoint, a testcase per block and symptom.

A testcase fails when the block has a finding of that symptom at or above `--fail-on`; lower
findings go to its `<system-out>`. Blocks the diagnosis skipped become skipped testcases.
"""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET

from xattn_doctor.findings import Finding, Report, Severity, Symptom
from xattn_doctor.formats import register
from xattn_doctor.formats._common import evidence_text, fails

CHECKPOINT_CASE = "(checkpoint)"  # the testcase "block" of findings that name no block
_XML_INVALID = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\ufffe\uffff]")


@register
class JUnitRenderer:
    """JUnit XML (GitLab, Jenkins, Azure Pipelines, test-report actions)."""

    name = "junit"
    summary = "JUnit XML: a testcase per block and symptom"
    extension = "xml"

    def render(self, reports: list[Report], *, fail_on: Severity | None = Severity.ERROR,
               color: bool = False, width: int = 100) -> str:
        """A <testsuites> document; `color` and `width` do not apply."""
        root = ET.Element("testsuites", name="xattn-doctor")
        suites = [_suite(r, fail_on) for r in reports]
        for suite in suites:
            root.append(suite)
        _count(root, suites)
        ET.indent(root)
        return '<?xml version="1.0" encoding="UTF-8"?>\n' + ET.tostring(root, "unicode") + "\n"


def _count(element: ET.Element, children: list[ET.Element]) -> None:
    for key in ("tests", "failures", "errors", "skipped"):
        element.set(key, str(sum(int(c.get(key, "0")) for c in children)))


def _suite(report: Report, fail_on: Severity | None) -> ET.Element:
    path = _safe(report.checkpoint.path)
    suite = ET.Element("testsuite", name=path)
    cases = [_case(path, block, symptom, _of(report, block, symptom), fail_on)
             for block in case_blocks(report) for symptom in Symptom]
    cases += [_skipped_case(path, entry) for entry in report.skipped]
    suite.extend(cases)
    suite.set("tests", str(len(cases)))
    suite.set("failures", str(sum(c.find("failure") is not None for c in cases)))
    suite.set("errors", "0")
    suite.set("skipped", str(sum(c.find("skipped") is not None for c in cases)))
    return suite


def case_blocks(report: Report) -> list[str]:
    """Blocks to test: measured blocks, then any others that findings name, then the checkpoint."""
    names = [b.name for b in report.blocks]
    names += [f.block for f in report.findings if f.block is not None]
    if any(f.block is None for f in report.findings):
        names.append(CHECKPOINT_CASE)
    return list(dict.fromkeys(names))


def _of(report: Report, block: str, symptom: Symptom) -> list[Finding]:
    key = None if block == CHECKPOINT_CASE else block
    found = [f for f in report.findings if f.block == key and f.symptom is symptom]
    return sorted(found, key=lambda f: -f.severity.rank)


def _case(path: str, block: str, symptom: Symptom, found: list[Finding],
          fail_on: Severity | None) -> ET.Element:
    case = ET.Element("testcase", classname=path, name=_safe(f"{block} :: {symptom.value}"))
    failing = [f for f in found if fails(f, fail_on)]
    passing = [f for f in found if not fails(f, fail_on)]
    if failing:
        worst = failing[0]
        more = f" (+{len(failing) - 1} more)" if len(failing) > 1 else ""
        failure = ET.SubElement(case, "failure", type=worst.severity.value,
                                message=_safe(f"{worst.code} {worst.message}{more}"))
        failure.text = _safe("\n\n".join(_detail(f) for f in failing))
    if passing:
        ET.SubElement(case, "system-out").text = _safe("\n\n".join(_detail(f) for f in passing))
    return case


def _skipped_case(path: str, entry: dict[str, str]) -> ET.Element:
    name = entry.get("name") or entry.get("block") or "?"
    reason = entry.get("reason") or entry.get("detail") or "skipped"
    case = ET.Element("testcase", classname=path, name=_safe(f"{name} :: skipped"))
    ET.SubElement(case, "skipped", message=_safe(reason))
    return case


def _detail(finding: Finding) -> str:
    lines = [f"{finding.code} [{finding.severity.value}] {finding.message}"]
    if finding.evidence:
        lines.append(f"evidence: {evidence_text(finding.evidence)}")
    lines.append(f"remedy: {finding.remedy.summary}")
    return "\n".join(lines)


def _safe(text: str) -> str:
    """Drop characters XML 1.0 cannot carry (ElementTree would write them as they are)."""
    return _XML_INVALID.sub("", text)
