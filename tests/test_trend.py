"""Trend table and series rules: steady moves toward a threshold, extrapolated crossing."""

from __future__ import annotations

import inspect
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st
from report_factory import L3, L8, block, report, series

from xattn_doctor.findings import Severity, Symptom
from xattn_doctor.rules import all_rules
from xattn_doctor.rules._series import SeriesRule
from xattn_doctor.trend import (
    bad_run,
    checkpoint_step,
    checkpoint_steps,
    projected_crossing,
    trend_findings,
    trend_table,
)

SERIES_RULES = [r for r in all_rules() if r.series]


def test_trend_table_lines_up_blocks() -> None:
    reports = [report("a/1", blocks=[block(L3, max_logit=1.0, gate=0.5)]),
               report("a/2", blocks=[block(L8, max_logit=2.0), block(L3, max_logit=3.0)])]
    rows = trend_table(reports)
    assert [r.block for r in rows] == [L3, L8]
    assert rows[0].max_logit == (1.0, 3.0)
    assert rows[0].gate == (0.5, None)
    assert rows[1].series("max_logit") == (None, 2.0)
    with pytest.raises(KeyError, match="heads"):
        rows[0].series("heads")


def test_growing_logits_project_the_crossing_step() -> None:
    found = trend_findings(series("max_logit", [20.0, 30.0, 40.0]))
    assert len(found) == 1
    f = found[0]
    assert (f.code, f.block, f.severity, f.symptom) == (
        "XD105", L3, Severity.WARNING, Symptom.GRADIENT_EXPLOSION)
    assert f.evidence["projected_step"] == 4000
    assert f.evidence["projected_index"] == 3.0
    assert f.evidence["steps"] == [1000, 2000, 3000]
    assert f.evidence["values"] == [20.0, 30.0, 40.0]
    assert f.evidence["threshold"] == 50.0
    assert f.message == ("max_logit rose at each of the last 3 checkpoints (20 -> 30 -> 40); "
                         "extrapolated linearly it reaches 50 (XD101) around step 4000")


def test_without_step_numbers_the_index_is_projected() -> None:
    paths = ["runs/first.safetensors", "runs/second.safetensors", "runs/third.safetensors"]
    (f,) = trend_findings(series("max_logit", [20.0, 30.0, 40.0], paths=paths))
    assert "projected_step" not in f.evidence and "steps" not in f.evidence
    assert f.evidence["projected_index"] == 3.0
    assert f.message.endswith("reaches 50 (XD101) in about 1 more checkpoint(s)")


def test_uneven_steps_extrapolate_in_steps() -> None:
    (f,) = trend_findings(series("max_logit", [20.0, 30.0, 40.0],
                                 paths=["ckpt-100", "ckpt-200", "ckpt-400"]))
    # least squares over (100, 20), (200, 30), (400, 40): slope 3000 / 46666.7 = 0.06429 per
    # step; from 40 at step 400, 10 more takes 155.6 steps
    assert f.evidence["projected_step"] == 556
    assert f.evidence["projected_index"] == 3.0


@pytest.mark.parametrize("values", [
    pytest.param([30.0, 30.0, 30.0], id="flat"),
    pytest.param([20.0, 35.0, 30.0, 40.0], id="noisy"),
    pytest.param([40.0, 45.0, 55.0], id="already-crossed"),
    pytest.param([30.0, 40.0], id="two-only"),
    pytest.param([40.0, 30.0, 20.0], id="falling"),
    pytest.param([20.0, None, 30.0, 40.0], id="gap"),
    pytest.param([20.0, float("nan"), 30.0, 40.0], id="nan"),
])
def test_no_trend_finding(values: list[float | None]) -> None:
    assert trend_findings(series("max_logit", values)) == []


def test_only_the_trailing_run_counts() -> None:
    (f,) = trend_findings(series("max_logit", [49.0, 10.0, 20.0, 30.0]))
    assert f.evidence["checkpoint_indices"] == [1, 2, 3]
    assert f.evidence["projected_step"] == 6000


def test_single_report_gives_nothing() -> None:
    assert trend_findings(series("max_logit", [40.0])) == []


def test_entropy_falling_toward_collapse() -> None:
    (f,) = trend_findings(series("entropy_min_head", [2.0, 1.5, 1.0]))
    assert (f.code, f.symptom) == ("XD205", Symptom.ATTENTION_COLLAPSE)
    assert f.evidence["projected_step"] == 4000
    assert f.message.startswith("entropy_min_head fell at each of the last 3 checkpoints")


