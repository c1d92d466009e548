"""One exception hierarchy for everything the library raises on purpose.

The CLI maps every :class:`MesimpError` to a one-line message and exit code 2, so each
message must say what was expected and what was found, in one line.
"""

from __future__ import annotations


class MesimpError(Exception):
    """Root of every error raised on purpose by mesimp_compress."""


# what user code (a model, its factory, data, loss or metric) may raise that we report as
# its failure: any Exception, and sys.exit() (the library never exits on a user's behalf)
USER_FAILURES: tuple[type[BaseException], ...] = (Exception, SystemExit)


def interrupted(exc: BaseException) -> bool:
    """Whether a Ctrl-C lies in the chain of ``exc``: an interrupt that lands in a lazy import
    (torch imports its exporters on first use) surfaces as the error the half-imported module
    raises next, which must not pass for an ordinary failure."""
    stack, seen = [exc], set()
    while stack:
        item = stack.pop()
        if item is None or id(item) in seen:
            continue
        if isinstance(item, KeyboardInterrupt):
            return True
        seen.add(id(item))
        stack += [item.__cause__, item.__context__]
    return False


def describe(exc: BaseException) -> str:
    """``Type: first line of the message``: how a foreign error (the user's code, torch,
    a file reader) is quoted inside one of ours."""
    if isinstance(exc, SystemExit):
        return f"SystemExit (sys.exit({exc.code!r}) was called)"
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0].strip() if lines else ''}"


class ConfigError(MesimpError, ValueError):
    """A setting is out of range, of the wrong type, or unknown."""


class KError(ConfigError):
    """A meProp k is not a positive int or a fraction in (0, 1]."""


class SpecError(MesimpError):
    """A `file.py:name` / `package.module:name` spec cannot be resolved or misbehaves."""


class DataError(MesimpError):
    """Data is empty, malformed, or does not fit the model."""


class ShapeError(DataError):
    """A tensor shape does not match what was expected."""


class UnsupportedStructureError(MesimpError):
    """The model contains structure that cannot be compressed safely; names the module."""


class PlanError(MesimpError):
    """A pruning plan is invalid for the model it is applied to."""


class CheckpointError(MesimpError):
    """A checkpoint or state_dict does not fit the model or cannot be read."""


class NonFiniteLossError(MesimpError):
    """The training loss became NaN or inf."""


class ExportError(MesimpError):
    """ONNX export or the ONNX checker failed."""


class ParityError(MesimpError):
    """onnxruntime outputs disagree with PyTorch beyond tolerance; ``where`` names the batch
    of the worst difference ("" when not known)."""

    where: str = ""


class SizeError(MesimpError):
    """An exported model did not shrink as the plan says it should."""


class OutputError(MesimpError):
    """The output directory cannot be written where it was asked for."""


class OutputExistsError(OutputError):
    """The output directory exists and is not empty (use force to overwrite)."""


class BuildError(MesimpError):
    """The compiled meProp backward could not be built (no compiler or ninja, or it failed)."""
