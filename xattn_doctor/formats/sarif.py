"""SARIF 2.1.0 for code scanning: one run holding every checkpoint's findings.

Built from plain dicts and `json.dumps`, as ansible-lint does. Several checkpoints share one
run: they come from one invocation of one tool, and GitHub code scanning refuses several runs
of the same tool and category in one upload; each result names its checkpoint in its location
and properties instead.
"""

from __future__ import annotations

import hashlib
import json
import re
import textwrap
from importlib.metadata import PackageNotFoundError, metadata
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import quote

from xattn_doctor import __version__
from xattn_doctor.findings import Finding, Report, Severity
from xattn_doctor.formats import register
from xattn_doctor.formats._common import artifact_path, evidence_text, rule_code
from xattn_doctor.rules import Rule, all_rules

SCHEMA = "https://json.schemastore.org/sarif-2.1.0.json"
FINGERPRINT_KEY = "xattnDoctor/v1"
LEVELS = {Severity.ERROR: "error", Severity.WARNING: "warning", Severity.INFO: "note"}
_SEMVER = re.compile(r"^\d+\.\d+\.\d+(?:-[0-9A-Za-z.-]+)?(?:\+[0-9A-Za-z.-]+)?$")
_HEADING = re.compile(r"^(Why|Fix|References|Examples?|Bad|Good|Notes?):?\s*$")


@register
class SarifRenderer:
    """SARIF 2.1.0 (GitHub code scanning, Azure DevOps, IDE viewers)."""

    name = "sarif"
    summary = "SARIF 2.1.0 for code scanning uploads"
    extension = "sarif"

    def render(self, reports: list[Report], *, fail_on: Severity | None = Severity.ERROR,
               color: bool = False, width: int = 100) -> str:
        """One SARIF log with one run; `fail_on`, `color` and `width` do not apply."""
        rules = all_rules()
        index = {r.code: i for i, r in enumerate(rules)}
        results = [_result(r, f, index) for r in reports for f in r.findings]
        version = reports[0].tool_version if reports else __version__
        run = {"tool": {"driver": _driver(version, rules)}, "results": results}
        log = {"$schema": SCHEMA, "version": "2.1.0", "runs": [run]}
        return json.dumps(log, indent=2, ensure_ascii=False) + "\n"


def _driver(version: str, rules: list[Rule]) -> dict[str, Any]:
    driver: dict[str, Any] = {"name": "xattn-doctor", "version": version}
    if _SEMVER.match(version):
        driver["semanticVersion"] = version
    home = _homepage()
    if home:
        driver["informationUri"] = home
    driver["rules"] = [_rule(r) for r in rules]
    return driver


def _homepage() -> str | None:
    """The project URL from the installed package's metadata, if it declares one."""
    try:
        urls = metadata("xattn-doctor").get_all("Project-URL") or []
    except PackageNotFoundError:
        return None
    for entry in map(str, urls):
        label, _, url = entry.partition(",")
        if label.strip().lower() in {"homepage", "repository", "source"} and url.strip():
            return url.strip()
    return None


def _rule(rule: Rule) -> dict[str, Any]:
    text = rule.explain()
    out: dict[str, Any] = {
        "id": rule.code,
        "name": pascal(rule.slug),
        "shortDescription": {"text": rule.summary},
        "fullDescription": {"text": text},
        "help": {"text": text, "markdown": help_markdown(text)},
        "defaultConfiguration": {"level": LEVELS[rule.severity]},
        "properties": {"tags": [rule.symptom.value]},
    }
    if rule.aliases:
        out["deprecatedIds"] = list(rule.aliases)
    return out


def pascal(slug: str) -> str:
    """'logit_growth_trend' or 'logit-growth-trend' -> 'LogitGrowthTrend'."""
    return "".join(w[:1].upper() + w[1:] for w in re.split(r"[-_\s]+", slug) if w)


def help_markdown(text: str) -> str:
    """The explain text as Markdown: section names in bold, section bodies dedented."""
    parts: list[str] = []
    body: list[str] = []
    for line in text.splitlines():
        match = _HEADING.match(line)
        if match is None:
            body.append(line)
            continue
        parts.append(textwrap.dedent("\n".join(body)).strip("\n"))
        parts.append(f"**{match.group(1)}**")
        body = []
    parts.append(textwrap.dedent("\n".join(body)).strip("\n"))
    return "\n\n".join(p for p in parts if p)


def _result(report: Report, finding: Finding, index: dict[str, int]) -> dict[str, Any]:
    code = rule_code(finding.code)
    out: dict[str, Any] = {"ruleId": code}
    if code in index:
        out["ruleIndex"] = index[code]
    out["level"] = LEVELS[finding.severity]
    out["message"] = {"text": message_text(finding)}
    out["locations"] = [_location(report, finding)]
    out["partialFingerprints"] = {FINGERPRINT_KEY: fingerprint(code, finding.block, report)}
    out["properties"] = {"symptom": finding.symptom.value, "checkpoint": report.checkpoint.path,
                         "evidence": finding.to_json()["evidence"]}
    return out


def message_text(finding: Finding) -> str:
    """The finding's message with its block and scalar evidence."""
    scalars = {k: v for k, v in finding.evidence.items() if not isinstance(v, (list, tuple, dict))}
    text = f"{finding.block}: {finding.message}" if finding.block else finding.message
    return f"{text} ({evidence_text(scalars)})" if scalars else text


def _location(report: Report, finding: Finding) -> dict[str, Any]:
    out: dict[str, Any] = {"physicalLocation": {
        "artifactLocation": {"uri": artifact_uri(artifact_path(report))},
        "region": {"startLine": 1},
    }}
    if finding.block:
        out["logicalLocations"] = [{"name": finding.block,
                                    "fullyQualifiedName": finding.block, "kind": "module"}]
    return out


def artifact_uri(path: str) -> str:
    """A relative path as a percent-encoded relative URI; an absolute one as a file: URI."""
    if Path(path).is_absolute():
        return Path(path).as_uri()
    return quote(path, safe="/")


def fingerprint(code: str, block: str | None, report: Report) -> str:
    """sha256 of code, block and checkpoint file name: stable across runs and directories."""
    name = PurePosixPath(report.checkpoint.path.replace("\\", "/")).name
    return hashlib.sha256(f"{code}\0{block or ''}\0{name}".encode()).hexdigest()
