"""`mesimp compress MODEL --data DATA --out DIR`: the whole job."""

from __future__ import annotations

import contextlib
import json
import signal
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import typer

from .common import console, err_console, fail, handle_errors

HELP = """Fine-tune MODEL under meProp, remove rarely active units, export original and compressed
models to ONNX and prove parity and speed in onnxruntime.

MODEL is `path/to/file.py:factory` or `package.module:factory` (factory() returns an nn.Module).
DATA is `path/to/file.py:function` returning (train, eval) iterables of (inputs, targets)
batches, or a built-in name (animal-mnist, animal-mnist-images, digits, turkish-upos)."""


def register(app: typer.Typer) -> None:
    app.command("compress", help=HELP, no_args_is_help=True,
                short_help="Fine-tune, prune, export and prove: the whole job.")(compress)


@handle_errors
def compress(
    model: str = typer.Argument(
        ..., help="Model factory spec: file.py:factory or package.module:factory."
    ),
    data: str = typer.Option(
        ..., "--data", help="Data spec (file.py:function) or a built-in name."
    ),
    out: Path = typer.Option(..., "--out", help="Output directory (created atomically)."),
    weights: Path | None = typer.Option(
        None, "--weights", help="state_dict to load (weights_only=True)."
    ),
    trust_pickle: bool = typer.Option(
        False,
        "--trust-pickle",
        help="Allow --weights to be a pickled module: this RUNS CODE from the file.",
    ),
    config: Path | None = typer.Option(
        None, "--config", help="Recipe TOML: any CompressConfig key (flags override it)."
    ),
    loss: str | None = typer.Option(
        None, "--loss", help="Loss spec: file.py:fn(outputs, targets) -> scalar."
    ),
    metric: str | None = typer.Option(
        None, "--metric", help="Metric spec: file.py:fn(outputs, targets) -> float or (sum, count)."
    ),
    k: str | None = typer.Option(
        None, "--k", help="meProp top-k: an int, or a fraction of each layer's width."
    ),
    mode: str | None = typer.Option(None, "--mode", help="unified | per_example."),
    prune_rate: float | None = typer.Option(
        None, "--prune-rate", help="Remove a unit with hits < prune_rate * examples."
    ),
    window: float | None = typer.Option(
        None, "--window", help="Window length as a fraction of an epoch."
    ),
    epochs: int | None = typer.Option(
        None, "--epochs", help="Epochs per pruning cycle and per normal cycle."
    ),
    epoch_batches: int | None = typer.Option(
        None, "--epoch-batches", help="Batches per epoch (default: one pass over the data)."
    ),
    cycles: int | None = typer.Option(
        None, "--cycles", help="Number of (pruning, normal) cycle pairs."
    ),
    recovery_epochs: int | None = typer.Option(
        None, "--recovery-epochs", help="Normal epochs after the last cycle."
    ),
    lr: float | None = typer.Option(None, "--lr", help="Learning rate."),
    optimizer: str | None = typer.Option(None, "--optimizer", help="adam | adamw | sgd."),
    distill: float | None = typer.Option(
        None, "--distill", help="Weight of distillation from the original (0 = off)."
    ),
    distill_layers: list[str] | None = typer.Option(
        None,
        "--distill-layers",
        help="Match these layers' outputs (patterns) to the original's (layer distillation).",
    ),
    layer_weight: float | None = typer.Option(
        None, "--layer-weight", help="Weight of the layer distillation loss."
    ),
    min_width: int | None = typer.Option(
        None, "--min-width", help="Never shrink a layer below this."
    ),
    round_to: int | None = typer.Option(
        None, "--round-to", help="Round kept widths up to a multiple (8, 16)."
    ),
    include: list[str] | None = typer.Option(
        None, "--include", help="Only these module names (patterns)."
    ),
    exclude: list[str] | None = typer.Option(
        None, "--exclude", help="Leave these module names (patterns) alone."
    ),
    device: str | None = typer.Option(None, "--device", help="cpu, cuda or cuda:N."),
    threads: int | None = typer.Option(None, "--threads", help="torch threads for fine-tuning."),
    seed: int | None = typer.Option(None, "--seed", help="Random seed."),
    batches: str | None = typer.Option(
        None, "--batches", help="Benchmark batch sizes, e.g. 1,8,64."
    ),
    max_drop: float | None = typer.Option(
        None, "--max-drop", help="Roll back a prune whose metric drops more than this."
    ),
    greater_is_better: bool | None = typer.Option(
        None,
        "--greater-is-better/--lower-is-better",
        help="Direction of the metric for --max-drop (lower: error, loss, perplexity).",
    ),
    sparse_update: bool | None = typer.Option(
        None,
        "--sparse-update/--dense-update",
        help="Row-sparse optimizer step: only rows with a gradient move (faster; lazy moments).",
    ),
    compensate: str | None = typer.Option(
        None,
        "--compensate",
        help="What the next layer reads instead of removed units: off, mean (into its bias) "
        "or linear (least-squares prediction from the kept units, into its weight and bias).",
    ),
    batch_dim: int | None = typer.Option(
        None, "--batch-dim",
        help="The inputs' dim that indexes examples: 0, or 1 for time-major (T, B, ...) inputs.",
    ),
    bench_seq: int | None = typer.Option(
        None, "--bench-seq", help="Sequence length of the latency benchmark (default: the data's)."
    ),
    quantize: bool | None = typer.Option(
        None, "--quantize/--no-quantize", help="Also time an int8 (dynamic) model."
    ),
    force: bool = typer.Option(False, "--force", help="Replace a non-empty output directory."),
    nproc: int = typer.Option(
        1,
        "--nproc",
        help="Fine-tune on N local worker processes (torchrun, DDP: gloo on CPU, nccl on CUDA).",
    ),
    resume: bool = typer.Option(
        False,
        "--resume",
        help="Continue an interrupted run from its last window checkpoint (same settings).",
    ),
    quiet: bool = typer.Option(False, "--quiet", help="No progress output."),
    as_json: bool = typer.Option(False, "--json", help="Print the report as JSON on stdout."),
) -> None:
    import os
    import subprocess
    import sys

    from mesimp_compress.api import compress as run
    from mesimp_compress.checkpoint import Checkpointer, default_dir
    from mesimp_compress.distributed import launch_command
    from mesimp_compress.errors import ConfigError

    if nproc < 1:
        raise ConfigError(f"--nproc must be >= 1, got {nproc}")
    launch = nproc > 1 and "WORLD_SIZE" not in os.environ
    if int(os.environ.get("RANK", "0")) != 0:  # other ranks of a torchrun job stay silent
        quiet, as_json = True, False
    from mesimp_compress.config import CompressConfig, read_toml
    from mesimp_compress.sources import load_data
    from mesimp_compress.spec import load_factory, load_object, load_weights

    from .render import ProgressRenderer, summary_table

    values: dict[str, Any] = read_toml(config) if config is not None else {}
    flags = {
        "k": _parse_k(k),
        "mode": mode,
        "prune_rate": prune_rate,
        "window": window,
        "epochs": epochs,
        "epoch_batches": epoch_batches,
        "cycles": cycles,
        "recovery_epochs": recovery_epochs,
        "lr": lr,
        "optimizer": optimizer,
        "distill": distill,
        "distill_layers": distill_layers or None,
        "layer_weight": layer_weight,
        "min_width": min_width,
        "round_to": round_to,
        "include": include or None,
        "exclude": exclude or None,
        "device": device,
        "threads": threads,
        "seed": seed,
        "batches": batches,
        "max_drop": max_drop,
        "greater_is_better": greater_is_better,
        "quantize": quantize,
        "sparse_update": sparse_update,
        "compensate": compensate,
        "bench_seq": bench_seq,
        "batch_dim": batch_dim,
    }
    if config is not None:  # the recipe alone first: a bad flag is then the flag's fault
        CompressConfig.from_dict(values, source=str(config))
    values.update({key: v for key, v in flags.items() if v is not None})
    cfg = CompressConfig.from_dict(values, source="flags")
    if launch:  # settings checked here, so a bad one is one line, not one per worker
        from mesimp_compress.api import check_launch

        check_launch(cfg, out, force=force)
        argv = _without_nproc(sys.argv[1:])
        run = subprocess.run(launch_command(nproc, argv), stderr=subprocess.PIPE, text=True,
                             errors="replace")
        sys.stderr.write(_workers_stderr(run.returncode, run.stderr))
        raise typer.Exit(run.returncode if run.returncode in (0, 130) else 2)

    net = load_factory(model)
    if weights is not None:
        net = load_weights(net, weights, trust_pickle=trust_pickle)
    train, eval_data = load_data(data)
    loss_fn = load_object(loss, what="loss") if loss else None
    metric_fn = load_object(metric, what="metric") if metric else None

    renderer = ProgressRenderer(err_console if as_json else console, quiet=quiet or as_json)
    try:
        with _ctrl_c_honoured(renderer) as sink:
            result = run(
                net,
                train,
                eval_data,
                config=cfg,
                loss=loss_fn,
                metric=metric_fn,
                out=out,
                force=force,
                sink=sink,
                factory=model,
                resume=resume,
            )
    except KeyboardInterrupt:
        if not Checkpointer(default_dir(out)).exists():
            raise fail("interrupted before the first window finished: there is no checkpoint; "
                       "rerun the same command to start again", code=130) from None
        raise fail(
            "interrupted: the checkpoint of the last finished window is kept; "
            "rerun the same command with --resume to continue",
            code=130,
        ) from None
    finally:
        renderer.close()
    report = result.report or {}
    if as_json:
        typer.echo(json.dumps(report, indent=2))
    elif not quiet:
        for table in summary_table(report):
            console.print(table)
        console.print(f"wrote {result.out}")
    if report.get("status") == "failed":
        raise typer.Exit(1)


