"""JUnit output: a suite per checkpoint, a case per block and symptom, failures by --fail-on."""

from __future__ import annotations

import xml.etree.ElementTree as ET

import pytest
from report_factory import L3, L8, block, finding, healthy_report, report, sample_report

from xattn_doctor import formats
from xattn_doctor.findings import Report, Severity, Symptom

CKPT = "runs/ckpt-1000/model.safetensors"


def parse(reports: list[Report], fail_on: Severity | None = Severity.ERROR) -> ET.Element:
    """Render and parse back."""
    return ET.fromstring(formats.get("junit").render(reports, fail_on=fail_on))


def case(root: ET.Element, name: str) -> ET.Element:
    """The single testcase called `name`."""
    found = [c for c in root.iter("testcase") if c.get("name") == name]
    assert len(found) == 1, name
    return found[0]


def failed(root: ET.Element) -> list[str]:
    """Names of the failing testcases."""
    return [c.get("name", "") for c in root.iter("testcase") if c.find("failure") is not None]


def test_declaration_and_structure() -> None:
    text = formats.get("junit").render([sample_report(), healthy_report()])
    assert text.startswith('<?xml version="1.0" encoding="UTF-8"?>\n<testsuites')
    root = ET.fromstring(text)
    suites = root.findall("testsuite")
    assert [s.get("name") for s in suites] == [CKPT, "runs/ckpt-2000/model.safetensors"]
    # 2 blocks x 6 symptoms, plus a checkpoint row for the block-less XD601
    assert [s.get("tests") for s in suites] == [str(3 * len(Symptom)), str(2 * len(Symptom))]
    first = suites[0].findall("testcase")
    assert first[0].get("classname") == CKPT
    assert first[0].get("name") == f"{L3} :: gradient_explosion"
    assert first[-1].get("name") == f"(checkpoint) :: {list(Symptom)[-1]}"


@pytest.mark.parametrize(("fail_on", "expected"), [
    (Severity.ERROR, [f"{L3} :: gradient_explosion"]),
    (Severity.WARNING, [f"{L3} :: gradient_explosion", f"{L3} :: attention_collapse",
                        f"{L8} :: gating"]),
    (Severity.INFO, [f"{L3} :: gradient_explosion", f"{L3} :: attention_collapse",
                     f"{L8} :: feature_scale_mismatch", f"{L8} :: gating",
                     "(checkpoint) :: architecture"]),
    (None, []),
])
def test_failures_follow_fail_on(fail_on: Severity | None, expected: list[str]) -> None:
    root = parse([sample_report(), healthy_report()], fail_on)
    assert failed(root) == expected
    suite = root.find("testsuite")
    assert suite is not None and suite.get("failures") == str(len(expected))


def test_totals_are_sums_of_suites() -> None:
    root = parse([sample_report(), healthy_report()], Severity.WARNING)
    suites = root.findall("testsuite")
    for key in ("tests", "failures", "errors", "skipped"):
        assert root.get(key) == str(sum(int(s.get(key, "")) for s in suites)), key
    assert (root.get("tests"), root.get("failures"), root.get("errors")) == (str(5 * len(Symptom)), "3", "0")


def test_failure_message_and_text() -> None:
    fail = case(parse([sample_report()]), f"{L3} :: gradient_explosion").find("failure")
    assert fail is not None
    assert fail.get("message") == "XD101 max logit 123.5 exceeds 100"
    assert fail.get("type") == "error"
    assert fail.text == ("XD101 [error] max logit 123.5 exceeds 100\n"
                         "evidence: max_logit=123.5, threshold=100, head=7\n"
                         "remedy: Clip gradients and normalise queries and keys.")


def test_lower_findings_go_to_system_out() -> None:
    gating = case(parse([sample_report()]), f"{L8} :: gating")
    assert gating.find("failure") is None
    out = gating.find("system-out")
    assert out is not None and out.text is not None
    assert out.text.startswith("XD402 [warning] gate -0.985 is near saturation")
    clean = case(parse([sample_report()]), f"{L8} :: numerics")
    assert list(clean) == []


def test_several_failing_findings_share_one_failure() -> None:
    findings = [finding("XD102", Severity.WARNING, L3, "grad norm 300"),
                finding("XD101", Severity.ERROR, L3, "max logit 200")]
    rep = report(blocks=[block(L3)], findings=findings)
    fail = case(parse([rep], Severity.WARNING), f"{L3} :: gradient_explosion").findall("failure")
    assert len(fail) == 1
    assert fail[0].get("message") == "XD101 max logit 200 (+1 more)"
    assert fail[0].text is not None and "XD102 [warning] grad norm 300" in fail[0].text


def test_finding_on_unmeasured_block_gets_cases() -> None:
    rep = report(blocks=[block(L3)], findings=[finding("XD501", Severity.ERROR, "vision.x", "nan")])
    root = parse([rep])
    assert failed(root) == ["vision.x :: numerics"]
    assert root.get("tests") == str(2 * len(Symptom))


def test_skipped_blocks_are_skipped_cases() -> None:
    rep = report(blocks=[block(L3)], skipped=[{"name": "perceiver.latents", "reason": "no probe"}])
    root = parse([rep])
    skipped = case(root, "perceiver.latents :: skipped").find("skipped")
    assert skipped is not None and skipped.get("message") == "no probe"
    assert (root.get("tests"), root.get("skipped")) == (str(len(Symptom) + 1), "1")


def test_characters_xml_cannot_carry_are_dropped() -> None:
    bad = finding("XD501", Severity.ERROR, L3, "nan\x00 in <logits> & \x1b[31mred")
    root = parse([report(blocks=[block(L3)], findings=[bad])])
    fail = case(root, f"{L3} :: numerics").find("failure")
    assert fail is not None and fail.get("message") == "XD501 nan in <logits> & [31mred"
