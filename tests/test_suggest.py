"""suggest-config: baseline for a healthy checkpoint, commented changes for sick ones, the YAML
round trip, --from-report without torch, and the command's exit codes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import sick
import yaml
from typer.testing import CliRunner

from xattn_doctor.cli import app
from xattn_doctor.options import Options
from xattn_doctor.suggest import Draft, Suggestion, build, fit

ROOT = Path(__file__).resolve().parents[1]
runner = CliRunner()


@pytest.fixture(scope="module")
def made(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, Path | None]]:
    """Every kind of tiny checkpoint, with the probe it is diagnosed with (None: synthetic)."""
    base = tmp_path_factory.mktemp("sick")
    out: dict[str, tuple[Path, Path | None]] = {}
    for kind in sick.KINDS:
        path = sick.make(base / kind, kind)
        out[kind] = (path, sick.probe(base / kind) if kind == "scale_mismatch" else None)
    out["deep"] = (sick.make(base / "deep", "logit_explosion", layers=4, sick_layers=(3,)), None)
    out["fp16"] = (sick.make(base / "fp16", "healthy", dtype=__import__("torch").float16), None)
    return out


@pytest.fixture(scope="module")
def suggested(made: dict[str, tuple[Path, Path | None]]) -> dict[str, tuple[dict[str, Any],
                                                                            Suggestion]]:
    """(report JSON, suggestion) per kind, diagnosed and simulated once."""
    from xattn_doctor.simulate import diagnose_and_simulate

    out = {}
    for kind, (path, probe) in made.items():
        report, sims = diagnose_and_simulate(path, probe, Options(device="cpu"))
        doc = report.to_json()
        out[kind] = (doc, build(doc, [s.to_json() for s in sims], total_steps=20000))
    return out


def baseline(report: dict[str, Any], total_steps: int | None = 20000) -> Draft:
    """The recipe fitted to a report, with no finding applied."""
    draft = Draft()
    fit(draft, report, total_steps)
    return draft


SECTIONS = ("optimizer", "lr_schedule", "gradient_clipping", "cross_attention", "regularization",
            "mixed_precision", "monitoring")


def changed(s: Suggestion) -> dict[str, dict[str, Any]]:
    """The finding-driven changes by key."""
    return {c["key"]: c for c in s.data["changes"] if c["code"]}


def yaml_line(text: str, key: str) -> str:
    """The YAML line of a dotted key (its last component, under its section)."""
    section, *_, leaf = key.split(".")
    lines = text.splitlines()
    start = lines.index(f"{section}:")
    return next(line for line in lines[start:] if line.strip().startswith(f"{leaf}:"))


def test_contract_keys_and_order(suggested: dict[str, Any]) -> None:
    data = suggested["healthy"][1].data
    assert list(data)[:5] == ["optimizer", "lr_schedule", "gradient_clipping", "cross_attention",
                              "regularization"]
    for key in ("monitoring", "code_changes", "simulations"):
        assert key in data
    assert data["optimizer"]["betas"] == [0.9, 0.98] and data["optimizer"]["lr"] == 1e-4


def test_healthy_is_the_fitted_baseline(suggested: dict[str, Any]) -> None:
    report, s = suggested["healthy"]
    assert report["summary"]["status"] == "healthy"
    base = baseline(report)
    assert {k: s.data[k] for k in SECTIONS} == {k: base.data[k] for k in SECTIONS}
    assert s.data["code_changes"] == [] and s.data["simulations"] == []
    assert not changed(s)
    text = s.render("yaml")
    assert "# Nothing needed changing" in text
    assert "cross_attention:\n" in text and "num_heads: 4  # from the checkpoint" in text


def test_baseline_zero_inits_the_gate_only_and_says_why(suggested: dict[str, Any]) -> None:
    text = suggested["healthy"][1].render("yaml")
    ca = suggested["healthy"][1].data["cross_attention"]
    assert ca["use_gating"] is True and ca["gate_init"] == 0.0 and ca["init_method"] == "xavier"
    line = yaml_line(text, "cross_attention.init_method")
    assert "NOT \"zero\"" in line and "zero gradient" in line and "XD401" in line
    assert "Flamingo" in yaml_line(text, "cross_attention.gate_init")


def test_logit_explosion(suggested: dict[str, Any]) -> None:
    s = suggested["logit_explosion"][1]
    ch = changed(s)
    assert ch["cross_attention.qk_norm"]["value"] is True
    assert ch["cross_attention.qk_norm"]["code"] == "XD101"
    assert ch["gradient_clipping.cross_attention_max_grad_norm"]["value"] == 0.5
    assert s.data["gradient_clipping"]["cross_attention_params"] == ["layers.*"]
    text = s.render("yaml")
    line = yaml_line(text, "cross_attention.qk_norm")
    assert "# XD101: max logit 2" in line and "simulated with qk-norm" in line and "->" in line
    assert "XD101: max logit" in yaml_line(text, "gradient_clipping.cross_attention_max_grad_norm")
    sim = next(x for x in s.data["simulations"] if x["code"] == "XD101" and x["fix"] == "qk_norm")
    assert sim["before"] > 100 and sim["after"] < 50 and sim["resolved"] is True
    fix = next(c for c in s.data["code_changes"] if c["fix"] == "qk_norm")
    assert fix["blocks"] == ["layers.0"] and "XD101" in fix["codes"]
    assert "nn.RMSNorm(16)" in fix["snippet"] and fix["summary"]
    assert s.data["cross_attention"]["logit_softcap"] is None  # qk-norm cleared it


def test_entropy_collapse(suggested: dict[str, Any]) -> None:
    _, s = suggested["entropy_collapse"]
    ch = changed(s)
    assert ch["regularization.attention_entropy.weight"]["value"] == 0.01
    assert ch["cross_attention.dropout_warmup.enabled"]["value"] is True
    text = s.render("yaml")
    assert "# XD201: mean entropy" in yaml_line(text, "regularization.attention_entropy.weight")
    sim = next(x for x in s.data["simulations"] if x["code"] == "XD201" and x["fix"] == "qk_norm")
    assert sim["before"] < 0.5 <= sim["after"] and sim["resolved"] is True
    assert s.data["cross_attention"]["qk_norm"] is True


def test_dead_block(suggested: dict[str, Any]) -> None:
    report, s = suggested["dead"]
    assert [f["code"] for f in report["findings"]] == ["XD401"]
    fix = next(c for c in s.data["code_changes"] if c["fix"] == "reinit_out_proj")
    assert fix["codes"] == ["XD401"] and "xavier_uniform_" in fix["snippet"]
    sim = next(x for x in s.data["simulations"] if x["fix"] == "reinit_out_proj")
    assert sim["before"] == 0.0 < sim["after"] and sim["resolved"] is True
    line = yaml_line(s.render("yaml"), "cross_attention.init_method")
    assert "XD401: every attention-path gradient is 0 in layers.0" in line and "grad_norm 0 ->" in line
    assert s.data["cross_attention"]["gate_init"] == 0.0


def test_scale_mismatch_prefers_the_key_norm(suggested: dict[str, Any]) -> None:
    report, s = suggested["scale_mismatch"]
    assert any(f["code"] == "XD301" and f["severity"] == "warning" for f in report["findings"])
    fixes = {c["fix"]: c for c in s.data["code_changes"]}
    assert "key_norm" in fixes and "qk_norm" not in fixes  # one fix clears them all
    assert "nn.LayerNorm(64)" in fixes["key_norm"]["snippet"]
    sim = next(x for x in s.data["simulations"] if x["code"] == "XD301")
    assert sim["before"] > 10 and 0.1 <= sim["after"] <= 10 and sim["resolved"]
    assert "# XD301: context/query RMS ratio" in yaml_line(s.render("yaml"),
                                                          "cross_attention.key_norm")


def test_temperature_floor(suggested: dict[str, Any]) -> None:
    _, s = suggested["temperature_floor"]
    ch = changed(s)
    assert ch["cross_attention.temperature_min"]["value"] == 0.5
    assert ch["cross_attention.temperature_min"]["code"] == "XD103"
    assert "XD103: temperature 0.1 at its floor 0.1" in yaml_line(
        s.render("yaml"), "cross_attention.temperature_min")


def test_every_change_is_commented_with_its_code(suggested: dict[str, Any]) -> None:
    for kind, (_, s) in suggested.items():
        text = s.render("yaml")
        for key, c in changed(s).items():
            assert c["code"] in s.comments[tuple(key.split("."))], (kind, key)
            assert f"# {c['code']}" in yaml_line(text, key) or c["code"] in yaml_line(text, key)


@pytest.mark.parametrize("kind", sick.KINDS + ("deep", "fp16"))
def test_yaml_round_trips_to_the_json(suggested: dict[str, Any], kind: str) -> None:
    s = suggested[kind][1]
    assert yaml.safe_load(s.render("yaml")) == json.loads(s.render("json")) == s.data


def test_depth_turns_on_layer_wise_warmup(suggested: dict[str, Any]) -> None:
    _, s = suggested["deep"]
    assert s.data["cross_attention"]["num_layers"] == 4
    assert changed(s)["lr_schedule.layer_wise_warmup"]["value"] is True
    assert "in 1 of 4 cross-attention blocks" in s.comments[("lr_schedule", "layer_wise_warmup")]
    assert [c["blocks"] for c in s.data["code_changes"]] == [["layers.3"]]


def test_fp16_checkpoint_gets_loss_scaling(suggested: dict[str, Any]) -> None:
    report, s = suggested["fp16"]
    assert report["checkpoint"]["dtype"] == "float16"
    assert s.data["mixed_precision"] == {"dtype": "bfloat16", "loss_scaling": "dynamic"}
    assert "float16" in s.comments[("mixed_precision", "loss_scaling")]


def test_total_steps_sets_warmup_to_ten_percent(suggested: dict[str, Any]) -> None:
    report = suggested["healthy"][0]
    assert build(report, [], total_steps=20000).data["lr_schedule"]["warmup_steps"] == 2000
    plain = build(report, []).data["lr_schedule"]
    assert plain["warmup_steps"] == 5000 and plain["total_steps"] is None


def test_info_findings_change_nothing(suggested: dict[str, Any]) -> None:
    report = json.loads(json.dumps(suggested["healthy"][0]))
    report["findings"] = [{"code": c, "severity": "info", "block": "layers.0", "message": "m",
                           "evidence": {}, "remedy": {"summary": "", "config": {
                               "cross_attention": {"qk_norm": True}}, "references": []}}
                          for c in ("XD104", "XD301", "XD201", "XD999")]
    s = build(report, [], total_steps=20000)
    base = baseline(report)
    assert {k: s.data[k] for k in SECTIONS} == {k: base.data[k] for k in SECTIONS}
    assert s.data["code_changes"] == [] and "Nothing needed changing" in s.render("yaml")


def test_unknown_rule_contributes_its_remedy_config(suggested: dict[str, Any]) -> None:
    report = json.loads(json.dumps(suggested["healthy"][0]))
    report["findings"] = [{"code": "XD299", "severity": "warning", "block": "layers.0",
                           "message": "new trouble", "evidence": {}, "remedy": {
                               "summary": "", "config": {"cross_attention": {"dropout": 0.2}}}}]
    s = build(report, [])
    assert s.data["cross_attention"]["dropout"] == 0.2
    assert s.comments[("cross_attention", "dropout")] == "XD299: new trouble in layers.0"


# --- the command -----------------------------------------------------------------------------

def test_cli_checkpoint_yaml_and_json(made: dict[str, Any], tmp_path: Path) -> None:
    path, _ = made["logit_explosion"]
    res = runner.invoke(app, ["suggest-config", str(path), "--device", "cpu",
                              "--total-steps", "1000"])
    assert res.exit_code == 0, res.output
    data = yaml.safe_load(res.stdout)
    assert data["lr_schedule"]["warmup_steps"] == 100
    assert "qk_norm: true  # XD101: max logit" in res.stdout
    out = tmp_path / "cfg.json"
    res = runner.invoke(app, ["suggest-config", str(path), "--device", "cpu", "--format", "json",
                              "--total-steps", "1000", "--output", str(out)])
    assert res.exit_code == 0, res.output
    assert "written to" in res.stdout and json.loads(out.read_text()) == data


def _report_file(made: dict[str, Any], tmp_path: Path, kinds: tuple[str, ...]) -> Path:
    out = tmp_path / "report.json"
    paths = [str(made[k][0]) for k in kinds]
    res = runner.invoke(app, ["diagnose", *paths, "--device", "cpu", "--format", "json",
                              "--output", str(out), "--fail-on", "never"])
    assert res.exit_code == 0, res.output
    return out


def test_from_report_runs_no_torch_and_no_simulation(made: dict[str, Any], tmp_path: Path) -> None:
    report = _report_file(made, tmp_path, ("logit_explosion",))
    code = ("import sys, yaml\n"
            "from typer.testing import CliRunner\n"
            "from xattn_doctor.cli import app\n"
            f"r = CliRunner().invoke(app, ['suggest-config', '--from-report', {str(report)!r}])\n"
            "assert r.exit_code == 0, r.output\n"
            "d = yaml.safe_load(r.stdout)\n"
            "print('torch' in sys.modules, d['simulations'], d['cross_attention']['qk_norm'])\n"
            "print(r.stdout)\n")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                         cwd=tmp_path, timeout=300, check=False)
    assert res.returncode == 0, res.stderr
    first, _, text = res.stdout.partition("\n")
    assert first == "False [] True"
    assert "No simulation was run" in text
    assert "not simulated: a report alone has no weights" in text
    assert "->" not in text.split("simulations:")[0].split("code_changes:")[1]


def test_from_report_list_uses_the_last(made: dict[str, Any], tmp_path: Path) -> None:
    report = _report_file(made, tmp_path, ("logit_explosion", "healthy"))
    res = runner.invoke(app, ["suggest-config", "--from-report", str(report), "-f", "json"])
    assert res.exit_code == 0, res.output
    data = json.loads(res.stdout)
    assert data["diagnosis"]["checkpoint"] == str(made["healthy"][0])
    assert any("used the last" in n for n in data["diagnosis"]["notes"])
    assert data["code_changes"] == []


@pytest.mark.parametrize("content, match", [
    ("{not json", "not valid JSON"),
    ("[]", "empty"),
    ('{"schema_version": 2}', "schema_version 2"),
    ('{"schema_version": 1, "checkpoint": {}, "blocks": {}, "findings": []}', "`blocks`"),
    ('{"schema_version": 1, "checkpoint": {}, "blocks": [], "findings": [{"code": "XD101"}]}',
     "severity"),
])
def test_malformed_report_is_exit_2(tmp_path: Path, content: str, match: str) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text(content)
    out = tmp_path / "never.yaml"
    res = runner.invoke(app, ["suggest-config", "--from-report", str(bad), "-o", str(out)])
    assert res.exit_code == 2
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and str(bad) in lines[0] and match in lines[0]
    assert not out.exists()


@pytest.mark.parametrize("args, match", [
    ([], "either a CHECKPOINT or --from-report"),
    (["CKPT", "--from-report", "R"], "either a CHECKPOINT or --from-report"),
    (["--from-report", "R", "--probe", "p.safetensors"], "--probe need(s) a CHECKPOINT"),
    (["--from-report", "missing.json"], "no such report file"),
    (["nowhere.safetensors"], "no such file or directory"),
])
def test_bad_arguments_are_exit_2(made: dict[str, Any], tmp_path: Path, args: list[str],
                                  match: str) -> None:
    report = _report_file(made, tmp_path, ("healthy",)) if "R" in args else None
    args = [str(made["healthy"][0]) if a == "CKPT" else str(report) if a == "R" else
            str(tmp_path / a) if a.endswith((".json", ".safetensors")) and "p.s" not in a else a
            for a in args]
    res = runner.invoke(app, ["suggest-config", *args])
    assert res.exit_code == 2
    assert match in res.stderr and len(res.stderr.strip().splitlines()) == 1


def test_bad_format_is_exit_2(made: dict[str, Any]) -> None:
    res = runner.invoke(app, ["suggest-config", str(made["healthy"][0]), "--format", "toml"])
    assert res.exit_code == 2 and "yaml, json" in res.stderr
