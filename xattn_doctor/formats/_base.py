"""The renderer interface: a format turns reports into one string; only the CLI writes it."""

from __future__ import annotations

from typing import Protocol

from xattn_doctor.findings import Report, Severity


class Renderer(Protocol):
    """One output format, registered by name (the value of `--format`)."""

    name: str
    summary: str  # one line for --help
    extension: str  # file extension for --output suggestions, without the dot

    def render(self, reports: list[Report], *, fail_on: Severity | None = Severity.ERROR,
               color: bool = False, width: int = 100) -> str:
        """All `reports` as one document. `fail_on` None means never fail (`--fail-on never`)."""
        ...
