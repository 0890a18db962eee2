"""The command line: options in, api call, render, write, exit code. Imports no torch itself."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from typer.core import TyperGroup

from xattn_doctor import __version__
from xattn_doctor.errors import DoctorError
from xattn_doctor.findings import Report, Severity

# click's ClickException, wherever this typer takes click from (its own copy since 0.22)
_ClickException: Any = next(c for c in typer.BadParameter.__mro__
                            if c.__name__ == "ClickException")


@contextmanager
def _one_line_usage_errors() -> Iterator[None]:
    """Bad arguments (unknown option, invalid value) as one stderr line and exit 2, instead
    of click's usage block and error panel (CONTRACT.md: one clear line)."""
    try:
        yield
    except _ClickException as e:
        if type(e).__name__ == "NoArgsIsHelpError":  # help was printed; keep click's way
            raise
        ctx = getattr(e, "ctx", None)
        hint = f" (see `{ctx.command_path} --help`)" if ctx is not None else ""
        typer.echo(f"xattn-doctor: error: {' '.join(e.format_message().split())}{hint}",
                   err=True)
        raise typer.Exit(2) from None


class _Group(TyperGroup):
    """The root command group, with usage errors reported as one line."""

    def make_context(self, *args: Any, **kwargs: Any) -> Any:
        with _one_line_usage_errors():
            return super().make_context(*args, **kwargs)

    def invoke(self, ctx: Any) -> Any:
        with _one_line_usage_errors():
            return super().invoke(ctx)


app = typer.Typer(cls=_Group, pretty_exceptions_enable=False, add_completion=False,
                  help="Diagnose unstable cross-attention blocks in a checkpoint.",
                  no_args_is_help=True)


def _check_format(value: str) -> str:
    from xattn_doctor.formats import names

    if value not in names():
        raise typer.BadParameter(f"{value!r} is not one of {', '.join(names())}")
    return value


def _format_help() -> str:
    from xattn_doctor.formats import get, names

    return "Report format: " + "; ".join(f"{n} ({get(n).summary})" for n in names())


FormatOpt = Annotated[str, typer.Option("--format", "-f", help=_format_help(),
                                        callback=_check_format)]
OutputOpt = Annotated[Optional[Path], typer.Option("--output", "-o", help="Write the report "
                      "here (after a successful diagnosis); the terminal gets a one-line summary.")]


@contextmanager
def error_boundary() -> Iterator[None]:
    """Turn input errors (and anything unexpected) into one stderr line and exit code 2."""
    debug = os.environ.get("XATTN_DOCTOR_DEBUG") == "1"
    try:
        yield
    except (typer.Exit, typer.Abort):
        raise
    except DoctorError as e:
        if debug:
            raise
        typer.echo(f"xattn-doctor: error: {e}", err=True)
        raise typer.Exit(2) from None
    except Exception as e:
        if debug:
            raise
        detail = " ".join(str(e).split()) or type(e).__name__
        typer.echo(f"xattn-doctor: internal error: {type(e).__name__}: {detail} "
                   "(set XATTN_DOCTOR_DEBUG=1 for the traceback)", err=True)
        raise typer.Exit(2) from None


def exit_code(reports: list[Report], fail_on: Severity | None) -> int:
    """1 when any finding is at or above `fail_on` (None: never), else 0."""
    if fail_on is None:
        return 0
    return int(any(f.severity.rank >= fail_on.rank for r in reports for f in r.findings))


def _version(value: bool) -> None:
    if value:
        typer.echo(f"xattn-doctor {__version__}")
        raise typer.Exit(0)


@app.callback()
def _root(version: Annotated[bool, typer.Option("--version", callback=_version,
                                                is_eager=True, help="Print the version.")]
          = False) -> None:
    """Diagnose unstable cross-attention blocks in a checkpoint."""


