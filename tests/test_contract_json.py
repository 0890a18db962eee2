"""The JSON report has exactly the contract's shape (CONTRACT.md, schema_version 1)."""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema
from typer.testing import CliRunner

from xattn_doctor.cli import app

FIX = Path(__file__).resolve().parent.parent / "fixtures"
NUM = {"type": ["number", "string"]}  # non-finite floats are written as "nan"/"inf"
NULLNUM = {"type": ["number", "string", "null"]}
SCHEMA = {
    "type": "object",
    "required": ["schema_version", "tool", "checkpoint", "probe", "device", "blocks",
                 "findings", "summary"],
    "properties": {
        "schema_version": {"const": 1},
        "tool": {"type": "object", "required": ["name", "version"],
                 "properties": {"name": {"const": "xattn-doctor"}, "version": {"type": "string"}}},
        "checkpoint": {"type": "object", "required": ["path", "tensors", "bytes", "dtype", "layout"],
                       "properties": {"path": {"type": "string"}, "tensors": {"type": "integer"},
                                      "bytes": {"type": "integer"}, "dtype": {"type": "string"},
                                      "layout": {"type": "string"}}},
        "probe": {"type": "object", "required": ["source", "path"],
                  "properties": {"source": {"enum": ["file", "synthetic"]},
                                 "path": {"type": ["string", "null"]}}},
        "device": {"type": "string", "pattern": "^(cpu|cuda:[0-9]+)$"},
        "blocks": {"type": "array", "items": {
            "type": "object",
            "required": ["name", "layout", "heads", "query_dim", "context_dim", "pre_norm",
                         "qk_norm", "gated", "metrics"],
            "properties": {
                "name": {"type": "string"}, "layout": {"type": "string"},
                "heads": {"type": "integer", "minimum": 1},
                "query_dim": {"type": "integer"}, "context_dim": {"type": "integer"},
                "pre_norm": {"type": "boolean"}, "qk_norm": {"type": "boolean"},
                "gated": {"type": "boolean"},
                "metrics": {"type": "object",
                            "required": ["max_logit", "entropy_mean", "entropy_min_head",
                                         "max_attention_weight", "grad_norm", "scale_ratio", "gate"],
                            "properties": {"max_logit": NUM, "entropy_mean": NUM,
                                           "entropy_min_head": NUM, "max_attention_weight": NUM,
                                           "grad_norm": NUM, "scale_ratio": NUM, "gate": NULLNUM}}}}},
        "findings": {"type": "array", "items": {
            "type": "object",
            "required": ["code", "symptom", "severity", "block", "message", "evidence", "remedy"],
            "properties": {
                "code": {"type": "string", "pattern": "^XD[1-6][0-9]{2}$"},
                "symptom": {"enum": ["gradient_explosion", "attention_collapse",
                                     "feature_scale_mismatch", "gating", "numerics", "architecture"]},
                "severity": {"enum": ["error", "warning", "info"]},
                "block": {"type": ["string", "null"]}, "message": {"type": "string"},
                "evidence": {"type": "object"},
                "remedy": {"type": "object", "required": ["summary", "config", "references"],
                           "properties": {"summary": {"type": "string"}, "config": {"type": "object"},
                                          "references": {"type": "array",
                                                         "items": {"type": "string"}}}}}}},
        "summary": {"type": "object", "required": ["errors", "warnings", "infos", "status"],
                    "properties": {"errors": {"type": "integer"}, "warnings": {"type": "integer"},
                                   "infos": {"type": "integer"},
                                   "status": {"enum": ["healthy", "warning", "error"]}}},
    },
}


def _json(*args: str):  # type: ignore[no-untyped-def]
    r = CliRunner().invoke(app, ["diagnose", *args, "--format", "json"])
    assert r.exit_code in (0, 1), r.stderr
    return json.loads(r.stdout)


def test_report_validates_against_the_contract() -> None:
    for name in ("healthy", "logit_explosion", "nan_weight", "stack6_sharded", "saturated_gate"):
        folder = FIX / name
        doc = _json(str(folder), "--probe", str(folder / "probe.safetensors"))
        jsonschema.validate(doc, SCHEMA)
        s = doc["summary"]
        sev = [f["severity"] for f in doc["findings"]]
        assert (s["errors"], s["warnings"], s["infos"]) == (
            sev.count("error"), sev.count("warning"), sev.count("info"))


def test_code_digit_matches_symptom() -> None:
    digits = {"gradient_explosion": "1", "attention_collapse": "2", "feature_scale_mismatch": "3",
              "gating": "4", "numerics": "5", "architecture": "6"}
    doc = _json(str(FIX / "logit_explosion"))
    assert doc["findings"]
    for f in doc["findings"]:
        assert f["code"][2] == digits[f["symptom"]]


def test_synthetic_probe_is_named_and_nan_is_a_string() -> None:
    doc = _json(str(FIX / "nan_weight"))
    assert doc["probe"] == {"source": "synthetic", "path": None,
                            "synthesized": doc["probe"]["synthesized"]}
    assert doc["probe"]["synthesized"]
    assert any(f["code"] == "XD501" for f in doc["findings"])
    jsonschema.validate(doc, SCHEMA)


def test_several_checkpoints_are_a_list_in_order() -> None:
    doc = _json(str(FIX / "healthy"), str(FIX / "post_ln"))
    assert [d["checkpoint"]["path"] for d in doc] == [str(FIX / "healthy"), str(FIX / "post_ln")]
    for d in doc:
        jsonschema.validate(d, SCHEMA)
