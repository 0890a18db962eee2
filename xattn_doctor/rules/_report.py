"""Whole-report rules: judged once over every block of one report, not block by block.

Some symptoms exist only across a model: gradients vanishing with depth, the global gradient
norm under the model's own loss, a non-finite loss. Such a rule subclasses `ReportRule` and
implements `check_report`; `rules.run_report` calls it after every block is measured, in model
mode and in blocks mode alike (a rule that needs model mode's numbers returns nothing without
them).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

from xattn_doctor.findings import Finding, Report, Severity
from xattn_doctor.rules._base import BlockContext, Rule


class ReportRule(Rule):
    """A rule over a whole report (see the module docstring)."""

    whole_report: ClassVar[bool] = True

    def check(self, ctx: BlockContext, opts: Mapping[str, Any]) -> list[Finding]:
        """Nothing per block: `rules.run_report` judges the report."""
        return []

    def check_report(self, report: Report, opts: Mapping[str, Any]) -> list[Finding]:
        """The findings of this rule on `report` (empty when it does not apply)."""
        raise NotImplementedError

    def report_finding(self, block: str | None, severity: Severity, message: str,
                       evidence: dict[str, Any]) -> Finding:
        """A finding of this rule (on `block`, or on the whole model when None)."""
        return Finding(code=self.code, symptom=self.symptom, severity=severity, block=block,
                       message=message, evidence=evidence, remedy=self.remedy)
