"""Series rules: judged by `xattn_doctor.trend` over consecutive checkpoints, never per block.

A series rule watches one metric of a block move, checkpoint after checkpoint, toward the
threshold of a per-block rule (`watches`), and warns before that rule would fire.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar, Literal

from xattn_doctor.findings import Finding, Severity
from xattn_doctor.rules._base import BlockContext, Rule

Direction = Literal["rising", "falling"]


class SeriesRule(Rule):
    """Base of the trend rules: which metric, which way is bad, whose threshold it nears."""

    series: ClassVar[bool] = True
    severity: ClassVar[Severity] = Severity.WARNING
    metric: ClassVar[str]  # a field of `Metrics`
    direction: ClassVar[Direction]  # the bad direction
    magnitude: ClassVar[bool] = False  # judge |value| (gates may be negative)
    watches: ClassVar[tuple[str, str]]  # (rule code, option) holding the threshold
    fallback_threshold: ClassVar[float]  # used when no report carries `watches`
    options: ClassVar[dict[str, type]] = {"min_checkpoints": int}
    defaults: ClassVar[dict[str, Any]] = {"min_checkpoints": 3}
    option_help: ClassVar[dict[str, str]] = {
        "min_checkpoints": "consecutive checkpoints the metric must move in the bad direction",
    }

    def check(self, ctx: BlockContext, opts: Mapping[str, Any]) -> list[Finding]:
        """Nothing per block: `trend.trend_findings` judges the series."""
        return []

    @property
    def metric_label(self) -> str:
        """The metric as messages name it, e.g. '|gate|'."""
        return f"|{self.metric}|" if self.magnitude else self.metric

    def series_finding(self, block: str, message: str, evidence: dict[str, Any]) -> Finding:
        """A finding of this rule on `block`, at the rule's severity."""
        return Finding(code=self.code, symptom=self.symptom, severity=self.severity,
                       block=block, message=message, evidence=evidence, remedy=self.remedy)
