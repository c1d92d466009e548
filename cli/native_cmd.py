"""`mesimp build-native`: compile the meProp backward of nn.Linear for this torch."""

from __future__ import annotations

import os

import typer

from .common import console, handle_errors

HELP = """Compile the meProp backward of nn.Linear (unified top-k, CPU float32/float64) for
this torch and Python, once (about 30 s; needs a C++ compiler and ninja) into
$MESIMP_CACHE (default ~/.cache/mesimp_compress). Every later process uses it: the MLP's
meProp backward runs about 1.25x faster. Without it the
same gradients come from the Python path. `make` runs this while setting up."""


def register(app: typer.Typer) -> None:
    app.command("build-native", help=HELP,
                short_help="Compile the meProp backward of nn.Linear (optional, once).")(
        build_native)


@handle_errors
def build_native(
    check: bool = typer.Option(False, "--check",
                               help="Only say whether it is built; exit 1 if not."),
) -> None:
    from mesimp_compress.meprop import native

    if check:
        found = native.module()
        if found is not None:
            typer.echo(f"built: {found.__file__}")
        elif native.turned_off():
            exists = "a build exists" if native.is_built() else "not built"
            typer.echo(f"turned off by MESIMP_NATIVE={os.environ['MESIMP_NATIVE']} ({exists})")
        else:
            typer.echo(f"not built (it would go to {native.build_dir()})")
        raise typer.Exit(0 if found is not None else 1)
    with console.status("compiling the meProp backward (once per torch version)..."):
        path = native.build()
    typer.echo(f"built: {path}")
