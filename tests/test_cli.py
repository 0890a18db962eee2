"""The command line: exit codes, --fail-on, --output, --baseline, rules, explain, --version."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from xattn_doctor.cli import app, exit_code
from xattn_doctor.findings import Severity

FIX = Path(__file__).resolve().parent.parent / "fixtures"
runner = CliRunner()


def run(*args: str):  # type: ignore[no-untyped-def]
    return runner.invoke(app, list(args))


def test_version() -> None:
    r = run("--version")
    assert r.exit_code == 0 and r.stdout.startswith("xattn-doctor ")


def test_healthy_exits_0_and_sick_exits_1() -> None:
    ok = run("diagnose", str(FIX / "healthy"), "--probe", str(FIX / "healthy/probe.safetensors"))
    assert ok.exit_code == 0, ok.stderr
    assert "status: healthy" in ok.stdout
    sick = run("diagnose", str(FIX / "logit_explosion"))
    assert sick.exit_code == 1
    assert "XD101" in sick.stdout and "Remediation" in sick.stdout


@pytest.mark.parametrize(("fail_on", "code"), [("error", 0), ("warning", 1), ("never", 0)])
def test_fail_on(fail_on: str, code: int) -> None:
    r = run("diagnose", str(FIX / "saturated_gate"), "--fail-on", fail_on)
    assert r.exit_code == code


def test_bad_fail_on_is_exit_2() -> None:
    r = run("diagnose", str(FIX / "healthy"), "--fail-on", "sometimes")
    assert r.exit_code == 2
    assert len(r.stderr.strip().splitlines()) == 1 and "fail_on" in r.stderr


def test_output_file_gets_report_and_terminal_a_summary(tmp_path: Path) -> None:
    out = tmp_path / "r.json"
    r = run("diagnose", str(FIX / "logit_explosion"), "--format", "json", "--output", str(out))
    assert r.exit_code == 1
    assert len(r.stdout.strip().splitlines()) == 1 and str(out) in r.stdout
    assert json.loads(out.read_text())["summary"]["status"] == "error"


def test_no_output_file_when_diagnosis_fails(tmp_path: Path) -> None:
    out = tmp_path / "r.json"
    r = run("diagnose", str(tmp_path / "missing.safetensors"), "--output", str(out))
    assert r.exit_code == 2 and not out.exists()


def test_baseline_accepts_known_findings(tmp_path: Path) -> None:
    base = tmp_path / "base.json"
    assert run("diagnose", str(FIX / "logit_explosion"), "-f", "json", "-o", str(base)).exit_code == 1
    assert run("diagnose", str(FIX / "logit_explosion"), "--baseline", str(base)).exit_code == 0
    # a new sick block is still caught
    assert run("diagnose", str(FIX / "nan_weight"), "--baseline", str(base)).exit_code == 1


def test_bad_baseline_is_exit_2(tmp_path: Path) -> None:
    bad = tmp_path / "b.json"
    bad.write_text("{not json")
    r = run("diagnose", str(FIX / "healthy"), "--baseline", str(bad))
    assert r.exit_code == 2 and len(r.stderr.strip().splitlines()) == 1


def test_unknown_format_is_exit_2() -> None:
    r = run("diagnose", str(FIX / "healthy"), "--format", "yaml")
    assert r.exit_code == 2


def test_every_format_is_reachable_from_the_cli() -> None:
    from xattn_doctor.formats import names

    assert {"text", "json", "markdown", "sarif", "junit", "github"} <= set(names())
    for name in names():
        r = run("diagnose", str(FIX / "post_ln"), "--format", name, "--fail-on", "warning")
        assert r.exit_code == 1, (name, r.stderr)
        assert r.stdout.strip()


def test_rules_lists_every_rule() -> None:
    from xattn_doctor.rules import all_rules

    r = run("rules")
    assert r.exit_code == 0
    for rule in all_rules():
        assert rule.code in r.stdout


def test_explain() -> None:
    r = run("explain", "xd101")
    assert r.exit_code == 0
    for part in ("Why:", "Fix:", "References", "max_grad_norm", "Wortsman"):
        assert part in r.stdout
    bad = run("explain", "XD999")
    assert bad.exit_code == 2 and "unknown rule code" in bad.stderr


def test_several_checkpoints_give_a_list_and_a_trend_table() -> None:
    paths = [str(FIX / n) for n in ("healthy", "logit_explosion")]
    r = run("diagnose", *paths, "--probe", str(FIX / "healthy/probe.safetensors"), "-f", "json")
    data = json.loads(r.stdout)
    assert isinstance(data, list) and len(data) == 2
    t = run("diagnose", *paths, "--probe", str(FIX / "healthy/probe.safetensors"))
    assert "Trends across checkpoints" in t.stdout


def test_exit_code_function() -> None:
    from report_factory_min import report_with

    assert exit_code([report_with(Severity.WARNING)], Severity.ERROR) == 0
    assert exit_code([report_with(Severity.WARNING)], Severity.WARNING) == 1
    assert exit_code([report_with(Severity.ERROR)], None) == 0
    assert exit_code([], Severity.ERROR) == 0


def test_heads_option_overrides(tmp_path: Path) -> None:
    r = run("diagnose", str(FIX / "no_config"), "--heads", "2", "-f", "json")
    blocks = json.loads(r.stdout)["blocks"]
    assert blocks[0]["heads"] == 2 and blocks[0]["heads_source"] == "cli"
    bad = run("diagnose", str(FIX / "no_config"), "--heads", "5")
    assert bad.exit_code == 2 and "--heads 5" in bad.stderr
