"""Helpers the CI formats share: the file a finding points at, numbers, evidence, the gate."""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path, PureWindowsPath
from typing import Any

from xattn_doctor.findings import Finding, Report, Severity
from xattn_doctor.rules import canonical
from xattn_doctor.rules._base import fmt


def artifact_path(report: Report) -> str:
    """The file a finding points at: the config.json read, else the checkpoint path.

    Forward slashes; an absolute path inside the working directory is made relative to it
    (CI annotations want repository-relative paths).
    """
    raw = report.checkpoint.config or report.checkpoint.path
    posix = PureWindowsPath(raw).as_posix() if "\\" in raw else raw
    path = Path(posix)
    if path.is_absolute():
        try:
            return path.relative_to(Path.cwd()).as_posix()
        except ValueError:
            return path.as_posix()
    return path.as_posix()


def num(value: float | int | None) -> str:
    """A number for people: 4 significant digits; '-' when missing."""
    if value is None:
        return "-"
    if isinstance(value, (bool, int)):
        return str(value)
    return str(value) if not math.isfinite(value) else fmt(value)


def value_text(value: Any) -> str:
    """Any evidence value as short text, floats at 4 significant digits."""
    if isinstance(value, (float, int)) and not isinstance(value, bool):
        return num(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(value_text(v) for v in value) + "]"
    if isinstance(value, Mapping):
        return "{" + ", ".join(f"{k}: {value_text(v)}" for k, v in value.items()) + "}"
    return str(value)


def evidence_text(evidence: Mapping[str, Any]) -> str:
    """Evidence as `key=value` pairs, in the rule's order."""
    return ", ".join(f"{k}={value_text(v)}" for k, v in evidence.items())


def rule_code(code: str) -> str:
    """The current code for `code` (aliases resolved); unknown codes unchanged."""
    return canonical(code) or code


def fails(finding: Finding, fail_on: Severity | None) -> bool:
    """True when the finding is at or above `fail_on` (None: never)."""
    return fail_on is not None and finding.severity.rank >= fail_on.rank


def failing(report: Report, fail_on: Severity | None) -> bool:
    """True when any finding of the report is at or above `fail_on`."""
    return any(fails(f, fail_on) for f in report.findings)


def counts_text(report: Report) -> str:
    """'1 error, 2 warnings, 0 info'."""
    c = report.counts()
    errors, warnings = c[Severity.ERROR], c[Severity.WARNING]
    return (f"{errors} error{'s' * (errors != 1)}, {warnings} warning{'s' * (warnings != 1)}, "
            f"{c[Severity.INFO]} info")
