"""Rule registry: each `xd*.py` module here defines one rule and registers it with `@register`."""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from xattn_doctor._plugins import load
from xattn_doctor.findings import Finding, Report, Severity
from xattn_doctor.rules._base import BlockContext, Rule

_RULES: dict[str, Rule] = {}
_ALIASES: dict[str, str] = {}
CODE_RE = re.compile(r"^XD[1-7]\d\d$")


def register(cls: type[Rule]) -> type[Rule]:
    """Class decorator: instantiate the rule and index it by code and aliases."""
    if not CODE_RE.match(cls.code):
        raise ValueError(f"bad rule code {cls.code!r}")
    if cls.code in _RULES or cls.code in _ALIASES:
        raise ValueError(f"rule code {cls.code} registered twice")
    _RULES[cls.code] = cls()
    for alias in cls.aliases:
        _ALIASES[alias] = cls.code
    return cls


def _load() -> None:
    load(__name__, __path__)


def all_rules() -> list[Rule]:
    """Every registered rule, by code."""
    _load()
    return [_RULES[c] for c in sorted(_RULES)]


def get(code: str) -> Rule:
    """The rule with this code or alias (case-insensitive); KeyError if none."""
    _load()
    code = code.upper()
    return _RULES[_ALIASES.get(code, code)]


def canonical(code: str) -> str | None:
    """The current code for `code` or one of its aliases, or None if unknown."""
    try:
        return get(code).code
    except KeyError:
        return None


def run(ctx: BlockContext, thresholds: Mapping[str, Mapping[str, Any]],
        disabled: frozenset[str] = frozenset()) -> list[Finding]:
    """All enabled rules on one block, with per-rule option values from `thresholds`."""
    out: list[Finding] = []
    for rule in all_rules():
        if rule.code in disabled:
            continue
        opts = {**rule.defaults, **thresholds.get(rule.code, {})}
        for f in rule.check(ctx, opts):
            if not rule.fails_build and f.severity is not Severity.INFO:
                raise AssertionError(f"{rule.code} informs only but gave {f.severity}")
            out.append(f)
    return out


def run_report(report: Report, thresholds: Mapping[str, Mapping[str, Any]],
               disabled: frozenset[str] = frozenset()) -> list[Finding]:
    """All enabled whole-report rules (`rules._report.ReportRule`) on one report."""
    out: list[Finding] = []
    for rule in all_rules():
        check = getattr(rule, "check_report", None)
        if check is None or rule.code in disabled:
            continue
        opts = {**rule.defaults, **thresholds.get(rule.code, {})}
        for f in check(report, opts):
            if not rule.fails_build and f.severity is not Severity.INFO:
                raise AssertionError(f"{rule.code} informs only but gave {f.severity}")
            out.append(f)
    return out


__all__ = ["BlockContext", "Rule", "all_rules", "canonical", "get", "register", "run",
           "run_report"]
