"""A real checkpoint series: logits grow at each step while each stays under the threshold."""

from __future__ import annotations

import json
from pathlib import Path

from typer.testing import CliRunner

from xattn_doctor.cli import app

SERIES = Path(__file__).resolve().parent.parent / "fixtures" / "trend"


def test_logit_growth_is_caught_before_any_checkpoint_crosses() -> None:
    paths = [str(SERIES / f"ckpt-{s}") for s in (1000, 2000, 3000)]
    probe = str(SERIES / "ckpt-1000" / "probe.safetensors")
    r = CliRunner().invoke(app, ["diagnose", *paths, "--probe", probe, "-f", "json",
                                 "--fail-on", "never"])
    assert r.exit_code == 0, r.stderr
    reports = json.loads(r.stdout)
    logits = [next(b for b in rep["blocks"] if b["name"] == "layers.1")["metrics"]["max_logit"]
              for rep in reports]
    assert logits == sorted(logits) and max(logits) < 50
    assert not [f for rep in reports for f in rep["findings"] if f["code"] == "XD101"]
    trend = [f for f in reports[-1]["findings"] if f["code"] == "XD105"]
    assert [f["block"] for f in trend] == ["layers.1"]
    step = trend[0]["evidence"]["projected_step"]
    assert 3000 < step < 6000  # a straight line through ~19, 27, 35 reaches 50 near step 5000
    text = CliRunner().invoke(app, ["diagnose", *paths, "--probe", probe, "--fail-on", "never"])
    assert "Trends across checkpoints" in text.stdout and "XD105" in text.stdout