def test_negative_gate_saturating_in_magnitude() -> None:
    (f,) = trend_findings(series("gate", [-0.3, -0.6, -0.9]))
    assert f.code == "XD405"
    assert f.evidence["metric"] == "|gate|"
    assert f.evidence["values"] == [0.3, 0.6, 0.9]
    assert f.evidence["projected_step"] == round(3000 + (0.99 - 0.9) / 0.3 * 1000)


def test_grad_norm_rising() -> None:
    (f,) = trend_findings(series("grad_norm", [1.0, 4.0, 7.0]))
    assert (f.code, f.evidence["projected_step"]) == ("XD106", 4000)


def test_thresholds_come_from_the_last_report() -> None:
    reports = series("max_logit", [20.0, 25.0, 30.0], thresholds={"XD101": {"warn_at": 35.0}})
    (f,) = trend_findings(reports)
    assert (f.evidence["threshold"], f.evidence["projected_step"]) == (35.0, 4000)
    assert f.evidence["threshold_from"] == "XD101.warn_at"


def test_explicit_thresholds_override_the_reports() -> None:
    reports = series("max_logit", [20.0, 25.0, 30.0], thresholds={"XD101": {"warn_at": 35.0}})
    assert trend_findings(reports, {"XD101": {"warn_at": 28.0}}) == []
    (kept,) = trend_findings(reports, {"XD101": {"error_at": 100.0}})  # warn from the report
    assert kept.evidence["threshold"] == 35.0
    assert trend_findings(reports, {"XD105": {"min_checkpoints": 4}}) == []
    assert trend_findings(reports, disabled=frozenset({"XD105"})) == []
    (f,) = trend_findings(series("max_logit", [10.0, 20.0]), {"XD105": {"min_checkpoints": 2}})
    assert f.evidence["projected_step"] == 5000


def test_projection_anchors_at_the_last_point() -> None:
    # least-squares slope of 10, 20, 40 is 15; from 40 it takes 2/3 of a checkpoint to reach 50
    assert projected_crossing([0.0, 1.0, 2.0], [10.0, 20.0, 40.0], 50.0) == pytest.approx(2 + 2 / 3)


@given(st.floats(-100, 40), st.floats(0.01, 10), st.integers(3, 8), st.integers(1, 5000))
def test_linear_series_cross_where_the_line_does(start: float, slope: float, n: int,
                                                 spacing: int) -> None:
    xs = [float(spacing * i) for i in range(n)]
    ys = [start + slope * x / spacing for x in xs]
    if ys[-1] >= 50:
        return
    expected = (50 - start) / slope * spacing
    assert projected_crossing(xs, ys, 50.0) == pytest.approx(expected, rel=1e-6, abs=1e-6)


def test_bad_run() -> None:
    assert bad_run((1.0, 3.0, 2.0, 4.0, 5.0), rising=True) == [2, 3, 4]
    assert bad_run((5.0, 4.0, 4.0, 3.0), rising=False) == [2, 3]
    assert bad_run((1.0, None), rising=True) == []
    assert bad_run((), rising=True) == []


@pytest.mark.parametrize(("path", "step"), [
    ("runs/ckpt-1000/model.safetensors", 1000),
    ("ckpt-2000.safetensors", 2000),
    ("out/checkpoint-300/model.safetensors.index.json", 300),
    ("C:\\runs\\step_5\\model.safetensors", 5),
    ("final.safetensors", None),
])
def test_checkpoint_step(path: str, step: int | None) -> None:
    assert checkpoint_step(path) == step


def test_steps_must_all_exist_and_increase() -> None:
    assert checkpoint_steps(series("max_logit", [1.0, 2.0])) == [1000, 2000]
    assert checkpoint_steps(series("max_logit", [1.0, 2.0], paths=["c-2", "c-1"])) is None
    assert checkpoint_steps(series("max_logit", [1.0, 2.0], paths=["c-1", "last"])) is None


@pytest.mark.parametrize("rule", SERIES_RULES, ids=lambda r: r.code)
def test_series_rule_properties(rule: SeriesRule) -> None:
    assert isinstance(rule, SeriesRule)
    assert rule.severity is Severity.WARNING
    assert rule.code[2] == str(rule.symptom.digit)
    assert Path(inspect.getfile(type(rule))).name == f"{rule.code.lower()}_{rule.slug}.py"
    assert rule.check(None, rule.defaults) == []  # type: ignore[arg-type]
    text = rule.explain()
    for heading in ("Why:", "Fix:", "References:"):
        assert f"\n{heading}\n" in text
    assert rule.references and rule.remedy.references == rule.references
    assert rule.defaults == {"min_checkpoints": 3}


def test_every_series_rule_is_registered() -> None:
    assert [r.code for r in SERIES_RULES] == ["XD105", "XD106", "XD205", "XD405"]
    assert not any(r.series for r in all_rules() if not isinstance(r, SeriesRule))
