"""Per-layer-kind pruners: which tensors of a module shrink when units go.

One small class per layer kind, registered by type (subclasses such as the meProp wrappers
resolve through their MRO). A pruner never touches tensors itself: it says which entries of
which parameters and buffers are kept (:class:`Slice`), which entries *read* given input
positions (to zero them in a masked model), how removed inputs fold into what is kept
(compensation), and which shape attributes to update. :mod:`.apply` does the rest, the
same way for all.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar, TypeVar

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.utils import parametrize

from ..graph import ROLE_FEATURES, ROLE_IN, ROLE_OUT
from ..graph.modules import depthwise
from ..hfconv1d import is_conv1d, widths

if TYPE_CHECKING:
    from .compensation import Substitute


@dataclass(frozen=True)
class Slice:
    """Entries ``index`` along ``dim`` of the module's parameter or buffer ``tensor``."""

    tensor: str
    dim: int
    index: torch.Tensor


class ModulePruner:
    """How one layer kind shrinks. Roles name dimensions: ``"out"``, ``"in"``, ``"features"``..."""

    kinds: ClassVar[tuple[type[nn.Module], ...]] = ()
    parameters: ClassVar[frozenset[str]] = frozenset({"weight", "bias"})

    def sizes(self, module: nn.Module) -> dict[str, int]:
        """Every role this kind supports, with its current length."""
        raise NotImplementedError

    def problem(self, module: nn.Module) -> str | None:
        """Why this module cannot be edited (None when it can)."""
        if parametrize.is_parametrized(module):
            return "its weights are parametrized (weight_norm, spectral_norm, ...)"
        extra = sorted(set(module._parameters) - self.expected_parameters(module))
        if extra:
            return f"it has unexpected parameters {extra}"
        return None

    def expected_parameters(self, module: nn.Module) -> set[str]:
        """Names of the parameters a module of this kind may hold."""
        return set(self.parameters)

    def slices(self, module: nn.Module, kept: Mapping[str, torch.Tensor]) -> list[Slice]:
        """What stays of each tensor when each role in ``kept`` keeps those indices."""
        raise NotImplementedError

    def reads(self, module: nn.Module, role: str, removed: torch.Tensor) -> list[Slice]:
        """The tensor entries through which the module reads positions ``removed`` of ``role``."""
        return []

    def fold(
        self, module: nn.Module, role: str, sub: Substitute | None
    ) -> dict[str, torch.Tensor] | str:
        """Deltas (by tensor name, full size) that make the module read ``sub`` in place of
        the removed inputs, or why that is not possible."""
        return f"{type(module).__name__} ({role}) has no input to compensate"

    def resize(self, module: nn.Module, kept: Mapping[str, torch.Tensor]) -> None:
        """Update the shape attributes after :meth:`slices` were applied."""
        raise NotImplementedError


_PRUNERS: dict[type[nn.Module], ModulePruner] = {}
P = TypeVar("P", bound=type[ModulePruner])


def register_pruner(cls: P) -> P:
    """Class decorator: register one instance of ``cls`` for each type in ``cls.kinds``."""
    instance = cls()
    for kind in cls.kinds:
        _PRUNERS[kind] = instance
    return cls


def pruner_for(module: nn.Module) -> ModulePruner | None:
    """The pruner for ``module``'s type or its nearest registered base class."""
    for cls in type(module).__mro__:
        if cls in _PRUNERS:
            return _PRUNERS[cls]
    return _HF_CONV1D if is_conv1d(module) else None


def fold_inputs(
    weight: torch.Tensor, bias_name: str, weight_name: str, sub: Substitute
) -> dict[str, torch.Tensor]:
    """Deltas for a weight (out, in, *kernel) whose removed input columns read ``sub``:
    ``bias += W_R offset`` (summed over the kernel) and ``W_K += W_R mix``."""
    cols = weight.index_select(1, sub.removed)
    kernel = tuple(range(2, weight.dim()))
    deltas = {bias_name: (cols.sum(kernel) if kernel else cols) @ sub.offset.to(cols)}
    if sub.mix is not None:
        moved = torch.einsum("or...,rk->ok...", cols, sub.mix.to(cols))
        deltas[weight_name] = torch.zeros_like(weight).index_add_(1, sub.kept, moved)
    return deltas


class _RowsColumnsPruner(ModulePruner):
    """Weight (out, in, ...): ``out`` = rows of weight and bias, ``in`` = columns of weight."""

    def slices(self, module, kept):
        out = []
        if ROLE_OUT in kept:
            out.append(Slice("weight", 0, kept[ROLE_OUT]))
            if module.bias is not None:
                out.append(Slice("bias", 0, kept[ROLE_OUT]))
        if ROLE_IN in kept:
            out.append(Slice("weight", 1, kept[ROLE_IN]))
        return out

    def reads(self, module, role, removed):
        return [Slice("weight", 1, removed)] if role == ROLE_IN else []


