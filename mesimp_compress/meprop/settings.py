"""Per-layer meProp settings and the validation of k and mode."""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ..errors import ConfigError, KError

if TYPE_CHECKING:
    from ..activity import ActivityTracker

MODES = ("unified", "per_example")


@dataclass
class MePropSettings:
    """What a wrapped layer needs at backward time.

    ``k`` is an int (capped at the current width at call time) or None for dense backprop;
    ``original_width`` is the width at wrap time, the base of a fractional k.
    """

    key: str
    k: int | None
    original_width: int
    mode: str = "unified"
    sparse_bias: bool = False
    tracker: ActivityTracker | None = None


class Swappable:
    """The in-place class swap shared by the meProp layers. A wrapped layer is the very same
    module object with its class changed to the meProp subclass, so its Parameters, hooks and
    state_dict keys stay; ``unwrap`` changes it back to ``BASE``, the plain torch class."""

    BASE: type
    meprop: MePropSettings

    @classmethod
    def _swap_in(cls, module: Any, settings: MePropSettings) -> Any:
        module.__class__ = cls
        module.meprop = settings
        return module

    def unwrap(self) -> Any:
        """Turn this module back into its plain torch class (same object, same Parameters)."""
        del self.meprop
        self.__class__ = self.BASE
        return self


def runs_dense(s: MePropSettings, input: Any, weight: Any, bias: Any) -> bool:
    """Whether a layer simply runs its plain forward: dense backprop (k is None), no grad
    mode, or nothing that would receive a gradient."""
    import torch

    return s.k is None or not torch.is_grad_enabled() or not (
        input.requires_grad or weight.requires_grad or (bias is not None and bias.requires_grad)
    )


def build_settings(
    layer: str, width: int, k: Any, mode: str, sparse_bias: bool, tracker: Any
) -> MePropSettings:
    """Validated settings for a layer named ``layer`` (its key) of ``width`` units."""
    return MePropSettings(layer, resolve_k(k, width, layer or "(unnamed)"), width, check_mode(mode),
                          bool(sparse_bias), check_tracker(tracker))


def check_tracker(tracker: Any) -> Any:
    """``tracker`` if it is None or records activity (an ActivityTracker or alike), else
    ConfigError: a wrong object would fail only inside the first backward."""
    if tracker is None or all(callable(getattr(tracker, name, None))
                              for name in ("record", "record_selected")):
        return tracker
    raise ConfigError(
        f"tracker must be an ActivityTracker (with record and record_selected); got "
        f"{type(tracker).__name__}"
    )


def resolve_k(k: Any, width: int, layer: str) -> int | None:
    """k as an int for a layer of ``width`` units: an int >= 1, a fraction in (0, 1], or None."""
    if k is None:
        return None
    if isinstance(k, bool) or not isinstance(k, numbers.Real):
        raise KError(_k_message(k, layer))
    if isinstance(k, numbers.Integral):
        if k < 1:
            raise KError(_k_message(k, layer))
        return int(k)
    value = float(k)
    if not math.isfinite(value) or not 0.0 < value <= 1.0:
        raise KError(_k_message(k, layer))
    return max(1, round(value * width))


def _k_message(k: Any, layer: str) -> str:
    return (
        f"k for layer '{layer}' must be a positive int or a fraction in (0, 1]; got {k!r}"
    )


def check_mode(mode: Any) -> str:
    """Return ``mode`` if it is a known meProp mode, else raise ConfigError."""
    if mode not in MODES:
        raise ConfigError(f"meProp mode must be one of {list(MODES)}; got {mode!r}")
    return mode
