"""The shipped fixtures: still what the script makes, and diagnosed as intended."""

from __future__ import annotations

from pathlib import Path

import make_fixtures
import pytest

from xattn_doctor.api import diagnose
from xattn_doctor.findings import Severity

FIXTURES = Path(make_fixtures.__file__).parent


def test_fixtures_match_their_generator(tmp_path: Path) -> None:
    written = make_fixtures.write_all(tmp_path)
    assert written
    for new in written:
        rel = new.relative_to(tmp_path)
        assert (FIXTURES / rel).read_bytes() == new.read_bytes(), f"{rel} is stale: run " \
            "python fixtures/make_fixtures.py"
    total = sum(p.stat().st_size for p in FIXTURES.rglob("*") if p.is_file())
    assert total < 2 * 2**20


def _report(name: str):  # type: ignore[no-untyped-def]
    folder = FIXTURES / name
    return diagnose([folder], probe=folder / "probe.safetensors")[0]


@pytest.mark.parametrize("name", sorted(make_fixtures.EXPECTED))
def test_fixture_gives_intended_findings(name: str) -> None:
    report = _report(name)
    got = {(f.code, f.block, f.severity.value) for f in report.findings
           if f.severity is not Severity.INFO}
    for expected in make_fixtures.EXPECTED[name]:
        assert expected in got, f"{name}: expected {expected}, got {sorted(got)}"
    sick = {b for _, b, _ in make_fixtures.EXPECTED[name]}
    stray = {g for g in got if g[1] not in sick}
    assert not stray, f"{name}: findings on blocks that are healthy: {stray}"


@pytest.mark.parametrize("name", sorted(make_fixtures.EXPECTED_INFO))
def test_fixture_gives_intended_infos(name: str) -> None:
    report = _report(name)
    got = {(f.code, f.block) for f in report.findings}
    for expected in make_fixtures.EXPECTED_INFO[name]:
        assert expected in got, f"{name}: expected {expected}, got {sorted(got)}"


def test_healthy_is_healthy() -> None:
    report = _report("healthy")
    assert report.status == "healthy"
    assert [b.name for b in report.blocks] == ["layers.0", "layers.1"]
    assert all(b.heads == 4 and b.gated and b.pre_norm for b in report.blocks)


def test_stack_finds_every_cross_block_and_no_self_attention() -> None:
    report = _report("stack6")
    assert [b.name for b in report.blocks] == [f"decoder.layers.{i}" for i in range(6)]
    assert {s["name"] for s in report.skipped} == {f"decoder.layers.{i}.self_attn"
                                                    for i in range(6)}
    assert all(b.qk_norm and b.heads_source == "weights" for b in report.blocks)


def test_sharded_copy_gives_the_same_metrics() -> None:
    a, b = _report("stack6"), _report("stack6_sharded")
    for x, y in zip(a.blocks, b.blocks):
        assert x.metrics.to_json() == y.metrics.to_json()


def test_every_per_block_rule_is_exercised_by_a_fixture() -> None:
    from xattn_doctor.rules import all_rules

    covered = {c for v in make_fixtures.EXPECTED.values() for c, _, _ in v}
    covered |= {c for v in make_fixtures.EXPECTED_INFO.values() for c, _ in v}
    other_tests = {"XD202", "XD603", "XD105", "XD106", "XD205", "XD405"}  # test_rules/test_trend
    missing = {r.code for r in all_rules()} - covered - other_tests
    assert not missing, f"rules without a fixture: {sorted(missing)}"
