"""SARIF output: valid against the 2.1.0 schema, rules from the registry, stable fingerprints."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import jsonschema
import pytest
from report_factory import L3, L8, finding, healthy_report, report, sample_report

from xattn_doctor import formats
from xattn_doctor.findings import Severity
from xattn_doctor.formats.sarif import help_markdown, pascal
from xattn_doctor.rules import all_rules

TESTS = Path(__file__).parent
SCHEMA_PATH = TESTS / "data" / "sarif-schema-2.1.0.json"
SHARED_SCHEMA = TESTS.parent.parent / "shared" / "data" / "sarif-schema-2.1.0.json"


def render(reports: list[Any]) -> dict[str, Any]:
    """Render with the registered sarif format and parse it back."""
    out: dict[str, Any] = json.loads(formats.get("sarif").render(reports))
    return out


def results(reports: list[Any]) -> list[dict[str, Any]]:
    """The results of the single run."""
    return list(render(reports)["runs"][0]["results"])


@pytest.fixture(scope="module")
def validator() -> jsonschema.Draft4Validator:
    schema = json.loads(SCHEMA_PATH.read_text(encoding="utf-8"))
    jsonschema.Draft4Validator.check_schema(schema)
    return jsonschema.Draft4Validator(schema)


@pytest.mark.skipif(not SHARED_SCHEMA.exists(), reason="no shared/ beside the clone")
def test_vendored_schema_matches_shared_copy() -> None:
    assert SCHEMA_PATH.read_bytes() == SHARED_SCHEMA.read_bytes()


@pytest.mark.parametrize("reports", [
    pytest.param([sample_report()], id="one"),
    pytest.param([sample_report(), healthy_report()], id="two"),
    pytest.param([], id="none"),
    pytest.param([sample_report(config=None)], id="no-config"),
])
def test_output_is_valid_sarif(validator: jsonschema.Draft4Validator, reports: list[Any]) -> None:
    errors = sorted(validator.iter_errors(render(reports)), key=lambda e: list(e.path))
    assert not errors, "\n".join(f"{list(e.path)}: {e.message}" for e in errors)


def test_schema_catches_a_broken_log(validator: jsonschema.Draft4Validator) -> None:
    log = render([sample_report()])
    log["runs"][0]["results"][0]["level"] = "severe"
    del log["runs"][0]["tool"]["driver"]["name"]
    assert len(list(validator.iter_errors(log))) == 2


def test_log_header_and_driver() -> None:
    log = render([sample_report()])
    assert log["$schema"] == "https://json.schemastore.org/sarif-2.1.0.json"
    assert log["version"] == "2.1.0"
    assert len(log["runs"]) == 1
    driver = log["runs"][0]["tool"]["driver"]
    assert (driver["name"], driver["version"], driver["semanticVersion"]) == (
        "xattn-doctor", "0.1.0", "0.1.0")


def test_driver_rules_come_from_the_registry() -> None:
    rules = render([])["runs"][0]["tool"]["driver"]["rules"]
    registered = all_rules()
    assert [r["id"] for r in rules] == [r.code for r in registered]
    levels = {Severity.ERROR: "error", Severity.WARNING: "warning", Severity.INFO: "note"}
    for desc, rule in zip(rules, registered):
        assert desc["name"] == pascal(rule.slug)
        assert desc["shortDescription"]["text"] == rule.summary
        assert desc["help"]["text"] == rule.explain()
        assert desc["defaultConfiguration"]["level"] == levels[rule.severity]
        assert desc["properties"]["tags"] == [rule.symptom.value]


def test_trend_rule_descriptor() -> None:
    rules = {r["id"]: r for r in render([])["runs"][0]["tool"]["driver"]["rules"]}
    xd105 = rules["XD105"]
    assert xd105["name"] == "LogitGrowthTrend"
    assert xd105["defaultConfiguration"]["level"] == "warning"
    assert "**Why**" in xd105["help"]["markdown"]
    assert "\n    " not in xd105["help"]["markdown"]  # bodies dedented, not code blocks


def test_help_markdown_bolds_sections_and_dedents() -> None:
    text = "Summary.\n\nWhy:\n    because.\n\nFix:\n    - do this\n      and that"
    assert help_markdown(text) == (
        "Summary.\n\n**Why**\n\nbecause.\n\n**Fix**\n\n- do this\n  and that")


@pytest.mark.parametrize(("slug", "name"), [
    ("logit_growth_trend", "LogitGrowthTrend"), ("max-logit", "MaxLogit"), ("qk", "Qk")])
def test_pascal(slug: str, name: str) -> None:
    assert pascal(slug) == name


def test_one_result_per_finding_with_levels() -> None:
    res = results([sample_report(), sample_report("runs/ckpt-2000/model.safetensors")])
    assert [r["ruleId"] for r in res] == ["XD101", "XD201", "XD402", "XD301", "XD601"] * 2
    assert [r["level"] for r in res[:5]] == ["error", "warning", "warning", "note", "note"]


def test_rule_index_points_at_the_rule() -> None:
    trend = finding("XD105", Severity.WARNING, L3, "max_logit rose")
    res = results([report(findings=[trend, *sample_report().findings])])
    rules = render([])["runs"][0]["tool"]["driver"]["rules"]
    ids = [r["id"] for r in rules]
    assert res[0]["ruleIndex"] == ids.index("XD105")
    for r in res:
        assert ("ruleIndex" in r) == (r["ruleId"] in ids)
        if "ruleIndex" in r:
            assert rules[r["ruleIndex"]]["id"] == r["ruleId"]


def test_locations_point_at_config_json_and_block() -> None:
    res = results([sample_report()])
    phys = res[0]["locations"][0]["physicalLocation"]
    assert phys == {"artifactLocation": {"uri": "runs/ckpt-1000/config.json"},
                    "region": {"startLine": 1}}
    assert res[0]["locations"][0]["logicalLocations"] == [
        {"name": L3, "fullyQualifiedName": L3, "kind": "module"}]
    assert res[3]["locations"][0]["logicalLocations"][0]["name"] == L8
    assert "logicalLocations" not in res[4]["locations"][0]  # XD601 names no block


def test_location_without_config_is_the_checkpoint_relative_uri() -> None:
    rep = sample_report(path="runs\\my ckpt\\model.safetensors", config=None)
    uri = results([rep])[0]["locations"][0]["physicalLocation"]["artifactLocation"]["uri"]
    assert uri == "runs/my%20ckpt/model.safetensors"


def test_absolute_path_inside_cwd_becomes_relative(tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    inside = sample_report(path=str(tmp_path / "ck" / "m.safetensors"), config=None)
    outside = sample_report(path="/elsewhere/m.safetensors", config=None)
    uris = [results([r])[0]["locations"][0]["physicalLocation"]["artifactLocation"]["uri"]
            for r in (inside, outside)]
    assert uris == ["ck/m.safetensors", "file:///elsewhere/m.safetensors"]


def test_message_has_block_and_scalar_evidence() -> None:
    text = results([sample_report()])[0]["message"]["text"]
    assert text == f"{L3}: max logit 123.5 exceeds 100 (max_logit=123.5, threshold=100, head=7)"
    assert results([sample_report()])[4]["message"]["text"] == "no block uses qk-norm"


def test_fingerprints_are_stable_and_ignore_the_directory() -> None:
    first = results([sample_report("runs/ckpt-1000/model.safetensors")])
    again = results([sample_report("runs/ckpt-1000/model.safetensors")])
    moved = results([sample_report("other/ckpt-9/model.safetensors")])
    prints = [r["partialFingerprints"]["xattnDoctor/v1"] for r in first]
    assert prints == [r["partialFingerprints"]["xattnDoctor/v1"] for r in again]
    assert prints == [r["partialFingerprints"]["xattnDoctor/v1"] for r in moved]
    assert len(set(prints)) == len(prints)
    expected = hashlib.sha256(f"XD101\0{L3}\0model.safetensors".encode()).hexdigest()
    assert prints[0] == expected


def test_render_is_deterministic() -> None:
    sarif = formats.get("sarif")
    reports = [sample_report(), healthy_report()]
    assert sarif.render(reports) == sarif.render(reports)
