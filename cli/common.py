"""Shared CLI helpers: consoles, one-line errors, exit codes."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, TypeVar

import typer
from rich.console import Console
from rich.text import Text
from typer.core import TyperGroup

from mesimp_compress.errors import MesimpError

try:  # Typer >= 0.20 vendors Click
    from typer._click.exceptions import NoArgsIsHelpError, UsageError
except ImportError:  # pragma: no cover - older Typer on top of Click
    from click.exceptions import UsageError

    NoArgsIsHelpError = ()  # type: ignore[assignment,misc]

# markup off: layer names, paths and messages are data ("[cls]", "exp[lr=0.1]"), never Rich
# markup; styles are given as styles
console = Console(markup=False)
err_console = Console(stderr=True, markup=False)

EXIT_USER_ERROR = 2

F = TypeVar("F", bound=Callable[..., Any])


def one_line(message: str) -> str:
    """Collapse a message to a single line."""
    return " ".join(str(message).split())


def fail(message: str, code: int = EXIT_USER_ERROR) -> typer.Exit:
    """Print ``error: message`` on stderr as one line and return the Exit to raise."""
    err_console.print(Text.assemble(("error:", "bold red"), " ", one_line(message)),
                      highlight=False, soft_wrap=True)
    return typer.Exit(code)


def handle_errors(func: F) -> F:
    """Map every MesimpError, OS error and allocation failure to one line and exit code 2."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except MesimpError as exc:
            raise fail(f"{type(exc).__name__}: {exc}") from None
        except OSError as exc:  # a missing file, no permission, a full disk, a long name, ...
            raise fail(f"{type(exc).__name__}: {exc}") from None
        except MemoryError:
            raise fail("out of memory (a batch, shape or thread count too large?)") from None
        except RuntimeError as exc:
            if "allocate" not in str(exc) and "not enough memory" not in str(exc):
                raise
            raise fail(f"out of memory (a batch or shape too large?): {exc}") from None
        except KeyboardInterrupt:
            raise fail("interrupted", code=130) from None

    return wrapper  # type: ignore[return-value]


class OneLineGroup(TyperGroup):
    """The root command: a subcommand's usage error (bad flag value, unknown option) is one
    line on stderr with exit code 2, like every other user error."""

    def invoke(self, ctx: Any) -> Any:
        try:
            return super().invoke(ctx)
        except NoArgsIsHelpError:
            raise
        except UsageError as exc:
            where = getattr(exc.ctx, "command_path", None)
            hint = f" (see '{where} --help')" if where else ""
            raise fail(f"{exc.format_message()}{hint}", code=exc.exit_code) from None
