"""Simulation: a fix rebuilt with dataclasses.replace on the same tensors and inputs really moves
the metric past its rule's threshold; the unchanged block reproduces the diagnosis exactly."""

from __future__ import annotations

import hashlib
from dataclasses import replace
from pathlib import Path

import pytest
import sick

from xattn_doctor.api import diagnose_one
from xattn_doctor.checkpoint import open_checkpoint
from xattn_doctor.findings import Metrics, Report
from xattn_doctor.fixes import FIXES, PLANS, applies, judge, sick_blocks, snippet, to_simulate
from xattn_doctor.layouts import detect
from xattn_doctor.layouts._base import BlockSpec, Norm
from xattn_doctor.measure import RunSettings
from xattn_doctor.options import Options
from xattn_doctor.probe import Probe, load_probe, synthetic
from xattn_doctor.runtime import default_budget, resolve
from xattn_doctor.simulate import apply, run_fixed, simulate

OPTS = Options(device="cpu")


class Case:
    """One checkpoint diagnosed once, ready to re-run its block with a fix."""

    def __init__(self, folder: Path, kind: str) -> None:
        self.path = sick.make(folder, kind)
        self.probe: Probe = (load_probe(sick.probe(folder)) if kind == "scale_mismatch"
                             else synthetic(0))
        self.report: Report = diagnose_one(self.path, self.probe, OPTS)
        ckpt = open_checkpoint(self.path)
        self.spec: BlockSpec = detect(ckpt.index, ckpt.config, None).blocks[0]
        rt = resolve("cpu", "auto", ckpt.dtype)
        self.settings = RunSettings(rt.device, rt.dtype, OPTS.budget_bytes or default_budget(rt.device), 0)

    @property
    def before(self) -> Metrics:
        """The diagnosis' metrics of the block."""
        return self.report.blocks[0].metrics

    def after(self, fix: str | None, spec: BlockSpec | None = None) -> Metrics:
        """The block's metrics with `fix` applied (None: unchanged)."""
        m = run_fixed(open_checkpoint(self.path), spec or self.spec, fix, self.probe,
                      self.settings)
        assert m is not None
        return m


@pytest.fixture(scope="module")
def cases(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Case]:
    base = tmp_path_factory.mktemp("sim")
    return {k: Case(base / k, k) for k in ("healthy", "logit_explosion", "entropy_collapse",
                                           "dead", "scale_mismatch", "temperature_floor")}


def thresholds(case: Case) -> dict[str, dict[str, float]]:
    return case.report.to_json()["thresholds"]


def test_unchanged_block_reproduces_the_diagnosis(cases: dict[str, Case]) -> None:
    for case in cases.values():
        again = case.after(None)
        for metric in ("max_logit", "entropy_mean", "grad_norm", "scale_ratio",
                       "saturated_query_share"):
            assert getattr(again, metric) == getattr(case.before, metric), metric


def test_qk_norm_clears_the_logit_explosion(cases: dict[str, Case]) -> None:
    case = cases["logit_explosion"]
    warn = thresholds(case)["XD101"]["warn_at"]
    after = case.after("qk_norm")
    assert case.before.max_logit > 1000 and after.max_logit < warn
    # per-head unit RMSNorm bounds |q.k| / sqrt(d) by sqrt(d) = 4 here
    assert after.max_logit <= case.spec.head_dim ** 0.5 + 1e-4
    assert after.entropy_mean > case.before.entropy_mean


def test_qk_norm_clears_the_entropy_collapse(cases: dict[str, Case]) -> None:
    case = cases["entropy_collapse"]
    block = case.report.to_json()["blocks"][0]
    after = case.after("qk_norm")
    ok, text = judge("XD201", after.entropy_mean, thresholds(case), block)
    assert case.before.entropy_mean < 0.5 and ok, text


def test_softcap_bounds_the_logits_at_50(cases: dict[str, Case]) -> None:
    case = cases["logit_explosion"]
    assert case.after("softcap").max_logit <= 50.0


