"""The `mesimp` command: parses, calls the library, renders with Rich.

Each command lives in its own module with a ``register(app)`` function.
"""

from __future__ import annotations

import importlib

import typer

from mesimp_compress import __version__

from .common import OneLineGroup

app = typer.Typer(
    name="mesimp",
    cls=OneLineGroup,
    help="Compress trained PyTorch models with meSimp: meProp fine-tuning, unit removal, "
    "ONNX proof.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)

COMMAND_MODULES = ("train_cmd", "compress_cmd", "export_cmd", "bench_cmd", "inspect_cmd",
                   "native_cmd")


def _version(value: bool) -> None:
    if value:
        typer.echo(f"mesimp {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(
        False, "--version", callback=_version, is_eager=True, help="Show the version and exit."
    ),
) -> None:
    """Compress trained PyTorch models with meSimp."""


for _name in COMMAND_MODULES:
    try:
        _module = importlib.import_module(f"{__package__}.{_name}")
    except ModuleNotFoundError as _exc:  # a command module not written yet
        if _exc.name != f"{__package__}.{_name}":
            raise
        continue
    _module.register(app)


def main() -> None:
    """Console-script entry point."""
    app()
