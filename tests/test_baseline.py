"""Baselines: known findings (same rule and block, any checkpoint) are not new."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from report_factory import L3, L8, block, finding, report, sample_report

from xattn_doctor import baseline
from xattn_doctor.baseline import fingerprint, load_baseline, new_findings
from xattn_doctor.findings import Report, Severity


def write(tmp_path: Path, data: Any, name: str = "baseline.json") -> Path:
    """`data` as a JSON file."""
    path = tmp_path / name
    path.write_text(json.dumps(data), encoding="utf-8")
    return path


def with_extra(rep: Report, *extra: Any) -> Report:
    """`rep` with more findings."""
    return report(rep.checkpoint.path, blocks=rep.blocks, findings=[*rep.findings, *extra])


def test_a_report_is_its_own_baseline(tmp_path: Path) -> None:
    rep = sample_report()
    known = load_baseline(write(tmp_path, rep.to_json()))
    assert fingerprint("XD101", L3) in known and fingerprint("XD601", None) in known
    assert len(known) == len(rep.findings)
    assert new_findings(rep, known) == []


def test_checkpoint_path_is_ignored(tmp_path: Path) -> None:
    known = load_baseline(write(tmp_path, sample_report("runs/ckpt-1000/m.safetensors").to_json()))
    assert new_findings(sample_report("runs/ckpt-9000/other.safetensors"), known) == []


def test_new_code_or_new_block_is_new(tmp_path: Path) -> None:
    known = load_baseline(write(tmp_path, sample_report().to_json()))
    moved = finding("XD101", Severity.ERROR, L8, "max logit 150 exceeds 100")
    fresh = finding("XD501", Severity.ERROR, L3, "non-finite logits")
    assert new_findings(with_extra(sample_report(), moved, fresh), known) == [moved, fresh]


def test_list_of_reports(tmp_path: Path) -> None:
    second = report("b", blocks=[block(L8)],
                    findings=[finding("XD501", Severity.ERROR, L8, "nan")])
    known = load_baseline(write(tmp_path, [sample_report().to_json(), second.to_json()]))
    assert fingerprint("XD501", L8) in known
    assert load_baseline(write(tmp_path, [], "empty.json")) == set()


def test_aliases_match_current_codes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    renamed = {"XD199": "XD105", "XD105": "XD105"}
    monkeypatch.setattr(baseline, "canonical", renamed.get)
    old = report(findings=[finding("XD199", Severity.WARNING, L3, "old name")])
    known = load_baseline(write(tmp_path, old.to_json()))
    current = report(findings=[finding("XD105", Severity.WARNING, L3, "new name")])
    assert new_findings(current, known) == []


def test_codes_compare_case_insensitively_when_unknown() -> None:
    assert fingerprint("xd999", L3) == fingerprint("XD999", L3)


@pytest.mark.parametrize(("content", "match"), [
    ("{not json", r"baseline is not JSON: Expecting property name"),
    ("42", r"report 0: not an xattn-doctor JSON report \(no 'findings' list\)"),
    ('{"findings": {}}', r"report 0: not an xattn-doctor JSON report"),
    ('[{"findings": []}, {"blocks": []}]', r"report 1: not an xattn-doctor JSON report"),
    ('{"findings": [{"block": "x"}]}', r"report 0: finding 0 has no 'code' string"),
    ('{"findings": ["XD101"]}', r"finding 0 is not an object"),
    ('{"findings": [{"code": "XD101", "block": 3}]}', r"'block' that is not a string or null"),
    ('{"schema_version": 2, "findings": []}', r"unsupported schema_version 2 \(expected 1\)"),
])
def test_malformed_baseline_is_a_one_line_value_error(tmp_path: Path, content: str,
                                                      match: str) -> None:
    path = tmp_path / "bad.json"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(ValueError, match=match) as info:
        load_baseline(path)
    assert "\n" not in str(info.value) and str(info.value).startswith(str(path))


def test_missing_baseline_is_a_value_error(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"missing.json: cannot read baseline: No such file"):
        load_baseline(tmp_path / "missing.json")


def test_undecodable_baseline_is_a_value_error(tmp_path: Path) -> None:
    path = tmp_path / "bin.json"
    path.write_bytes(b"\xff\xfe\x00{")
    with pytest.raises(ValueError, match="baseline is not JSON"):
        load_baseline(path)
