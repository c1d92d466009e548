"""Hugging Face's ``Conv1D`` (GPT-2, GPT, DeBERTa-v1 ...): a Linear whose weight is stored
transposed, ``(in_features, out_features)``, with the widths in ``nx`` (in) and ``nf`` (out).

Recognised by class name and module, so transformers is never imported here. meProp, the
structure analysis, surgery and compensation treat it as a Linear over its last axis.
"""

from __future__ import annotations

from torch import nn

NAME, PACKAGE = "Conv1D", "transformers."


def _named(cls: type) -> bool:
    return cls.__name__ == NAME and cls.__module__.startswith(PACKAGE)


def is_conv1d(module: nn.Module) -> bool:
    """Whether ``module`` is a Hugging Face Conv1D (or a subclass of it)."""
    return any(_named(cls) for cls in type(module).__mro__)


def is_exactly_conv1d(module: nn.Module) -> bool:
    """Whether ``module``'s class is Hugging Face's Conv1D itself (not a subclass)."""
    return _named(type(module))


def widths(module: nn.Module) -> tuple[int, int]:
    """``(in_features, out_features)`` of a Conv1D, read from its weight."""
    nx, nf = module.weight.shape
    return nx, nf
