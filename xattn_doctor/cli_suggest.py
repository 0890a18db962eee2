"""`xattn-doctor suggest-config`: the training config to run next. Imports no torch itself;
with --from-report nothing imports it (the diagnosis and simulation are imported lazily)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from xattn_doctor.cli import OutputOpt, app, error_boundary
from xattn_doctor.errors import DoctorError, UsageError

FORMATS = ("yaml", "json")


def _check_format(value: str) -> str:
    if value not in FORMATS:
        raise typer.BadParameter(f"{value!r} is not one of {', '.join(FORMATS)}")
    return value


@app.command("suggest-config")
def suggest_config(
    checkpoint: Annotated[Optional[Path], typer.Argument(
        help="safetensors file, *.index.json or directory: diagnosed, then fixes simulated")]
    = None,
    from_report: Annotated[Optional[Path], typer.Option(
        "--from-report", help="a `diagnose --format json` report instead of a checkpoint "
                              "(a list: the last one is used); no simulation")] = None,
    total_steps: Annotated[Optional[int], typer.Option(
        min=1, help="training steps: warmup becomes 10% of them")] = None,
    fmt: Annotated[str, typer.Option("--format", "-f", help="yaml (with comments) | json",
                                     callback=_check_format)] = "yaml",
    output: OutputOpt = None,
    probe: Annotated[Optional[Path], typer.Option(help="probe batch (.safetensors)")] = None,
    device: Annotated[Optional[str], typer.Option(help="auto | cpu | cuda | cuda:N")] = None,
    dtype: Annotated[Optional[str], typer.Option(
        help="auto | float32 | bfloat16 | float16")] = None,
    heads: Annotated[Optional[int], typer.Option(min=1, help="head count override")] = None,
    config: Annotated[Optional[Path], typer.Option(help="thresholds YAML")] = None,
    seed: Annotated[Optional[int], typer.Option(
        help="seed of the synthetic probe and proxy loss")] = None,
) -> None:
    """Write the stabilised training config a diagnosis calls for (YAML with reasons, or JSON)."""
    with error_boundary():
        run = {"probe": probe, "device": device, "dtype": dtype, "heads": heads,
               "config": config, "seed": seed}
        suggestion = _suggest(checkpoint, from_report, total_steps, run)
        _write(suggestion.render(fmt), output, suggestion.data)


def _suggest(checkpoint: Path | None, from_report: Path | None, total_steps: int | None,
             run: dict[str, Any]) -> Any:
    from xattn_doctor.suggest import build

    if (checkpoint is None) == (from_report is None):
        raise UsageError(None, "give either a CHECKPOINT or --from-report REPORT.json (one of them)")
    if from_report is not None:
        given = [f"--{k}" for k, v in run.items() if v is not None]
        if given:
            raise UsageError(from_report, f"{', '.join(given)} need(s) a CHECKPOINT; a report "
                                          "is used as it was diagnosed")
        from xattn_doctor.report_file import load_report

        report, notes = load_report(from_report)
        return build(report, None, total_steps, notes)
    assert checkpoint is not None
    report_obj, sims = _diagnose(checkpoint, run)
    return build(report_obj.to_json(), [s.to_json() for s in sims], total_steps)


def _diagnose(checkpoint: Path, run: dict[str, Any]) -> tuple[Any, list[Any]]:
    from xattn_doctor import options
    from xattn_doctor.simulate import diagnose_and_simulate

    raw, where = options.load_config(run["config"])
    flags = {k: run[k] for k in ("heads", "device", "dtype", "seed")}
    opts = options.build(raw, where, **flags)
    return diagnose_and_simulate(checkpoint, run["probe"], opts)


def _write(text: str, output: Path | None, data: dict[str, Any]) -> None:
    """To stdout, or to --output (only now, after success) with a one-line summary."""
    if output is None:
        typer.echo(text, nl=False)
        return
    try:
        output.write_text(text, encoding="utf-8")
    except OSError as e:
        raise DoctorError(output, f"cannot write config: {e.strerror or e}") from e
    typer.echo(f"xattn-doctor: suggested config written to {output} "
               f"({len(data['changes'])} change(s), {len(data['code_changes'])} code change(s), "
               f"{len(data['simulations'])} simulation(s))")
