"""Resolve user specs (``path/to/file.py:name`` or ``package.module:name``) and load weights.

A file spec imports the file by path under a module name of its own (one per resolved path,
so two specs naming the same file share one module), with the file's folder on ``sys.path``
as when running it as a script. Every failure is a :class:`SpecError` (or, for weights, a
:class:`CheckpointError`) with a one-line message.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import os
import pickle  # only for its error type: weights are read with weights_only=True by default
import re
import sys
import warnings
from collections.abc import Mapping
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
from torch import nn

from .errors import USER_FAILURES, CheckpointError, SpecError, describe

_NESTED_STATE_KEYS = ("state_dict", "model_state_dict", "model")


def load_object(spec: str, *, what: str = "object", require_callable: bool = True) -> Any:
    """The object named by ``spec`` (``file.py:name`` or ``package.module:name``; ``name``
    may be dotted). With ``require_callable`` (the default) it must be callable."""
    if not isinstance(spec, str) or ":" not in spec:
        raise SpecError(
            f"{what} spec {spec!r} has no ':'; expected 'path/to/file.py:name' "
            "or 'package.module:name'"
        )
    where, _, name = spec.rpartition(":")
    if not where or not name:
        raise SpecError(f"{what} spec {spec!r} needs both a file/module and a name around ':'")
    module = _import_file(where, what) if _is_file(where) else _import_module(where, what)
    obj: Any = module
    for i, part in enumerate(name.split(".")):
        if not hasattr(obj, part):
            owner = where if i == 0 else f"{where}:{'.'.join(name.split('.')[:i])}"
            raise SpecError(
                f"{what} spec {spec!r}: {owner} has no attribute {part!r} "
                f"(available: {_available(obj)})"
            )
        obj = getattr(obj, part)
    if require_callable and not callable(obj):
        raise SpecError(f"{what} spec {spec!r} names a {type(obj).__name__}, not a callable")
    return obj


def load_factory(spec: str) -> nn.Module:
    """Call the factory named by ``spec`` with no arguments and return the nn.Module it builds."""
    factory = load_object(spec, what="model factory")
    if isinstance(factory, nn.Module):
        return factory
    try:
        model = factory()
    except USER_FAILURES as exc:  # user code: report it in one line
        raise SpecError(f"model factory {spec}() raised {_describe(exc)}") from None
    if not isinstance(model, nn.Module):
        raise SpecError(
            f"model factory {spec}() returned a {type(model).__name__}, expected a torch.nn.Module"
        )
    return model


def load_weights(
    model: nn.Module, path: str | os.PathLike[str], *, trust_pickle: bool = False
) -> nn.Module:
    """Load a state_dict file into ``model`` (strict) and return it.

    The file is read with ``torch.load(weights_only=True)``; a whole pickled nn.Module is
    accepted only with ``trust_pickle=True``, since unpickling runs code from the file.
    """
    file = Path(path)
    loaded = read_weights(file, trust_pickle=trust_pickle)
    state = _state_dict_of(loaded, file)
    check_state_dict(model, state, source=str(file))
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:  # e.g. a value torch cannot copy into a parameter
        raise CheckpointError(f"{file}: cannot load it into the model: {_describe(exc)}") from None
    return model


def read_weights(
    path: str | os.PathLike[str], *, trust_pickle: bool = False, map_location: Any = "cpu"
) -> Any:
    """What a weights file holds, read with ``torch.load(weights_only=True)`` (or, with
    ``trust_pickle``, as the full pickle it is); CheckpointError in one line for a missing,
    empty, corrupt or foreign file, and for a pickled object without ``trust_pickle``."""
    file = Path(path)
    if not file.is_file():
        raise CheckpointError(f"weights file {str(file)!r} does not exist or is not a file")
    if file.stat().st_size == 0:
        raise CheckpointError(f"weights file {str(file)!r} is empty")
    try:
        with warnings.catch_warnings():  # torch warns about legacy pickles: the error says it
            warnings.simplefilter("ignore", UserWarning)
            return torch.load(file, map_location=map_location, weights_only=not trust_pickle)
    except pickle.UnpicklingError as exc:
        found = re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(exc))
        if found and not trust_pickle:
            raise CheckpointError(
                f"weights file {str(file)!r} is not a plain state_dict (it holds a pickled "
                f"{found.group(1)}); load it only if you trust it, with trust_pickle=True "
                "(--trust-pickle)"
            ) from None
        reason = re.search(r"WeightsUnpickler error:\s*([^\n]+)", str(exc))
        detail = f" ({' '.join(reason.group(1).split())})" if reason else ""
        raise CheckpointError(
            f"cannot read weights {str(file)!r}: not a file written by torch.save, or "
            f"damaged{detail}"
        ) from None
    except Exception as exc:  # noqa: BLE001 - torch.load raises many types for bad files
        raise CheckpointError(
            f"cannot read weights {str(file)!r}: not a file written by torch.save, or damaged "
            f"({_describe(exc)})"
        ) from None


def check_state_dict(
    model: nn.Module, state: Mapping[str, Any], *, source: str = "state_dict"
) -> None:
    """CheckpointError naming the first missing, unexpected or mis-shaped keys of ``state``."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing {_first(missing)}")
        if unexpected:
            parts.append(f"unexpected {_first(unexpected)}")
        raise CheckpointError(f"{source} does not fit the model: {'; '.join(parts)}")
    other = [k for k, v in expected.items()
             if isinstance(v, torch.Tensor) and not isinstance(state[k], torch.Tensor)]
    if other:
        raise CheckpointError(
            f"{source}: '{other[0]}' is a {type(state[other[0]]).__name__}, not a tensor"
        )
    for k, v in expected.items():
        kind = _not_dense(state[k]) if isinstance(v, torch.Tensor) else None
        if kind is not None:
            raise CheckpointError(f"{source}: '{k}' is {kind}; save dense tensors with data")
    wrong = [
        f"{k}: file {tuple(state[k].shape)} vs model {tuple(v.shape)}"
        for k, v in expected.items()
        if isinstance(state[k], torch.Tensor) and tuple(state[k].shape) != tuple(v.shape)
    ]
    if wrong:
        more = f" (+{len(wrong) - 3} more)" if len(wrong) > 3 else ""
        raise CheckpointError(f"{source} has shape mismatches: {', '.join(wrong[:3])}{more}")


