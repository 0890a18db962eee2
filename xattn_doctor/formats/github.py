"""GitHub Actions workflow commands: one annotation per finding, one notice per checkpoint.

Escaping follows @actions/core (`command.ts`): in data `%`, CR and LF; in property values
also `:` and `,`. Every line is a workflow command, so nothing else can be misparsed.
"""

from __future__ import annotations

from xattn_doctor.findings import Finding, Report, Severity
from xattn_doctor.formats import register
from xattn_doctor.formats._common import artifact_path, counts_text

COMMANDS = {Severity.ERROR: "error", Severity.WARNING: "warning", Severity.INFO: "notice"}


@register
class GitHubRenderer:
    """GitHub Actions annotations (`::error file=...::message`)."""

    name = "github"
    summary = "GitHub Actions annotations, one per finding"
    extension = "txt"

    def render(self, reports: list[Report], *, fail_on: Severity | None = Severity.ERROR,
               color: bool = False, width: int = 100) -> str:
        """Workflow command lines; `fail_on`, `color` and `width` do not apply."""
        lines: list[str] = []
        for report in reports:
            path = artifact_path(report)
            lines += [annotation(f, path) for f in report.findings]
            lines.append(command("notice", {"title": "xattn-doctor"},
                                 f"{report.checkpoint.path}: {report.status} "
                                 f"({counts_text(report)})"))
        return "".join(line + "\n" for line in lines)


def annotation(finding: Finding, path: str) -> str:
    """The workflow command for one finding, pointing at `path`."""
    title = f"{finding.code} {finding.symptom.value}"
    if finding.block:
        title += f" ({finding.block})"
    message = f"{finding.message}\nFix: {finding.remedy.summary}"
    return command(COMMANDS[finding.severity], {"file": path, "title": title}, message)


def command(name: str, properties: dict[str, str], message: str) -> str:
    """`::name k=v,k=v::message`, escaped as @actions/core does."""
    props = ",".join(f"{k}={escape_property(v)}" for k, v in properties.items())
    return f"::{name}{' ' + props if props else ''}::{escape_data(message)}"


def escape_data(text: str) -> str:
    """Escape a command's message."""
    return text.replace("%", "%25").replace("\r", "%0D").replace("\n", "%0A")


def escape_property(text: str) -> str:
    """Escape a command property value."""
    return escape_data(text).replace(":", "%3A").replace(",", "%2C")
