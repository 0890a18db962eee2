"""Read a JSON report written by `diagnose --format json` (one report, or a list of them)."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from xattn_doctor.errors import DoctorError

MAX_REPORT = 256 * 1024 * 1024
SEVERITIES = ("info", "warning", "error")


class ReportError(DoctorError):
    """The --from-report file is missing, not JSON, or not a diagnose report."""


def load_report(path: Path) -> tuple[dict[str, Any], list[str]]:
    """The report to suggest from, and notes on the choice (the last of a list is used)."""
    data = _read(path)
    notes: list[str] = []
    if isinstance(data, list):
        if not data:
            raise ReportError(path, "the report list is empty")
        for i, item in enumerate(data):
            _check(path, item, f"report [{i}]")
        if len(data) > 1:
            notes.append(f"{path.name} holds {len(data)} reports; used the last, "
                         f"{data[-1]['checkpoint'].get('path')} (the latest checkpoint of the "
                         "trend), not a merge")
        return data[-1], notes
    _check(path, data, "report")
    return data, notes


def _read(path: Path) -> Any:
    try:
        if not path.is_file():
            raise ReportError(path, "no such report file")
        if path.stat().st_size > MAX_REPORT:
            raise ReportError(path, f"report larger than {MAX_REPORT // 2**20} MiB")
        return json.loads(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise ReportError(path, f"cannot read report: {e.strerror or e}") from e
    except UnicodeDecodeError as e:
        raise ReportError(path, f"report is not UTF-8 text: {e}") from e
    except json.JSONDecodeError as e:
        raise ReportError(path, f"not valid JSON (line {e.lineno}, column {e.colno}: {e.msg}); "
                                "write it with `xattn-doctor diagnose --format json`") from e


def _check(path: Path, doc: Any, where: str) -> None:
    """Enough of the contract's report shape for suggest-config to rely on."""
    if not isinstance(doc, Mapping):
        raise ReportError(path, f"{where} is not a JSON object")
    if doc.get("schema_version") != 1:
        raise ReportError(path, f"{where}: schema_version {doc.get('schema_version')!r} is not 1 "
                                "(not a diagnose --format json report?)")
    for key, kind in (("checkpoint", Mapping), ("blocks", list), ("findings", list)):
        if not isinstance(doc.get(key), kind):
            raise ReportError(path, f"{where}: `{key}` is missing or not a "
                                    f"{'list' if kind is list else 'mapping'}")
    for i, b in enumerate(doc["blocks"]):
        if not isinstance(b, Mapping) or not isinstance(b.get("name"), str) \
                or not isinstance(b.get("metrics"), Mapping):
            raise ReportError(path, f"{where}: blocks[{i}] needs a `name` and a `metrics` object")
    for i, f in enumerate(doc["findings"]):
        _check_finding(path, f, f"{where}: findings[{i}]")
    thresholds = doc.get("thresholds", {})
    if not isinstance(thresholds, Mapping) or not all(isinstance(v, Mapping)
                                                      for v in thresholds.values()):
        raise ReportError(path, f"{where}: `thresholds` must map rule codes to objects")


def _check_finding(path: Path, f: Any, where: str) -> None:
    if not isinstance(f, Mapping):
        raise ReportError(path, f"{where} is not an object")
    if not isinstance(f.get("code"), str) or f.get("severity") not in SEVERITIES:
        raise ReportError(path, f"{where} needs a `code` and a `severity` (info, warning, error)")
    if f.get("block") is not None and not isinstance(f["block"], str):
        raise ReportError(path, f"{where}: `block` must be a string or null")
    for key in ("evidence", "remedy"):
        if not isinstance(f.get(key, {}), Mapping):
            raise ReportError(path, f"{where}: `{key}` must be an object")
    if not isinstance(f.get("remedy", {}).get("config", {}), Mapping):
        raise ReportError(path, f"{where}: `remedy.config` must be an object")
