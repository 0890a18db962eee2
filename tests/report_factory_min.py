"""A minimal Report with one finding of a given severity (for exit-code tests)."""

from __future__ import annotations

from xattn_doctor.findings import (
    CheckpointInfo,
    Finding,
    ProbeInfo,
    Remedy,
    Report,
    Severity,
    Symptom,
)


def report_with(severity: Severity) -> Report:
    """One checkpoint, no blocks, one finding at `severity`."""
    f = Finding("XD101", Symptom.GRADIENT_EXPLOSION, severity, "b", "m", {}, Remedy("r"))
    return Report("0", CheckpointInfo("p", 0, 0, "float32", "x"), ProbeInfo("synthetic", None),
                  "cpu", "float32", [], [f])
