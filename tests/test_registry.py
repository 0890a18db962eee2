"""Meta-tests over the registries: a rule, a layout or a format is one well-formed file."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from xattn_doctor.findings import Severity, Symptom
from xattn_doctor.formats import get, names
from xattn_doctor.layouts import all_layouts
from xattn_doctor.rules import all_rules
from xattn_doctor.rules import get as get_rule

PKG = Path(__file__).resolve().parent.parent / "xattn_doctor"


@pytest.mark.parametrize("rule", all_rules(), ids=lambda r: r.code)
def test_rule_is_well_formed(rule) -> None:  # type: ignore[no-untyped-def]
    assert re.fullmatch(r"XD[1-6]\d\d", rule.code)
    assert rule.code[2] == str(rule.symptom.digit)
    assert isinstance(rule.symptom, Symptom) and isinstance(rule.severity, Severity)
    text = rule.explain()
    for section in ("Why:", "Fix:", "References:"):
        assert section in text, f"{rule.code} docstring lacks {section}"
    assert rule.summary and rule.remedy.summary
    assert set(rule.defaults) == set(rule.options), "every option has a default and a type"
    for name, kind in rule.options.items():
        assert isinstance(rule.defaults[name], kind)
    file = next(PKG.glob(f"rules/{rule.code.lower()}_*.py"))
    assert f"class {rule.code}(" in file.read_text(), "one rule per file, named by its code"
    if not rule.fails_build:
        assert rule.severity is Severity.INFO


def test_codes_and_aliases_are_unique() -> None:
    codes = [r.code for r in all_rules()]
    aliases = [a for r in all_rules() for a in r.aliases]
    assert len(set(codes)) == len(codes)
    assert not set(aliases) & set(codes)
    for r in all_rules():
        for a in r.aliases:
            assert get_rule(a) is r


def test_layouts_have_unique_names_and_explicit_priority() -> None:
    layouts = all_layouts()
    assert len({lay.name for lay in layouts}) == len(layouts)
    assert all(isinstance(lay.priority, int) for lay in layouts)
    assert [lay.priority for lay in layouts] == sorted((lay.priority for lay in layouts),
                                                       reverse=True)


def test_formats_render_strings() -> None:
    from report_factory_min import report_with

    for name in names():
        out = get(name).render([report_with(Severity.ERROR)], fail_on=Severity.ERROR)
        assert isinstance(out, str) and out


def test_cli_help_lists_every_format() -> None:
    from typer.testing import CliRunner

    from xattn_doctor.cli import app

    r = CliRunner().invoke(app, ["diagnose", "--help"], env={"COLUMNS": "300"})
    for name in names():
        assert name in r.stdout


def test_help_rules_and_explain_import_no_torch() -> None:
    import subprocess
    import sys

    code = ("import sys; from typer.testing import CliRunner; from xattn_doctor.cli import app; "
            "r = CliRunner(); [r.invoke(app, a) for a in (['--help'], ['rules'], "
            "['explain', 'XD101'], ['diagnose', '--help'])]; print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=PKG.parent, check=True)
    assert out.stdout.strip() == "False"