@register_pruner
class LinearPruner(_RowsColumnsPruner):
    """nn.Linear: ``out`` = rows of weight and bias, ``in`` = columns of weight."""

    kinds = (nn.Linear,)

    def sizes(self, module):
        return {ROLE_OUT: module.out_features, ROLE_IN: module.in_features}

    def fold(self, module, role, sub):
        if role != ROLE_IN:
            return super().fold(module, role, sub)
        if module.bias is None:
            return "it has no bias to fold the removed inputs into"
        return fold_inputs(module.weight, "bias", "weight", sub)

    def resize(self, module, kept):
        if ROLE_OUT in kept:
            module.out_features = len(kept[ROLE_OUT])
        if ROLE_IN in kept:
            module.in_features = len(kept[ROLE_IN])


@register_pruner
class ConvPruner(_RowsColumnsPruner):
    """nn.Conv1d / nn.Conv2d (groups=1): ``out`` = output channels, ``in`` = input channels.
    A depthwise convolution (groups = in = out channels) has ``features`` instead: its
    filters and bias, one per channel, as a BatchNorm's."""

    kinds = (nn.Conv1d, nn.Conv2d)

    def sizes(self, module):
        if depthwise(module):
            return {ROLE_FEATURES: module.in_channels}
        return {ROLE_OUT: module.out_channels, ROLE_IN: module.in_channels}

    def problem(self, module):
        if module.groups != 1 and not depthwise(module):
            return f"grouped convolution (groups={module.groups}) is not supported"
        return super().problem(module)

    def slices(self, module, kept):
        if ROLE_FEATURES not in kept:
            return super().slices(module, kept)
        index = kept[ROLE_FEATURES]
        return [Slice("weight", 0, index)] + (
            [Slice("bias", 0, index)] if module.bias is not None else [])

    def fold(self, module, role, sub):
        # Exact where the kernel sees no zero padding; at padded borders the removed
        # channel's offset is assumed at positions that read padding.
        if role != ROLE_IN:
            return super().fold(module, role, sub)
        if module.bias is None:
            return "it has no bias to fold the removed inputs into"
        return fold_inputs(module.weight, "bias", "weight", sub)

    def resize(self, module, kept):
        if ROLE_FEATURES in kept:
            module.in_channels = module.out_channels = module.groups = len(kept[ROLE_FEATURES])
        if ROLE_OUT in kept:
            module.out_channels = len(kept[ROLE_OUT])
        if ROLE_IN in kept:
            module.in_channels = len(kept[ROLE_IN])


class HFConv1DPruner(ModulePruner):
    """Hugging Face's Conv1D, weight (nx, nf): ``out`` = columns of weight and the bias,
    ``in`` = rows of weight (found by class name: see :mod:`mesimp_compress.hfconv1d`)."""

    def sizes(self, module):
        nx, nf = widths(module)
        return {ROLE_OUT: nf, ROLE_IN: nx}

    def slices(self, module, kept):
        out = []
        if ROLE_OUT in kept:
            out += [Slice("weight", 1, kept[ROLE_OUT]), Slice("bias", 0, kept[ROLE_OUT])]
        if ROLE_IN in kept:
            out.append(Slice("weight", 0, kept[ROLE_IN]))
        return out

    def reads(self, module, role, removed):
        return [Slice("weight", 0, removed)] if role == ROLE_IN else []

    def fold(self, module, role, sub):
        if role != ROLE_IN:
            return super().fold(module, role, sub)
        deltas = fold_inputs(module.weight.t(), "bias", "weight", sub)
        if "weight" in deltas:
            deltas["weight"] = deltas["weight"].t()
        return deltas

    def resize(self, module, kept):
        if ROLE_OUT in kept:
            module.nf = len(kept[ROLE_OUT])
        if ROLE_IN in kept:
            module.nx = len(kept[ROLE_IN])


_HF_CONV1D = HFConv1DPruner()


@register_pruner
class BatchNormPruner(ModulePruner):
    """BatchNorm1d/2d: ``features`` = affine parameters and running statistics."""

    kinds = (_BatchNorm,)

    def sizes(self, module):
        return {ROLE_FEATURES: module.num_features}

    def slices(self, module, kept):
        if ROLE_FEATURES not in kept:
            return []
        index = kept[ROLE_FEATURES]
        names = ("weight", "bias", "running_mean", "running_var")
        return [Slice(n, 0, index) for n in names if getattr(module, n, None) is not None]

    def resize(self, module, kept):
        if ROLE_FEATURES in kept:
            module.num_features = len(kept[ROLE_FEATURES])