@app.command()
def diagnose(
    checkpoints: Annotated[list[Path], typer.Argument(help="safetensors file, *.index.json, "
                                                      "or a directory; several for a trend")],
    probe: Annotated[Optional[Path], typer.Option(help="probe batch (.safetensors)")] = None,
    device: Annotated[str, typer.Option(help="auto | cpu | cuda | cuda:N")] = "auto",
    dtype: Annotated[str, typer.Option(help="auto | float32 | bfloat16 | float16")] = "auto",
    heads: Annotated[Optional[int], typer.Option(min=1, help="head count override")] = None,
    fmt: FormatOpt = "text",
    output: OutputOpt = None,
    fail_on: Annotated[Optional[str], typer.Option(help="error | warning | never "
                                                   "(default: config, else error)")] = None,
    config: Annotated[Optional[Path], typer.Option(help="thresholds YAML")] = None,
    seed: Annotated[int, typer.Option(help="seed of the synthetic probe and proxy loss")] = 0,
    baseline: Annotated[Optional[Path], typer.Option(help="earlier JSON report: fail only on "
                                                     "findings it does not have")] = None,
    model: Annotated[Optional[str], typer.Option(help="model mode: auto (the class config.json "
                     "names) or MODULE:CALLABLE; runs the live model on --batch")] = None,
    batch: Annotated[Optional[Path], typer.Option(help="model mode: .safetensors of the "
                     "forward's keyword arguments")] = None,
) -> None:
    """Diagnose the cross-attention blocks of one or more checkpoints."""
    with error_boundary():
        from xattn_doctor import api, options
        from xattn_doctor.formats import get

        _refuse_overwriting_inputs(output, checkpoints, probe, config)
        raw, where = options.load_config(config)
        opts = options.build(raw, where, fail_on=fail_on, heads=heads, device=device,
                             dtype=dtype, seed=seed)
        known = _baseline(baseline)
        if model is not None or batch is not None:
            reports = [_model_mode(checkpoints, probe, model, batch, opts, output)]
        else:
            with progress_bar(fmt, output) as tick:
                reports = api.diagnose(checkpoints, probe=probe, options=opts, progress=tick)
        text = get(fmt).render(reports, fail_on=opts.fail_on, color=_color(output, fmt))
        _emit(text, output, reports)
        judged = reports if known is None else _only_new(reports, known)
    raise typer.Exit(exit_code(judged, opts.fail_on))


def _model_mode(checkpoints: list[Path], probe: Path | None, model: str | None,
                batch: Path | None, opts: Any, output: Path | None) -> Report:
    """Model mode's argument checks, then the run (live/model_mode.py)."""
    if model is None or batch is None:
        raise DoctorError(None, "model mode needs both --model and --batch")
    if probe is not None or len(checkpoints) != 1:
        raise DoctorError(None, "model mode takes one checkpoint and no --probe (the batch is "
                                "the model's input)")
    _refuse_overwriting_inputs(output, [batch], None, None)
    from xattn_doctor.live.model_mode import diagnose_model

    return diagnose_model(checkpoints[0], model, batch, opts)


def _baseline(path: Path | None) -> set[tuple[str, str | None]] | None:
    if path is None:
        return None
    from xattn_doctor.baseline import load_baseline

    try:
        return load_baseline(path)
    except ValueError as e:
        raise DoctorError(None, str(e)) from e


def _only_new(reports: list[Report], known: set[tuple[str, str | None]]) -> list[Report]:
    """Copies of the reports that keep only findings the baseline does not have."""
    from dataclasses import replace

    from xattn_doctor.baseline import new_findings

    fresh = [replace(r, findings=new_findings(r, known)) for r in reports]
    old = sum(len(r.findings) for r in reports) - sum(len(r.findings) for r in fresh)
    typer.echo(f"xattn-doctor: baseline: {old} known finding(s) do not count toward "
               "the exit code", err=True)
    return fresh


