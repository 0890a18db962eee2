"""GitHub annotations: exact lines, @actions/core escaping, one notice per checkpoint."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st
from report_factory import L3, block, finding, healthy_report, report, sample_report

from xattn_doctor import formats
from xattn_doctor.findings import Remedy, Report, Severity
from xattn_doctor.formats.github import escape_data, escape_property


def render(reports: list[Report]) -> list[str]:
    """The rendered lines (the output ends with one newline)."""
    text = formats.get("github").render(reports)
    assert text.endswith("\n") and not text.endswith("\n\n")
    return text[:-1].split("\n")


def unescape(text: str) -> str:
    """Inverse of the @actions/core escaping (as the runner decodes it)."""
    for code, char in (("%0D", "\r"), ("%0A", "\n"), ("%3A", ":"), ("%2C", ","), ("%25", "%")):
        text = text.replace(code, char)
    return text


def test_sample_lines_exactly() -> None:
    file = "file=runs/ckpt-1000/config.json"
    assert render([sample_report(), healthy_report()]) == [
        f"::error {file},title=XD101 gradient_explosion ({L3})::max logit 123.5 exceeds 100"
        "%0AFix: Clip gradients and normalise queries and keys.",
        f"::warning {file},title=XD201 attention_collapse ({L3})::head 7 entropy 0.3124 nats "
        "is below 0.5%0AFix: Add attention dropout.",
        f"::warning {file},title=XD402 gating (language_model.model.layers.8.cross_attn)::"
        "gate -0.985 is near saturation%0AFix: Feed real features with --probe.",
        f"::notice {file},title=XD301 feature_scale_mismatch "
        "(language_model.model.layers.8.cross_attn)::scale ratio unchecked on synthetic "
        "features%0AFix: Feed real features with --probe.",
        f"::notice {file},title=XD601 architecture::no block uses qk-norm"
        "%0AFix: Feed real features with --probe.",
        "::notice title=xattn-doctor::runs/ckpt-1000/model.safetensors: error "
        "(1 error, 2 warnings, 2 info)",
        "::notice title=xattn-doctor::runs/ckpt-2000/model.safetensors: healthy "
        "(0 errors, 0 warnings, 0 info)",
    ]


def test_escaping_in_message_title_and_path() -> None:
    odd = finding("XD101", Severity.ERROR, "blk:a,b%", "100% sure:\r\nyes, really",
                  remedy=Remedy(summary="a, b: c"))
    rep = report("ck,pt:1/m%.safetensors", blocks=[block(L3)], findings=[odd])
    assert render([rep])[0] == (
        "::error file=ck%2Cpt%3A1/m%25.safetensors,title=XD101 gradient_explosion "
        "(blk%3Aa%2Cb%25)::100%25 sure:%0D%0Ayes, really%0AFix: a, b: c")


def test_no_findings_gives_only_the_notice() -> None:
    assert render([healthy_report()]) == [
        "::notice title=xattn-doctor::runs/ckpt-2000/model.safetensors: healthy "
        "(0 errors, 0 warnings, 0 info)"]


def test_every_line_is_a_workflow_command() -> None:
    lines = render([sample_report(), healthy_report(), sample_report(config=None)])
    assert all(line.startswith(("::error ", "::warning ", "::notice ")) for line in lines)
    assert sum(line.startswith("::notice title=xattn-doctor::") for line in lines) == 3


def test_no_config_points_at_the_checkpoint() -> None:
    line = render([sample_report(config=None)])[0]
    assert line.startswith("::error file=runs/ckpt-1000/model.safetensors,title=")


@given(st.text())
def test_data_escaping_round_trips(text: str) -> None:
    escaped = escape_data(text)
    assert "\n" not in escaped and "\r" not in escaped
    assert unescape(escaped) == text


@given(st.text())
def test_property_escaping_round_trips(text: str) -> None:
    escaped = escape_property(text)
    assert not set("\r\n:,") & set(escaped)
    assert unescape(escaped) == text
