"""`mesimp export MODEL --out FILE.onnx`: one model to ONNX, checked and compared with PyTorch."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import typer
from rich.table import Table

from .common import console, handle_errors

HELP = """Export MODEL to one ONNX file with dynamic batch (and sequence) axes, run the ONNX
checker, and compare onnxruntime's outputs with PyTorch's.

MODEL is `path/to/file.py:factory` or `package.module:factory`. Example inputs come from
--input-shape (one per forward argument, e.g. `2,784` or `int64:2,128`) or from the first
eval batch of --data. With --compressed DIR the plan.json + weights.pt that `mesimp compress`
wrote are replayed on the factory's model first."""

DTYPES = {
    "float32": "float32",
    "float": "float32",
    "float16": "float16",
    "float64": "float64",
    "int64": "int64",
    "long": "int64",
    "int32": "int32",
    "int": "int64",
    "bool": "bool",
}


def register(app: typer.Typer) -> None:
    app.command("export", help=HELP, short_help="Export a model to ONNX, checked against PyTorch.",
                no_args_is_help=True)(export)


@handle_errors
def export(
    model: str = typer.Argument(
        ..., help="Model factory spec: file.py:factory or package.module:factory."
    ),
    out: Path = typer.Option(..., "--out", help="The .onnx file to write."),
    input_shape: list[str] | None = typer.Option(
        None, "--input-shape", help="Example input shape, [dtype:]d0,d1,...; repeat per input."
    ),
    data: str | None = typer.Option(
        None, "--data", help="Data spec or built-in name: example inputs from its first eval batch."
    ),
    weights: Path | None = typer.Option(
        None, "--weights", help="state_dict to load (weights_only=True)."
    ),
    trust_pickle: bool = typer.Option(
        False,
        "--trust-pickle",
        help="Allow --weights to be a pickled module: this RUNS CODE from the file.",
    ),
    compressed: Path | None = typer.Option(
        None, "--compressed", help="Folder with plan.json + weights.pt from `mesimp compress`."
    ),
    axes: list[str] | None = typer.Option(
        None, "--axes", help="Dynamic axes of one input, e.g. 0=batch,1=seq; repeat per input."
    ),
    batch_dim: int | None = typer.Option(
        None, "--batch-dim",
        help="The inputs' dim that indexes examples: 0, or 1 for time-major (T, B, ...) inputs "
        "(default: the --compressed run's setting, else 0).",
    ),
    opset: int | None = typer.Option(None, "--opset", help="ONNX opset (default: the exporter's)."),
    exporter: str = typer.Option(
        "auto", "--exporter", help="auto (dynamo, TorchScript fallback) | dynamo | torchscript."
    ),
    verify: bool = typer.Option(
        True, "--verify/--no-verify", help="Compare onnxruntime with PyTorch."
    ),
    atol: float = typer.Option(1e-4, "--atol", help="Parity: absolute tolerance."),
    rtol: float = typer.Option(1e-3, "--rtol", help="Parity: relative tolerance."),
    force: bool = typer.Option(False, "--force", help="Replace an existing file."),
    as_json: bool = typer.Option(False, "--json", help="Print the result as JSON on stdout."),
) -> None:
    import torch

    from mesimp_compress.config import check_opset
    from mesimp_compress.errors import ConfigError, OutputError, OutputExistsError
    from mesimp_compress.export import default_dynamic_axes, export_onnx, resize_inputs
    from mesimp_compress.spec import load_factory, load_weights
    from mesimp_compress.verify import check_parity

    if out.is_dir() or (out.exists() and not force):
        raise OutputExistsError(f"{out} exists (use --force to replace a file)")
    if any(p.exists() and not p.is_dir() for p in out.parents):
        raise OutputError(f"cannot write {out}: a parent of it is a file")
    if opset is not None:
        check_opset(opset)
    if bool(input_shape) == bool(data):
        raise ConfigError("give example inputs with either --input-shape or --data (one of them)")
    net = load_factory(model)
    if weights is not None:
        net = load_weights(net, weights, trust_pickle=trust_pickle)
    if compressed is not None:
        from mesimp_compress.surgery import load_compressed

        net = load_compressed(net, compressed)
    net = net.cpu().eval()
    torch.manual_seed(0)
    inputs = _inputs_from_data(data, net) if data else tuple(_tensor(s) for s in input_shape or [])
    batch_dim = _batch_dim(batch_dim, compressed)
    dynamic = [_parse_axes(a) for a in axes] if axes else None
    if dynamic is None and batch_dim:
        dynamic = default_dynamic_axes(inputs, batch_dim)
    # written beside the target under a hidden name; it takes the target's name only once
    # verified, so a failed export or parity check leaves nothing behind
    staged = out.with_name(f".{out.name}.partial-{os.getpid()}")
    try:
        result = export_onnx(net, inputs, staged, opset=opset, exporter=exporter,
                             dynamic_axes=dynamic)
        parity = None
        if verify:
            batches = [
                inputs,
                resize_inputs(inputs, 1, axes=dynamic),
                resize_inputs(inputs, 5, axes=dynamic),
            ]
            parity = check_parity(
                result.path,
                net,
                batches,
                atol=atol,
                rtol=rtol,
                label=out.name,
                input_names=result.input_names,
            )
        os.replace(staged, out)
        result.path = out
    finally:
        staged.unlink(missing_ok=True)
    payload: dict[str, Any] = {
        "export": result.to_dict(),
        "parity": parity.to_dict() if parity else None,
    }
    if as_json:
        typer.echo(json.dumps(payload, indent=2))
        return
    console.print(_table(payload))