# ---------------------------------------------------------------------- helpers
def _not_dense(tensor: torch.Tensor) -> str | None:
    """What keeps ``tensor`` from loading into a parameter: a sparse or nested layout, or
    the meta device (no data); None for an ordinary tensor."""
    if tensor.is_nested:
        return "a nested tensor"
    if tensor.layout != torch.strided:
        return f"a {str(tensor.layout).removeprefix('torch.')} tensor"
    if tensor.is_meta:
        return "on the meta device (it holds no data)"
    return None


def _is_file(where: str) -> bool:
    return where.endswith(".py") or "/" in where or os.sep in where


def _import_file(where: str, what: str) -> ModuleType:
    path = Path(where).expanduser().resolve()
    if not path.is_file():
        raise SpecError(f"{what} file {where!r} not found")
    digest = hashlib.sha1(str(path).encode("utf-8")).hexdigest()[:12]
    name = f"_mesimp_spec_{_identifier(path.stem)}_{digest}"
    cached = sys.modules.get(name)
    if cached is not None:
        return cached
    folder = str(path.parent)
    if folder not in sys.path:
        sys.path.insert(0, folder)
    module_spec = importlib.util.spec_from_file_location(name, path)
    if module_spec is None or module_spec.loader is None:
        raise SpecError(f"{what} file {where!r} cannot be imported as Python")
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[name] = module
    try:
        module_spec.loader.exec_module(module)
    except USER_FAILURES as exc:  # user code: report it in one line
        sys.modules.pop(name, None)
        raise SpecError(f"importing {what} file {where!r} raised {_describe(exc)}") from None
    return module


def _import_module(where: str, what: str) -> ModuleType:
    try:
        return importlib.import_module(where)
    except ModuleNotFoundError as exc:
        if exc.name is not None and where.startswith(exc.name):
            raise SpecError(f"{what} module {where!r} not found ({exc})") from None
        raise SpecError(f"importing {what} module {where!r} raised {_describe(exc)}") from None
    except USER_FAILURES as exc:  # user code: report it in one line
        raise SpecError(f"importing {what} module {where!r} raised {_describe(exc)}") from None


def _state_dict_of(loaded: Any, file: Path) -> Mapping[str, Any]:
    if isinstance(loaded, nn.Module):
        return loaded.state_dict()
    if isinstance(loaded, Mapping):
        if loaded and not all(isinstance(v, torch.Tensor) for v in loaded.values()):
            for key in _NESTED_STATE_KEYS:
                inner = loaded.get(key)
                if isinstance(inner, Mapping) and inner:
                    loaded = inner
                    break
        keys = list(loaded)
        if keys and all(isinstance(k, str) and k.startswith("module.") for k in keys):
            loaded = {k[len("module.") :]: v for k, v in loaded.items()}  # saved from DDP
        return loaded
    raise CheckpointError(
        f"weights file {str(file)!r} holds a {type(loaded).__name__}, expected a state_dict"
    )


def _available(obj: Any, limit: int = 8) -> str:
    names = sorted(n for n in dir(obj) if not n.startswith("_"))
    if not names:
        return "none"
    more = ", ..." if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def _first(keys: list[str], limit: int = 3) -> str:
    more = f" (+{len(keys) - limit} more)" if len(keys) > limit else ""
    return ", ".join(repr(k) for k in keys[:limit]) + more


def _identifier(text: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in text) or "file"


def _describe(exc: BaseException) -> str:
    if isinstance(exc, SystemExit):
        return describe(exc)
    text = " ".join(str(exc).split())
    if len(text) > 300:
        text = text[:297] + "..."
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


__all__ = ["check_state_dict", "load_factory", "load_object", "load_weights", "read_weights"]