def _refuse_overwriting_inputs(output: Path | None, checkpoints: list[Path],
                               probe: Path | None, config: Path | None) -> None:
    """Inputs are only ever read: an --output that is one of the files the diagnosis reads
    (checkpoint, its shards, index and config.json, the probe, the config) is refused."""
    if output is None or not output.exists():
        return
    inputs = [p for p in (probe, config if config is not None else Path("pyproject.toml"))
              if p is not None]
    for c in checkpoints:
        inputs.append(c)
        folder = c if c.is_dir() else c.parent
        with suppress(OSError):
            inputs += [q for q in folder.iterdir() if q.name == "config.json"
                       or q.name.endswith((".safetensors", ".index.json"))]
    for p in inputs:
        try:
            same = os.path.samefile(output, p)
        except OSError:
            continue
        if same:
            raise DoctorError(output, f"--output would overwrite an input ({p}); inputs are "
                                      "only ever read, write the report elsewhere")


def _color(output: Path | None, fmt: str) -> bool:
    return output is None and fmt == "text" and sys.stdout.isatty() and "NO_COLOR" not in os.environ


@contextmanager
def progress_bar(fmt: str, output: Path | None) -> Iterator[Callable[[str, int, int], None] | None]:
    """A rich progress bar on stderr when it is a terminal and the report is for people."""
    if not sys.stderr.isatty() or fmt not in ("text", "markdown"):
        yield None
        return
    from rich.console import Console
    from rich.progress import Progress

    with Progress(console=Console(stderr=True), transient=True) as bar:
        task = bar.add_task("diagnosing", total=None)

        def tick(name: str, index: int, total: int) -> None:
            bar.update(task, total=total, completed=index, description=f"block {name}")

        yield tick


def _emit(text: str, output: Path | None, reports: list[Report]) -> None:
    """Write the report to --output (then a one-line summary to stdout), or to stdout."""
    if output is None:
        sys.stdout.write(text)
        return
    try:
        output.write_text(text, encoding="utf-8")
    except OSError as e:
        raise DoctorError(output, f"cannot write report: {e.strerror or e}") from e
    errors = sum(r.counts()[Severity.ERROR] for r in reports)
    warnings = sum(r.counts()[Severity.WARNING] for r in reports)
    worst = max((r.status for r in reports), key=("healthy", "warning", "error").index)
    typer.echo(f"xattn-doctor: {worst}: {len(reports)} checkpoint(s), {errors} error(s), "
               f"{warnings} warning(s); report written to {output}")


@app.command()
def rules() -> None:
    """List every rule: code, symptom, default severity, thresholds, summary."""
    with error_boundary():
        from xattn_doctor.rules import all_rules

        for r in all_rules():
            typer.echo(f"{r.code}  {r.symptom.value:22} {r.severity.value:7}  "
                       f"{r.summary}  [{r.threshold_text()}]")


@app.command()
def explain(code: Annotated[str, typer.Argument(help="rule code, e.g. XD101")]) -> None:
    """Explain a rule: the symptom, why it happens, the fix with its config, references."""
    with error_boundary():
        import yaml

        from xattn_doctor.rules import get

        try:
            rule = get(code)
        except KeyError:
            raise DoctorError(None, f"unknown rule code {code!r}; `xattn-doctor rules` lists "
                                    "them") from None
        typer.echo(f"{rule.code} {rule.slug} ({rule.symptom.value}, {rule.severity.value})")
        typer.echo(rule.explain())
        if rule.defaults:
            typer.echo("\nThresholds (defaults): " + rule.threshold_text())
        typer.echo(f"\nRemedy: {rule.remedy.summary}")
        if rule.remedy.config:
            typer.echo("Config:\n" + yaml.safe_dump(rule.remedy.config, sort_keys=False).rstrip())
        if rule.remedy.code_change:
            typer.echo("Code change:\n" + rule.remedy.code_change)
        if rule.references:
            typer.echo("References:\n" + "\n".join(f"  - {x}" for x in rule.references))


def main() -> None:
    """Console entry point."""
    app()


from xattn_doctor import cli_suggest  # noqa: F401  (registers the suggest-config command)