def _inputs_from_data(spec: str, net: Any) -> tuple[Any, ...]:
    from mesimp_compress.batches import KeywordBatches, first_batch
    from mesimp_compress.inputs import forward_order
    from mesimp_compress.sources import load_data

    _, eval_data = load_data(spec)
    batches = KeywordBatches(eval_data, forward_order(net), "eval data")  # dicts by name
    inputs, _ = first_batch(batches, where="eval data")
    return tuple(x.cpu() for x in inputs)


def _batch_dim(given: int | None, compressed: Path | None) -> int:
    """--batch-dim, else the setting of the run that wrote ``compressed``, else 0."""
    from mesimp_compress.errors import ConfigError

    if given is None and compressed is not None:
        try:
            config = json.loads((compressed / "report.json").read_text(encoding="utf-8"))["config"]
            given = int(config.get("batch_dim", 0))
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            given = 0  # no report (plan.json + weights.pt alone): batch first
    given = 0 if given is None else given
    if given not in (0, 1):
        raise ConfigError(f"--batch-dim must be 0 or 1, got {given}")
    return given


def _tensor(text: str) -> Any:
    import torch

    from mesimp_compress.errors import ConfigError
    from mesimp_compress.inputs import check_bytes

    dtype_name, _, dims = text.rpartition(":")
    dtype_name = dtype_name.strip().lower() or "float32"
    if dtype_name not in DTYPES:
        raise ConfigError(
            f"unknown dtype {dtype_name!r} in --input-shape {text!r}; "
            f"valid: {', '.join(sorted(DTYPES))}"
        )
    try:
        shape = [int(d) for d in dims.split(",") if d.strip()]
    except ValueError:
        raise ConfigError(
            f"--input-shape {text!r} is not [dtype:]d0,d1,... with integer dims"
        ) from None
    if not shape or any(d < 1 for d in shape):
        raise ConfigError(f"--input-shape {text!r} needs positive dims")
    dtype = getattr(torch, DTYPES[dtype_name])
    check_bytes(math.prod(shape) * dtype.itemsize, f"--input-shape {text}")
    if dtype.is_floating_point:
        return torch.randn(shape).to(dtype)
    if dtype == torch.bool:
        return torch.ones(shape, dtype=torch.bool)
    return torch.ones(shape, dtype=dtype)  # 1: a valid token id and mask value


def _parse_axes(text: str) -> dict[int, str]:
    from mesimp_compress.errors import ConfigError

    out: dict[int, str] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        dim, sep, name = part.partition("=")
        if not sep or not dim.strip().isdigit() or not name.strip():
            raise ConfigError(f"--axes {text!r}: expected dim=name pairs like 0=batch,1=seq")
        out[int(dim)] = name.strip()
    return out


def _table(payload: dict[str, Any]) -> Table:
    e = payload["export"]
    table = Table(title=f"exported {e['path']}", title_justify="left", show_header=False)
    table.add_column("", style="bold")
    table.add_column("")
    exporter = e["exporter"] + (
        f" (fallback: {e['fallback_reason']})" if e["fallback_reason"] else ""
    )
    table.add_row("exporter", exporter)
    table.add_row("opset", str(e["opset"]))
    table.add_row(
        "inputs", ", ".join(f"{n} {e['dynamic_axes'].get(n, {})}" for n in e["input_names"])
    )
    table.add_row("outputs", ", ".join(e["output_names"]))
    table.add_row("initializers", f"{e['initializers']} ({e['initializer_elements']:,} elements)")
    table.add_row("file size", f"{e['file_bytes'] / 1e6:.3f} MB")
    p = payload["parity"]
    if p:
        for o in p["outputs"]:
            table.add_row(
                f"parity {o['name']}",
                f"max abs {o['max_abs']:.3g}, max rel {o['max_rel']:.3g} "
                f"({'ok' if o['passed'] else 'FAIL'})",
            )
    return table
