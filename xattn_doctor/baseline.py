"""Baselines: accept the findings of an earlier JSON report and report only new ones.

A finding is known when the baseline holds one with the same rule (aliases resolved) on the
same block. The checkpoint path is ignored, so a baseline survives new checkpoint names.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from xattn_doctor.findings import Finding, Report
from xattn_doctor.rules import canonical

Fingerprint = tuple[str, str | None]  # (rule code, block or None)


def fingerprint(code: str, block: str | None) -> Fingerprint:
    """What identifies a finding across runs: its current rule code and its block."""
    return (canonical(code) or code.upper(), block)


def load_baseline(path: str | Path) -> set[Fingerprint]:
    """Fingerprints of every finding in a JSON report (one object or a list of them).

    Raises ValueError with a one-line message when the file is unreadable or not a report.
    """
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except OSError as e:
        raise ValueError(f"{path}: cannot read baseline: {e.strerror or e}") from e
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: baseline is not JSON: {_one_line(e)}") from e
    reports = data if isinstance(data, list) else [data]
    return {fp for i, r in enumerate(reports) for fp in _report_fingerprints(path, i, r)}


def _report_fingerprints(path: str | Path, index: int, report: Any) -> list[Fingerprint]:
    where = f"{path}: report {index}"
    if not isinstance(report, dict) or not isinstance(report.get("findings"), list):
        raise ValueError(f"{where}: not an xattn-doctor JSON report (no 'findings' list)")
    version = report.get("schema_version", 1)
    if version != 1:
        raise ValueError(f"{where}: unsupported schema_version {version!r} (expected 1)")
    return [_finding_fingerprint(where, j, f) for j, f in enumerate(report["findings"])]


def _finding_fingerprint(where: str, index: int, finding: Any) -> Fingerprint:
    if not isinstance(finding, dict):
        raise ValueError(f"{where}: finding {index} is not an object")
    code, block = finding.get("code"), finding.get("block")
    if not isinstance(code, str) or not code:
        raise ValueError(f"{where}: finding {index} has no 'code' string")
    if block is not None and not isinstance(block, str):
        raise ValueError(f"{where}: finding {index} has a 'block' that is not a string or null")
    return fingerprint(code, block)


def new_findings(report: Report, baseline: set[Fingerprint]) -> list[Finding]:
    """The report's findings that the baseline does not already hold."""
    return [f for f in report.findings if fingerprint(f.code, f.block) not in baseline]


def _one_line(error: Exception) -> str:
    return " ".join(str(error).split())
