"""meProp for Hugging Face's Conv1D (GPT-2's layers): a Linear whose weight is stored
transposed, so the unit is an output feature, a *column* of the weight.

The backward is :mod:`.linear`'s over the transposed view of the weight: the same top-k,
the same small matmuls. The view is not the Parameter, so its k rows (the weight's k
columns) reach ``.grad`` as the exact masked dense gradient; a row-sparse optimizer steps
such a weight densely (it gets no row gradient). The wrapper class is made per Conv1D class
on first use (transformers is imported by the user's model, never here).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..hfconv1d import widths
from .linear import linear_forward
from .settings import MePropSettings, Swappable, build_settings


class MePropHFConv1D(Swappable):
    """The meProp side of a wrapped Hugging Face Conv1D; the class of a wrapped layer is
    ``wrapper_for(type(layer))``, a subclass of this and of the layer's own class."""

    BASE: type
    meprop: MePropSettings

    @classmethod
    def wrap(cls, module: nn.Module, k: int | float | None, *, mode: str = "unified",
             sparse_bias: bool = False, key: str = "", tracker: Any = None) -> Any:
        """Turn ``module`` itself into a meProp layer (same object, same Parameters)."""
        settings = build_settings(key, widths(module)[1], k, mode, sparse_bias, tracker)
        return wrapper_for(type(module))._swap_in(module, settings)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        return linear_forward(self.meprop, x, self.weight.t(), self.bias,
                              lambda *_: self.BASE.forward(self, x))

    def __reduce_ex__(self, protocol: Any) -> Any:  # the class is made at run time
        return _blank, (self.BASE,), self.__dict__.copy()

    def __repr__(self) -> str:  # Conv1D's own repr shows nf and nx only
        s = self.meprop
        return f"{self.BASE.__repr__(self)[:-1]}, k={s.k}, mode={s.mode})"


_CLASSES: dict[type, type] = {}


def wrapper_for(base: type) -> type:
    """The meProp class of Conv1D class ``base`` (made once)."""
    cls = _CLASSES.get(base)
    if cls is None:
        cls = type(f"MeProp{base.__name__}", (MePropHFConv1D, base), {"BASE": base})
        cls.__module__ = __name__
        _CLASSES[base] = cls
    return cls


def _blank(base: type) -> nn.Module:
    """An empty wrapped layer, its state set by pickle or deepcopy."""
    return object.__new__(wrapper_for(base))
