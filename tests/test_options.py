"""Config: YAML or [tool.xattn-doctor], validated against what each rule declares."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from xattn_doctor.cli import app
from xattn_doctor.errors import ConfigError
from xattn_doctor.options import build, load_config

FIX = Path(__file__).resolve().parent.parent / "fixtures"


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "xd.yaml"
    p.write_text(text)
    return p


def test_thresholds_and_disable_apply(tmp_path: Path) -> None:
    cfg = write(tmp_path, "thresholds:\n  XD101: {warn_at: 500, error_at: 1000}\n"
                          "disable: [XD201, XD202]\n")
    r = CliRunner().invoke(app, ["diagnose", str(FIX / "logit_explosion"), "--config", str(cfg),
                                 "-f", "json"])
    assert r.exit_code == 0, r.stdout
    import json

    doc = json.loads(r.stdout)
    assert doc["thresholds"]["XD101"] == {"warn_at": 500.0, "error_at": 1000.0}
    assert "XD201" not in doc["thresholds"]
    assert not [f for f in doc["findings"] if f["code"] in ("XD101", "XD201", "XD202")]


@pytest.mark.parametrize(("text", "key"), [
    ("colour: red\n", "colour"),
    ("thresholds:\n  XD999: {x: 1}\n", "XD999"),
    ("thresholds:\n  XD101: {warn: 1}\n", "warn"),
    ("thresholds:\n  XD101: {warn_at: high}\n", "thresholds.XD101.warn_at"),
    ("disable: XD101\n", "disable"),
    ("disable: [XD000]\n", "XD000"),
    ("fail_on: sometimes\n", "fail_on"),
    ("blocks: {only: []}\n", "only"),
    ("heads: 0\n", "heads"),
    ("[unclosed\n", "YAML"),
])
def test_config_errors_name_file_and_key(tmp_path: Path, text: str, key: str) -> None:
    cfg = write(tmp_path, text)
    r = CliRunner().invoke(app, ["diagnose", str(FIX / "healthy"), "--config", str(cfg)])
    assert r.exit_code == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and str(cfg) in lines[0] and key in lines[0]


def test_pyproject_table_is_read(tmp_path: Path) -> None:
    (tmp_path / "pyproject.toml").write_text('[tool.xattn-doctor]\nfail_on = "warning"\n'
                                            '[tool.xattn-doctor.thresholds.XD101]\nwarn_at = 40\n')
    raw, where = load_config(None, cwd=tmp_path)
    opts = build(raw, where)
    assert opts.fail_on is not None and opts.fail_on.value == "warning"
    assert opts.effective_thresholds()["XD101"]["warn_at"] == 40.0
    assert where and where.endswith("[tool.xattn-doctor]")


def test_flags_win_over_config() -> None:
    opts = build({"fail_on": "warning", "heads": 4}, "x.yaml", fail_on="never", heads=8)
    assert opts.fail_on is None and opts.heads == 8


def test_include_exclude_patterns(tmp_path: Path) -> None:
    cfg = write(tmp_path, "blocks:\n  include: ['decoder.layers.4']\n")
    r = CliRunner().invoke(app, ["diagnose", str(FIX / "stack6"), "--config", str(cfg), "-f", "json"])
    import json

    doc = json.loads(r.stdout)
    assert [b["name"] for b in doc["blocks"]] == ["decoder.layers.4"]
    assert any(s["reason"] == "excluded by config" for s in doc["skipped_blocks"])


def test_unknown_code_in_disable_is_an_error() -> None:
    with pytest.raises(ConfigError, match="unknown rule code"):
        build({"disable": ["nope"]}, "c.yaml")


def test_memory_budget_sizes_the_backward_subsample(tmp_path: Path) -> None:
    """memory_budget_mb reaches the run: 1 MiB leaves the backward a handful of queries, the
    CPU default (64 MiB) many more; the statistics see every query either way."""
    import json

    import torch
    from safetensors.torch import save_file

    from xattn_doctor.runtime import CPU_BUDGET, default_budget

    assert build({}, None).budget_bytes is None
    assert default_budget(torch.device("cpu")) == CPU_BUDGET == 64 * 2**20
    folder = FIX / "healthy"
    ref = json.loads(CliRunner().invoke(app, ["diagnose", str(folder), "--format", "json",
                                              "--fail-on", "never"]).stdout)
    block = ref["blocks"][0]
    gen = torch.Generator().manual_seed(0)
    save_file({"hidden_states": torch.randn(1, 512, block["query_dim"], generator=gen),
               "encoder_hidden_states": torch.randn(1, 2048, block["context_dim"], generator=gen)},
              str(tmp_path / "probe.safetensors"))
    per_query = block["heads"] * 2048 * 4 * 8
    got = {}
    for mb in (1, None):
        args = ["diagnose", str(folder), "--probe", str(tmp_path / "probe.safetensors"),
                "--format", "json", "--fail-on", "never"]
        if mb:
            args += ["--config", str(write(tmp_path, f"memory_budget_mb: {mb}\n"))]
        res = CliRunner().invoke(app, args)
        assert res.exit_code == 0, res.output
        got[mb] = json.loads(res.stdout)["blocks"][0]["metrics"]
    assert got[1]["backward_queries"] == 2**20 // per_query
    assert got[None]["backward_queries"] == min(512, 64 * 2**20 // per_query)
    assert got[1]["backward_queries"] < got[None]["backward_queries"]
    assert got[1]["entropy_mean"] == pytest.approx(got[None]["entropy_mean"], abs=1e-6)
