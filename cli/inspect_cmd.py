"""`mesimp inspect DIR`: print the report a `mesimp compress` run saved."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import typer
from rich.table import Table
from rich.text import Text

from .common import console, handle_errors

HELP = """Print the report.json that `mesimp compress` wrote to DIR: status, widths per layer,
metric before/after, parity, latency per batch size, layers left alone and rollbacks.
DIR may also be the report.json file itself."""


def register(app: typer.Typer) -> None:
    app.command("inspect", help=HELP, short_help="Print the report of a compressed model folder.",
                no_args_is_help=True)(inspect)


@handle_errors
def inspect(
    directory: Path = typer.Argument(..., help="Output folder of `mesimp compress`."),
    as_json: bool = typer.Option(False, "--json", help="Print the report as JSON on stdout."),
) -> None:
    from .render import summary_table

    report = load(directory)
    if as_json:
        typer.echo(json.dumps(report, indent=2))
        return
    from mesimp_compress.errors import DataError

    try:
        tables = [_status(report, directory), *summary_table(report), *_extras(report)]
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise DataError(
            f"{directory}: report.json is malformed ({type(exc).__name__}: {exc})"
        ) from None
    for table in tables:
        console.print(table)


def load(directory: Path) -> dict[str, Any]:
    """The report of ``directory`` (or the file itself); DataError if missing or not a report."""
    from mesimp_compress.errors import DataError
    from mesimp_compress.report import REPORT_FORMAT, REPORT_VERSION, read_report

    path = directory / "report.json" if directory.is_dir() else directory
    if not path.is_file():
        where = "folder" if directory.is_dir() else "path"
        raise DataError(
            f"no report.json in {where} {str(directory)!r} (is it a `mesimp compress` output?)"
        )
    try:
        report = read_report(path)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise DataError(f"cannot read {str(path)!r}: {type(exc).__name__}: {exc}") from None
    if not isinstance(report, dict) or report.get("format") != REPORT_FORMAT:
        raise DataError(f"{str(path)!r} is not a mesimp report (expected format {REPORT_FORMAT!r})")
    if report.get("version") != REPORT_VERSION:
        raise DataError(
            f"{str(path)!r} is a report of version {report.get('version')!r}; this mesimp "
            f"reads version {REPORT_VERSION}"
        )
    return report


def _status(report: dict[str, Any], directory: Path) -> Table:
    table = Table(title=f"report {directory}", title_justify="left", show_header=False)
    table.add_column("", style="bold")
    table.add_column("")
    status = str(report.get("status"))
    table.add_row("status", Text(status, style="green" if status == "ok" else "red"))
    if report.get("error"):
        table.add_row("error", str(report["error"]))
    if report.get("created"):
        table.add_row("created", str(report["created"]))
    factory = (report.get("extra") or {}).get("factory")
    if factory:
        table.add_row("model", str(factory))
    params = report.get("params") or {}
    if params.get("before") is not None:
        ratio = params.get("ratio")
        table.add_row("parameters", f"{params['before']:,} → {params.get('after') or 0:,}"
                      + (f" (ratio {ratio:.2f}x)" if ratio else ""))
    return table


def _extras(report: dict[str, Any]) -> list[Table]:
    tables = []
    skipped = report.get("skipped") or []
    if skipped:
        table = Table(title="left alone", title_justify="left")
        table.add_column("layer")
        table.add_column("reason")
        for s in skipped:
            table.add_row(str(s["name"]), str(s["reason"]))
        tables.append(table)
    rollbacks = (report.get("extra") or {}).get("rollbacks") or []
    if rollbacks:
        table = Table(title="rollbacks (accuracy guard)", title_justify="left")
        for col in ("window", "layers", "metric", "threshold"):
            table.add_column(col, justify="left" if col == "layers" else "right")
        for r in rollbacks:
            layers = ", ".join(map(str, r["keys"]))
            table.add_row(str(r["window"]), layers, f"{r['metric']:.4f}", f"{r['threshold']:.4f}")
        tables.append(table)
    return tables