def _workers_stderr(code: int, text: str) -> str:
    """What of the workers' stderr to show: each rank prints a user error as one line, and
    torchrun adds its banner and a traceback of its own; a failed run shows that one line
    once (a worker's crash without one: the end of what they printed)."""
    lines = [line for line in text.splitlines()
             if not line.startswith(("*****", "Setting OMP_NUM_THREADS"))]
    if code == 0:
        return "".join(f"{line}\n" for line in lines)
    errors = [line for line in lines if line.startswith("error: ")]
    if errors:
        return errors[0] + "\n"
    return "".join(f"{line}\n" for line in lines[-20:])


def _without_nproc(argv: list[str]) -> list[str]:
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "--nproc":
            skip = True
        elif not arg.startswith("--nproc="):
            out.append(arg)
    return out


def _parse_k(text: str | None) -> int | float | str | None:
    if text is None:
        return None
    try:
        return int(text)
    except ValueError:
        pass
    try:
        return float(text)
    except ValueError:
        return text  # CompressConfig rejects it with a KError naming the value


@contextlib.contextmanager
def _ctrl_c_honoured(renderer: Any) -> Iterator[Any]:
    """The renderer as the run's sink, raising KeyboardInterrupt at the next event once
    Ctrl-C was pressed: an interrupt that a library below swallowed (one landing in a lazy
    import turns into that module's next error, which a fallback may take for an ordinary
    failure) still ends the run, with exit 130."""
    pressed: list[int] = []
    if threading.current_thread() is not threading.main_thread():
        yield renderer
        return

    def on_sigint(signum: int, frame: Any) -> None:
        pressed.append(signum)
        raise KeyboardInterrupt

    def sink(event: Any) -> None:
        if pressed:
            pressed.clear()
            raise KeyboardInterrupt
        renderer(event)

    previous = signal.signal(signal.SIGINT, on_sigint)
    try:
        yield sink
    finally:
        signal.signal(signal.SIGINT, previous)
