"""Apply meProp to an existing model, change its k, and undo it.

Wrapping converts each chosen module in place (its class becomes the meProp subclass), so
the module objects, their Parameters, hooks and state_dict keys stay the same and an
optimizer built before keeps working; :func:`remove_meprop` restores the original classes.
Eligible modules are exactly ``nn.Linear``, ``nn.Conv1d``, ``nn.Conv2d``, ``nn.LSTM``
(``proj_size=0``) and Hugging Face's ``Conv1D``; subclasses are left alone because their
``forward`` may differ.
"""

from __future__ import annotations

from collections.abc import Sequence
from fnmatch import fnmatchcase
from typing import Any

from torch import nn

from ..errors import ConfigError, UnsupportedStructureError
from ..hfconv1d import is_conv1d, is_exactly_conv1d
from .conv import MePropConv1d, MePropConv2d
from .hfconv import MePropHFConv1D
from .linear import MePropLinear
from .lstm import MePropLSTM
from .settings import check_mode, check_tracker, resolve_k

WRAPPERS: dict[type[nn.Module], type[nn.Module]] = {
    nn.Linear: MePropLinear,
    nn.Conv1d: MePropConv1d,
    nn.Conv2d: MePropConv2d,
    nn.LSTM: MePropLSTM,
}
WRAPPED = (*WRAPPERS.values(), MePropHFConv1D)


def eligible(module: nn.Module) -> bool:
    """Whether meProp can wrap ``module``."""
    if is_exactly_conv1d(module):
        return True
    if type(module) not in WRAPPERS:
        return False
    return not (isinstance(module, nn.LSTM) and module.proj_size > 0)


def output_layer_of(model: nn.Module) -> str | None:
    """The name of the model's output layer: its last eligible module in definition order."""
    last = None
    for name, module in model.named_modules():
        if eligible(module):
            last = name
    return last


def apply_meprop(
    model: nn.Module,
    k: int | float | None,
    *,
    mode: str = "unified",
    sparse_bias: bool = False,
    include: Sequence[str] | str | None = None,
    exclude: Sequence[str] | str | None = None,
    output_layer: str | None = None,
    tracker: Any = None,
) -> list[str]:
    """Wrap the eligible layers of ``model`` with meProp in place; return their names.

    ``include``/``exclude`` are fnmatch patterns on module names. The output layer keeps
    dense backprop: the one named, else the last eligible module in definition order (name
    it when a model defines its head first; ``mc.compress`` finds it by tracing).
    """
    _check_module(model, "apply_meprop")
    check_mode(mode)
    check_tracker(tracker)
    include, exclude = _patterns(include, "include"), _patterns(exclude, "exclude")
    modules = dict(model.named_modules())
    already = [name for name, m in modules.items() if isinstance(m, WRAPPED)]
    if already:
        raise ConfigError(
            f"meProp is already applied to {already}; call remove_meprop(model) first"
        )
    if output_layer is None:
        output_layer = output_layer_of(model)
    elif output_layer not in modules:
        raise UnsupportedStructureError(
            f"output layer '{output_layer}' names no module of the model; modules: "
            f"{[n for n in modules if n][:20]}"
        )
    candidates = [name for name, m in modules.items() if eligible(m)]
    if include is not None:
        for pattern in include:
            if not any(fnmatchcase(name, pattern) for name in candidates):
                raise ConfigError(_no_match(pattern, modules, candidates))
        candidates = [n for n in candidates if any(fnmatchcase(n, p) for p in include)]
    if exclude is not None:
        candidates = [n for n in candidates if not any(fnmatchcase(n, p) for p in exclude)]
    chosen = [n for n in candidates if n != output_layer]
    for name in chosen:
        resolve_k(k, _width(modules[name]), name)
    for name in chosen:
        module = modules[name]
        wrapper = WRAPPERS.get(type(module), MePropHFConv1D)
        wrapper.wrap(module, k, mode=mode, sparse_bias=sparse_bias, key=name, tracker=tracker)
    return chosen


def remove_meprop(model: nn.Module) -> nn.Module:
    """Turn every meProp layer of ``model`` back into its original class; return the model."""
    _check_module(model, "remove_meprop")
    for module in model.modules():
        if isinstance(module, WRAPPED):
            module.unwrap()
    return model


def set_k(model: nn.Module, k: int | float | None) -> None:
    """Set k of every meProp layer (a fraction is of each layer's width at wrap time)."""
    _check_module(model, "set_k")
    layers = wrapped_layers(model)
    resolved = {name: resolve_k(k, m.meprop.original_width, name) for name, m in layers.items()}
    for name, module in layers.items():
        module.meprop.k = resolved[name]


def wrapped_layers(model: nn.Module) -> dict[str, nn.Module]:
    """The meProp layers of ``model`` by module name."""
    return {name: m for name, m in model.named_modules() if isinstance(m, WRAPPED)}


def _width(module: nn.Module) -> int:
    if isinstance(module, nn.LSTM):
        return module.hidden_size
    return module.weight.shape[1 if is_conv1d(module) else 0]


def _patterns(value: Sequence[str] | str | None, what: str) -> list[str] | None:
    if value is None:
        return None
    patterns = [value] if isinstance(value, str) else list(value)
    if not all(isinstance(p, str) for p in patterns):
        raise ConfigError(f"{what} must be module-name patterns (strings); got {value!r}")
    return patterns


def _no_match(pattern: str, modules: dict[str, nn.Module], candidates: list[str]) -> str:
    named = [n for n in modules if fnmatchcase(n, pattern)]
    if named:
        kinds = sorted({type(modules[n]).__name__ for n in named})
        return (
            f"include pattern '{pattern}' matches {named[:5]} ({', '.join(kinds)}), which meProp "
            "cannot wrap: only nn.Linear, nn.Conv1d, nn.Conv2d, nn.LSTM (proj_size=0) and "
            "Hugging Face's Conv1D are eligible"
        )
    return f"include pattern '{pattern}' matches no eligible module; eligible: {candidates[:20]}"


def _check_module(model: Any, call: str) -> None:
    if not isinstance(model, nn.Module):
        raise ConfigError(f"{call} needs an nn.Module; got {type(model).__name__}")
