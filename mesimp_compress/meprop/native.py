"""The compiled meProp backward of nn.Linear: build it once, then every unified-mode
MePropLinear on CPU in float32/float64 uses it.

Its backward is one autograd node without Python (see ``native.cpp``): the same top-k,
gathers and small matmuls as the Python Function, minus the interpreter's per-node cost,
which is about a quarter of a small MLP's whole meProp backward. Everything else (other
devices and dtypes, autocast, ``per_example``, ``sparse_bias``, synchronised selection,
tracing) runs the Python Function, which stays the reference.

The build needs a C++ compiler and ninja (``pip install ninja``) and takes about half a
minute; ``mesimp build-native`` or :func:`build` does it, ``make`` does it while setting up.
It is cached per torch version, Python version and source under
``$MESIMP_CACHE`` (default ``~/.cache/mesimp_compress``). Nothing is compiled implicitly: a
process that finds no finished build (or a damaged one) runs the Python path.
``MESIMP_NATIVE=0`` (or false, off, no) turns the compiled path off.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.machinery
import importlib.util
import json
import logging
import os
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import torch

from ..errors import BuildError, describe

NAME = "mesimp_native"
STAMP = "build.json"  # size and sha256 of the file a finished build wrote
SOURCE = Path(__file__).with_name("native.cpp")
CFLAGS = ["-O3"]

_STATE: dict[str, object] = {"module": None, "looked": False, "off": False}
_RAN: set[str] = set()  # which meProp Linear backward ran since reset_ran(): compiled, python


def ran(path: str) -> None:
    """Note that a meProp Linear forward took ``path`` ("compiled" or "python")."""
    _RAN.add(path)


def reset_ran() -> None:
    """Forget which paths ran (a run starts)."""
    _RAN.clear()


def which_ran() -> str:
    """"compiled", "python", "compiled and python" (some layers each) or "none" (no meProp
    Linear trained) since :func:`reset_ran`: results differ between them in float rounding."""
    return " and ".join(sorted(_RAN)) or "none"


def build_dir() -> Path:
    """Where the build for this torch, this Python and this source lives."""
    root = os.environ.get("MESIMP_CACHE") or Path.home() / ".cache" / "mesimp_compress"
    digest = hashlib.sha256(SOURCE.read_bytes() + " ".join(CFLAGS).encode()).hexdigest()[:12]
    tag = f"torch{torch.__version__}-py{sys.version_info[0]}{sys.version_info[1]}-{digest}"
    return Path(root) / "native" / tag.replace("+", "_")


def build() -> Path:
    """Compile the extension for this torch (a no-op when it is built) and return its file.

    Raises :class:`BuildError` when the compiler or ninja is missing or the build fails."""
    from torch.utils import cpp_extension

    where = build_dir()
    path = os.environ.get("PATH", "")
    # torch runs `ninja` from PATH: let it find the one pip put beside this interpreter
    os.environ["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), path])
    logger = logging.getLogger("torch.utils.cpp_extension")  # its compiler warnings: ours
    level = logger.level  # to report, not to print
    logger.setLevel(logging.ERROR + 1)
    try:
        where.mkdir(parents=True, exist_ok=True)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            module = cpp_extension.load(NAME, [str(SOURCE)], extra_cflags=CFLAGS,
                                        build_directory=str(where), verbose=False)
        built_file = Path(module.__file__)
        (where / STAMP).write_text(json.dumps(_fingerprint(built_file)))
    except (OSError, RuntimeError, ImportError) as exc:  # no compiler/ninja, failed build
        raise BuildError(f"could not build the compiled meProp backward in {where}: "
                         f"{_cause(exc)}") from exc
    finally:
        os.environ["PATH"] = path
        logger.setLevel(level)
    _STATE.update(module=module, looked=True)
    return built_file


def _cause(exc: BaseException) -> str:
    """The line of a failed build that says why (torch's message starts with the command)."""
    for line in str(exc).splitlines():
        low = line.lower()
        if any(word in low for word in ("not found", "error:", "no such file", "is required",
                                        "permission denied")):
            return line.strip()
    return describe(exc)


def _fingerprint(path: Path) -> dict[str, object]:
    data = path.read_bytes()
    return {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def module() -> ModuleType | None:
    """The compiled extension when it is built for this torch and not turned off, else None.

    Looks on disk once per process; never compiles."""
    if _STATE["off"]:
        return None
    if not _STATE["looked"]:
        _STATE["looked"] = True
        if not turned_off():
            _STATE["module"] = _load_built()
    return _STATE["module"]  # type: ignore[return-value]


def turned_off() -> bool:
    """Whether ``MESIMP_NATIVE`` turns the compiled path off (0, false, off or no)."""
    return os.environ.get("MESIMP_NATIVE", "").strip().lower() in ("0", "false", "off", "no")


def built() -> ModuleType | None:
    """The extension if this process loaded it, even inside :func:`disabled` (its slots
    outlive the switch)."""
    return _STATE["module"]  # type: ignore[return-value]


def is_built() -> bool:
    """Whether a finished build for this torch, Python and source is on disk."""
    return _built_file() is not None


def _built_file() -> Path | None:
    """The built library, if it is the file the build finished: loading a truncated or
    damaged shared library can kill the process (SIGBUS), so its size and hash are checked
    against the stamp the build wrote."""
    try:
        where = build_dir()
        stamp = json.loads((where / STAMP).read_text())
        for suffix in importlib.machinery.EXTENSION_SUFFIXES + [".so"]:
            path = where / f"{NAME}{suffix}"
            if path.is_file() and stamp == _fingerprint(path):
                return path
    except (OSError, ValueError):  # no build, or a damaged or foreign one
        return None
    return None


def _load_built() -> ModuleType | None:
    path = _built_file()
    if path is None:
        return None
    try:
        spec = importlib.util.spec_from_file_location(NAME, path)
        if spec is None or spec.loader is None:
            return None
        built = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(built)
        return built
    except (OSError, ImportError):  # built for another torch after all: the Python path
        return None


@contextlib.contextmanager
def disabled() -> Iterator[None]:
    """Run the Python meProp backward inside the block (a reference, or to compare)."""
    before = _STATE["off"]
    _STATE["off"] = True
    try:
        yield
    finally:
        _STATE["off"] = before
