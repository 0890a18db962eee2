"""How each block's metrics move across consecutive checkpoints of one run, and where they head.

Pure functions over a list of Reports given in training order. `trend_table` lines up the
series; `trend_findings` runs the series rules (`Rule.series`), which warn when a metric moves
in its bad direction at every step of the last few checkpoints while still on the safe side of
its threshold, and extrapolate linearly where it would cross.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import Any

from xattn_doctor.findings import Finding, Report
from xattn_doctor.rules import all_rules
from xattn_doctor.rules._base import fmt
from xattn_doctor.rules._series import SeriesRule

TREND_METRICS: tuple[str, ...] = (
    "max_logit", "entropy_min_head", "gate", "grad_norm", "scale_ratio",
)
Series = tuple[float | None, ...]
Thresholds = Mapping[str, Mapping[str, Any]]

_STEP_RE = re.compile(r"(\d+)$")
_SUFFIXES = (".safetensors.index.json", ".safetensors", ".json")


@dataclass(frozen=True)
class TrendRow:
    """One block's metric series, one value per report (None where absent)."""

    block: str
    max_logit: Series
    entropy_min_head: Series
    gate: Series
    grad_norm: Series
    scale_ratio: Series

    def series(self, metric: str) -> Series:
        """The series of one of `TREND_METRICS`."""
        if metric not in TREND_METRICS:
            raise KeyError(metric)
        values: Series = getattr(self, metric)
        return values


def block_names(reports: Sequence[Report]) -> list[str]:
    """Every block name in the reports, in order of first appearance."""
    return list(dict.fromkeys(b.name for r in reports for b in r.blocks))


def trend_table(reports: Sequence[Report]) -> list[TrendRow]:
    """The metric series of every block present in any of the reports."""
    return [_row(reports, name) for name in block_names(reports)]


def _row(reports: Sequence[Report], name: str) -> TrendRow:
    def s(metric: str) -> Series:
        return tuple(_value(r, name, metric) for r in reports)

    return TrendRow(block=name, max_logit=s("max_logit"), entropy_min_head=s("entropy_min_head"),
                    gate=s("gate"), grad_norm=s("grad_norm"), scale_ratio=s("scale_ratio"))


def _value(report: Report, block: str, metric: str) -> float | None:
    for b in report.blocks:
        if b.name == block:
            value: float | None = getattr(b.metrics, metric)
            return value
    return None


def checkpoint_step(path: str) -> int | None:
    """The training step a checkpoint path names (`ckpt-1000/`, `step_2000.safetensors`), if any."""
    for part in reversed(PurePosixPath(path.replace("\\", "/")).parts):
        stem = next((part[: -len(s)] for s in _SUFFIXES if part.endswith(s)), part)
        match = _STEP_RE.search(stem)
        if match:
            return int(match.group(1))
    return None


def checkpoint_steps(reports: Sequence[Report]) -> list[int] | None:
    """The step of each report when every path names one and they increase, else None."""
    steps = [checkpoint_step(r.checkpoint.path) for r in reports]
    known = [s for s in steps if s is not None]
    if len(known) != len(steps) or any(b <= a for a, b in zip(known, known[1:])):
        return None
    return known


def trend_findings(reports: Sequence[Report], thresholds: Thresholds | None = None,
                   disabled: frozenset[str] = frozenset()) -> list[Finding]:
    """Findings of the series rules over the reports (block order, then rule code).

    Options and thresholds come from `thresholds` (e.g. the CLI's effective config), then
    from the last report's `thresholds`, then from the rules' defaults.
    """
    if len(reports) < 2:
        return []
    effective = merge_thresholds(reports[-1].thresholds, thresholds or {})
    rules = [r for r in all_rules() if isinstance(r, SeriesRule) and r.code not in disabled]
    steps = checkpoint_steps(reports)
    out: list[Finding] = []
    for row in trend_table(reports):
        for rule in rules:
            finding = _judge(rule, row, steps, effective)
            if finding is not None:
                out.append(finding)
    return out


def merge_thresholds(base: Thresholds, over: Thresholds) -> dict[str, dict[str, Any]]:
    """`base` with `over`'s options laid on top, rule by rule."""
    return {code: {**base.get(code, {}), **over.get(code, {})} for code in {*base, *over}}


def _threshold(rule: SeriesRule, effective: Thresholds) -> float:
    code, option = rule.watches
    return float(effective.get(code, {}).get(option, rule.fallback_threshold))


def _values(rule: SeriesRule, row: TrendRow) -> Series:
    values = row.series(rule.metric)
    return tuple(abs(v) if v is not None and rule.magnitude else v for v in values)


def bad_run(values: Series, rising: bool) -> list[int]:
    """Indices of the trailing run in which every step moves strictly in the bad direction."""
    sign = 1.0 if rising else -1.0
    end = len(values) - 1
    if end < 0 or values[end] is None:
        return []
    start = end
    while start > 0:
        prev, cur = values[start - 1], values[start]
        if prev is None or cur is None or not sign * (cur - prev) > 0:
            break
        start -= 1
    return list(range(start, end + 1))


def projected_crossing(xs: Sequence[float], ys: Sequence[float], threshold: float) -> float:
    """Where a least-squares line's slope, anchored at the last point, reaches `threshold`."""
    n = len(xs)
    mx, my = sum(xs) / n, sum(ys) / n
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)
    return xs[-1] + (threshold - ys[-1]) / slope


def _judge(rule: SeriesRule, row: TrendRow, steps: list[int] | None,
           effective: Thresholds) -> Finding | None:
    opts = {**rule.defaults, **effective.get(rule.code, {})}
    values = _values(rule, row)
    rising = rule.direction == "rising"
    run = bad_run(values, rising)
    ys = [v for v in (values[i] for i in run) if v is not None]
    threshold = _threshold(rule, effective)
    if len(ys) < max(2, int(opts["min_checkpoints"])):
        return None
    if (ys[-1] >= threshold) if rising else (ys[-1] <= threshold):
        return None
    at_index = projected_crossing([float(i) for i in run], ys, threshold)
    at_step = None
    if steps is not None:
        at_step = round(projected_crossing([float(steps[i]) for i in run], ys, threshold))
    evidence = _evidence(rule, run, ys, threshold, at_index, at_step, steps)
    return rule.series_finding(row.block, _message(rule, ys, threshold, at_index, at_step, run),
                               evidence)


def _evidence(rule: SeriesRule, run: list[int], ys: list[float], threshold: float,
              at_index: float, at_step: int | None, steps: list[int] | None) -> dict[str, Any]:
    code, option = rule.watches
    out: dict[str, Any] = {
        "metric": rule.metric_label, "values": ys, "checkpoint_indices": run,
        "threshold": threshold, "threshold_from": f"{code}.{option}",
        "projected_index": round(at_index, 2),
    }
    if steps is not None and at_step is not None:
        out["steps"] = [steps[i] for i in run]
        out["projected_step"] = at_step
    return out


def _message(rule: SeriesRule, ys: list[float], threshold: float, at_index: float,
             at_step: int | None, run: list[int]) -> str:
    verb = "rose" if rule.direction == "rising" else "fell"
    path = " -> ".join(fmt(y) for y in ys)
    if at_step is not None:
        where = f"around step {at_step}"
    else:
        where = f"in about {fmt(at_index - run[-1], 2)} more checkpoint(s)"
    return (f"{rule.metric_label} {verb} at each of the last {len(ys)} checkpoints ({path}); "
            f"extrapolated linearly it reaches {fmt(threshold)} ({rule.watches[0]}) {where}")
