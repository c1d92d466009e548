"""`mesimp bench A.onnx B.onnx ...`: interleaved onnxruntime latency, speedups over the first."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import typer
from rich.table import Table

from .common import console, err_console, handle_errors

HELP = """Time ONNX models in onnxruntime with the same session options and inputs, interleaved
after warm-up, and print median and p90 per call and the speedup of each model over the
first (median ratio, with the p10..p90 range of per-round ratios).

Inputs are synthesised from the first model's input signature: its symbolic batch axis
takes each --batch size, a symbolic sequence axis --seq; all models must take the same inputs."""


def register(app: typer.Typer) -> None:
    app.command("bench", help=HELP, short_help="Time ONNX models side by side in onnxruntime.",
                no_args_is_help=True)(bench)


@handle_errors
def bench(
    models: list[Path] = typer.Argument(..., help="ONNX files; the first is the baseline."),
    batch: str = typer.Option("1,8,64", "--batch", help="Batch sizes, comma-separated."),
    threads: str | None = typer.Option(
        None,
        "--threads",
        help="Intra-op thread counts, comma-separated (default: 1 and all cores).",
    ),
    seq: int = typer.Option(128, "--seq", help="Sequence length for inputs with a sequence axis."),
    size: list[str] = typer.Option(
        [], "--size", help="NAME=N: the size of another symbolic axis (e.g. input0_dim2=28); "
        "repeat for several."
    ),
    warmup: int = typer.Option(10, "--warmup", help="Warm-up calls per model and setting."),
    rounds: int = typer.Option(30, "--rounds", help="Interleaved rounds."),
    block: int = typer.Option(10, "--block", help="Consecutive calls per model in a round."),
    max_seconds: float | None = typer.Option(
        None, "--max-seconds", help="Stop a setting's rounds after this long (at least 3 rounds)."
    ),
    as_json: bool = typer.Option(False, "--json", help="Print the results as JSON on stdout."),
) -> None:
    from mesimp_compress.errors import ConfigError, ShapeError
    from mesimp_compress.inputs import BATCH, check_room
    from mesimp_compress.latency import (
        benchmark,
        check_settings,
        inputs_from_onnx,
        signature_of,
    )
    from mesimp_compress.report import machine, versions

    if len(models) < 2:
        raise ConfigError("bench needs at least two ONNX files (the first is the baseline)")
    for path in models:
        if path.is_dir():
            raise IsADirectoryError(f"{str(path)!r} is a folder, not an ONNX file")
        if not path.is_file():
            raise FileNotFoundError(f"ONNX file {str(path)!r} does not exist")
    batches = _ints(batch, "--batch")
    thread_counts = _ints(threads, "--threads") if threads else sorted({1, os.cpu_count() or 1})
    first = signature_of(models[0])
    for path in models[1:]:
        other = signature_of(path)
        if _fixed(other) != _fixed(first):
            raise ShapeError(
                f"{path.name} takes inputs {_sig(other)}, but {models[0].name} takes {_sig(first)}"
            )
    check_settings(batches=batches, threads=thread_counts, rounds=rounds, block=block,
                   warmup=warmup, max_seconds=max_seconds, seq=seq)
    inputs, axes, names = inputs_from_onnx(models[0], batch=2, seq=seq, sizes=_sizes(size))
    if not any(BATCH in a.values() for a in axes) and batches != [_leading(inputs)]:
        raise ConfigError(
            f"{models[0].name} has no batch axis to resize (inputs {_sig(first)}); "
            f"time it at the size it was exported with: --batch {_leading(inputs)}"
        )
    check_room(inputs, axes, max(batches), seq)  # before the "timing" line, not after it
    labels = _labels(models)
    if not as_json:
        err_console.print(
            f"timing {', '.join(labels)}: batch {batches}, threads {thread_counts}", style="dim"
        )
    result = benchmark(
        dict(zip(labels, models, strict=True)),
        inputs,
        batches=batches,
        seq=seq if any("seq" in a.values() for a in axes) else None,
        threads=thread_counts,
        warmup=warmup,
        rounds=rounds,
        block=block,
        max_seconds=max_seconds,
        axes=axes,
        input_names=names,
    )
    payload: dict[str, Any] = result.to_dict()
    payload["files"] = {label: str(p) for label, p in zip(labels, models, strict=True)}
    payload["versions"] = versions()
    payload["machine"] = machine(thread_counts)
    if as_json:
        typer.echo(json.dumps(payload, indent=2))
        return
    console.print(_table(payload))


def _ints(text: str, flag: str) -> list[int]:
    from mesimp_compress.errors import ConfigError

    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ConfigError(f"{flag} {text!r} is not a comma-separated list of ints") from None
    if not values or any(v < 1 for v in values):
        raise ConfigError(f"{flag} {text!r} needs positive ints")
    return values


def _labels(paths: list[Path]) -> list[str]:
    labels: list[str] = []
    for i, p in enumerate(paths):
        label = p.stem
        labels.append(label if label not in labels else f"{label}_{i}")
    return labels


def _fixed(signature: list[tuple[str, int, list[Any]]]) -> list[tuple[Any, ...]]:
    """Names, types and dims, with every symbolic dim alike (files name them differently)."""
    return [(n, t, tuple(d if isinstance(d, int) else "?" for d in dims))
            for n, t, dims in signature]


def _leading(inputs: tuple[Any, ...]) -> int:
    return int(inputs[0].shape[0]) if inputs and inputs[0].dim() else 1


def _sig(signature: list[tuple[str, int, list[Any]]]) -> str:
    return "(" + ", ".join(f"{n}: {d}" for n, _, d in signature) + ")"


def _table(payload: dict[str, Any]) -> Table:
    labels = payload["models"]
    table = Table(title="onnxruntime latency, ms per call (median / p90)", title_justify="left")
    for col in ("threads", "batch", *labels, *(f"{label} speedup" for label in labels[1:])):
        table.add_column(col, justify="right")
    for row in payload["rows"]:
        cells = [str(row["threads"]), str(row["batch"])]
        cells += [
            f"{row[f'{label}_median_ms']:.3f} / {row[f'{label}_p90_ms']:.3f}" for label in labels
        ]
        cells += [
            f"{row[f'{label}_speedup']:.2f}x "
            f"[{row[f'{label}_speedup_low']:.2f}-{row[f'{label}_speedup_high']:.2f}]"
            for label in labels[1:]
        ]
        table.add_row(*cells)
    return table


def _sizes(given: list[str]) -> dict[str, int]:
    """``--size NAME=N`` options as a mapping; ConfigError for a malformed one."""
    from mesimp_compress.errors import ConfigError

    sizes = {}
    for item in given:
        name, _, value = item.partition("=")
        if not name or not value.strip().isdigit() or int(value) < 1:
            raise ConfigError(f"--size takes NAME=N with N >= 1, got {item!r}")
        sizes[name.strip()] = int(value)
    return sizes
