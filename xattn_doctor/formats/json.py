"""The contract's JSON report: one object, or a list of them for several checkpoints."""

from __future__ import annotations

import json

from xattn_doctor.findings import Report, Severity
from xattn_doctor.formats import register


@register
class JsonFormat:
    """Machine-readable report (CONTRACT.md, schema_version 1)."""

    name = "json"
    summary = "the contract's JSON report (a list when several checkpoints)"
    extension = "json"

    def render(self, reports: list[Report], *, fail_on: Severity | None = Severity.ERROR,
               color: bool = False, width: int = 100) -> str:
        """One report object, or a list when there are several."""
        docs = [r.to_json() for r in reports]
        return json.dumps(docs[0] if len(docs) == 1 else docs, indent=2) + "\n"