def test_key_norm_clears_the_scale_mismatch(cases: dict[str, Case]) -> None:
    case = cases["scale_mismatch"]
    after = case.after("key_norm")
    assert case.before.scale_ratio > 40 and abs(after.scale_ratio - 1.0) < 0.01


def test_reinit_out_proj_revives_the_dead_block(cases: dict[str, Case]) -> None:
    case = cases["dead"]
    after = case.after("reinit_out_proj")
    assert case.before.zero_grad is True and case.before.grad_norm == 0.0
    assert after.zero_grad is False and after.grad_norm > 0
    assert after.gate == 0.0  # the gate stays zero-initialised, as Flamingo
    assert after.grad_norms["gate"] > 0


def test_temperature_floor_divides_the_logits(cases: dict[str, Case]) -> None:
    case = cases["temperature_floor"]
    after = case.after("temperature_floor")
    assert after.max_logit == pytest.approx(case.before.max_logit / 5, rel=1e-4)


def test_fix_that_does_not_apply_is_none(cases: dict[str, Case]) -> None:
    spec = cases["healthy"].spec
    normed = replace(spec, q_norm=Norm("rms", spec.head_dim), k_norm=Norm("rms", spec.head_dim))
    assert apply("qk_norm", normed, {}) is None
    assert apply("key_norm", spec, {}) is None  # it already has one
    assert apply("temperature_floor", spec, {}) is None  # no temperature
    assert apply("softcap", replace(spec, softcap=30.0), {}) is None
    assert apply("no_such_fix", spec, {}) is None


def test_simulate_records_every_fix_for_every_finding(cases: dict[str, Case]) -> None:
    case = cases["scale_mismatch"]
    doc = case.report.to_json()
    sims = simulate(case.path, case.probe, OPTS, doc)
    codes = sick_blocks(doc)["layers.0"]
    tried = to_simulate(codes)
    assert set(tried) == {"key_norm", "qk_norm", "softcap"}
    metric_codes = [c for c in codes if PLANS[c].metric]
    assert len(sims) == len(tried) * len(metric_codes)
    assert all(s.block == "layers.0" and s.metric == PLANS[s.code].metric for s in sims)
    assert all(s.before == doc["blocks"][0]["metrics"][s.metric] for s in sims)


def test_healthy_checkpoint_simulates_nothing(cases: dict[str, Case]) -> None:
    case = cases["healthy"]
    assert simulate(case.path, case.probe, OPTS, case.report.to_json()) == []


def test_simulation_leaves_the_checkpoint_untouched(cases: dict[str, Case]) -> None:
    case = cases["dead"]
    digest = hashlib.sha256(case.path.read_bytes()).hexdigest()
    simulate(case.path, case.probe, OPTS, case.report.to_json())
    assert hashlib.sha256(case.path.read_bytes()).hexdigest() == digest


def test_judge_speaks_each_rules_threshold() -> None:
    block = {"metrics": {"valid_keys_mean": 64.0}}
    assert judge("XD101", 49.0, {}, block) == (True, "< 50")
    assert judge("XD101", 51.0, {"XD101": {"warn_at": 60.0}}, block) == (True, "< 60")
    assert judge("XD201", 0.4, {}, block) == (False, ">= 0.5")
    assert judge("XD201", 0.4, {}, {"metrics": {"valid_keys_mean": 4.0}})[0] is True
    assert judge("XD301", 12.0, {}, block) == (False, "in [0.1, 10]")
    assert judge("XD401", 0.0, {}, block) == (False, "> 0")
    assert judge("XD101", float("nan"), {}, block)[0] is False


def test_fix_catalogue_is_consistent() -> None:
    for code, plan in PLANS.items():
        assert plan.fixes and all(f in FIXES for f in plan.fixes), code
    block = {"heads": 4, "head_dim": 16, "query_dim": 64, "context_dim": 32, "metrics": {}}
    for fix in FIXES.values():
        text = snippet(fix, block)
        assert "{" not in text.replace("{}", "") and fix.summary.endswith(".")
        assert isinstance(applies(fix.name, block), bool)
