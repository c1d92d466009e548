"""meProp for nn.Linear: the unit is an output feature (a row of W).

Backward, unified mode: one top-k over |dL/dy| summed over every leading dim, shared by the
whole minibatch; the k selected columns of dy are gathered into a dense (rows x k) block so
that ``grad_x = dy_k W_k`` and ``grad_W[k rows] = dy_kᵀ x`` are small dense matmuls.
Per-example mode: each example (index along dim 0; further leading dims are positions)
takes its own top-k over |dy| summed over its positions; the masked dy is gathered to the
union of selected units and the same small matmuls follow. The bias gets the dense gradient
unless ``sparse_bias`` is set. The k weight rows go to a row-sparse optimizer that claimed
the weight (:mod:`.rowgrad`), else into ``.grad`` as the exact masked dense gradient.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable

from . import native, rowgrad
from .functions import (
    empty_batch_grads,
    per_example_units,
    record_hook,
    selection_synced,
    unified_units,
)
from .native import ran
from .settings import MePropSettings, Swappable, build_settings, runs_dense


class _LinearFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, settings, k):  # noqa: D102
        ctx.save_for_backward(x, weight)
        ctx.params = (weight, bias)
        ctx.settings = settings
        ctx.k = k
        return F.linear(x, weight, bias)

    @staticmethod
    def backward(ctx, dy):  # noqa: D102
        if torch.is_grad_enabled():  # create_graph=True: guard against a double backward
            return _backward_once(ctx, dy)
        return _backward(ctx, dy)


def _backward(ctx: Any, dy: torch.Tensor) -> tuple:
    """The meProp backward. It runs once per layer per step, so it stays lean: plain 2-D
    inputs take no reshapes and unified mode costs one |dy| reduction, one top-k and two
    gathers besides the small matmuls."""
    x, weight = ctx.saved_tensors
    if dy.numel() == 0:
        return (*empty_batch_grads(ctx, x), None, None)
    if x.dtype != dy.dtype or weight.dtype != dy.dtype:  # autocast ran the forward in dy's
        x, weight = x.to(dy.dtype), weight.to(dy.dtype)  # precision: compute in it, as it does
    s = ctx.settings
    width = weight.shape[0]
    flat = dy.dim() == 2 and x.dim() == 2
    dy2 = dy if flat else dy.reshape(-1, width)
    examples = x.shape[0] if x.dim() > 1 else 1
    counts = None
    if s.mode == "unified":
        units = unified_units(dy2.abs().sum(0), ctx.k)
        dy_k = dy2.index_select(1, units)
    else:
        per_example = dy.reshape(examples, -1, width)
        mask, counts, units = per_example_units(per_example.abs().sum(1), ctx.k)
        dy_k = (per_example * mask.unsqueeze(1)).reshape(-1, width).index_select(1, units)
    needs = ctx.needs_input_grad
    grad_x = grad_w = grad_b = None
    if needs[0]:
        grad_x = torch.mm(dy_k, weight.index_select(0, units))
        if not flat:
            grad_x = grad_x.view(x.shape)
    if needs[1]:
        x2 = x if flat else x.reshape(-1, weight.shape[1])
        grad_w = rowgrad.deliver(ctx.params[0], units, torch.mm(dy_k.t(), x2), ctx)
    if needs[2]:
        if s.sparse_bias:
            grad_b = rowgrad.deliver(ctx.params[1], units, dy_k.sum(0), ctx)
        else:
            grad_b = dy2.sum(0)
    if s.tracker is not None:
        if counts is None:
            s.tracker.record_selected(s.key, units, examples, width)
        else:
            s.tracker.record(s.key, counts, examples)
    return grad_x, grad_w, grad_b, None, None


_backward_once = once_differentiable(_backward)


class MePropLinear(Swappable, nn.Linear):
    """nn.Linear whose backward keeps only the top-k output gradients (see module docstring).

    ``k`` is an int, a fraction of ``out_features`` in (0, 1], or None (dense backprop);
    a k at or above the current width gives exact dense backprop.
    """

    BASE = nn.Linear
    meprop: MePropSettings

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        *,
        k: int | float | None = None,
        mode: str = "unified",
        sparse_bias: bool = False,
        key: str = "",
        tracker: Any = None,
        device: Any = None,
        dtype: Any = None,
    ) -> None:
        super().__init__(in_features, out_features, bias, device=device, dtype=dtype)
        self.meprop = _settings(self, key, k, mode, sparse_bias, tracker)

    @classmethod
    def wrap(cls, module: nn.Linear, k: int | float | None, *, mode: str = "unified",
             sparse_bias: bool = False, key: str = "", tracker: Any = None) -> MePropLinear:
        """Turn ``module`` itself into a MePropLinear (same object, same Parameters)."""
        return cls._swap_in(module, _settings(module, key, k, mode, sparse_bias, tracker))

    def forward(self, input: torch.Tensor) -> torch.Tensor:  # noqa: D102
        return linear_forward(self.meprop, input, self.weight, self.bias, F.linear, native=True)

    def extra_repr(self) -> str:  # noqa: D102
        s = self.meprop
        return f"{super().extra_repr()}, k={s.k}, mode={s.mode}, sparse_bias={s.sparse_bias}"



def linear_forward(s: MePropSettings, x: torch.Tensor, weight: torch.Tensor, bias: Any,
                   dense: Any, native: bool = False) -> torch.Tensor:
    """The forward of a meProp layer computing ``x @ weight.T + bias`` (``weight``: out x in):
    ``dense(x, weight, bias)`` where backprop stays dense (recording every unit as selected
    when k covers the width), else the meProp Function: the compiled one where ``native``
    (``dense`` is F.linear) and :func:`compiled_call` takes the call, else the Python one."""
    if runs_dense(s, x, weight, bias):
        return dense(x, weight, bias)
    width = weight.shape[0]
    if s.k >= width:
        out = dense(x, weight, bias)
        if s.tracker is not None:
            examples = x.shape[0] if x.dim() > 1 else 1
            out.register_hook(record_hook(s, s.key, examples, width))
        return out
    if native:
        out = compiled_call(s, x, weight, bias)
        if out is not None:
            return out
    ran("python")
    return _LinearFn.apply(x, weight, bias, s, s.k)


_PLAIN = (torch.Tensor, nn.Parameter)
_COMPILED_DTYPES = (torch.float32, torch.float64)


def compiled_call(s: MePropSettings, x: torch.Tensor, weight: torch.Tensor,
                  bias: Any) -> torch.Tensor | None:
    """The compiled meProp Linear (:mod:`.native`) applied to ``x``, or None where it does
    not apply: not built, not unified top-k, sparse bias, synchronised selection, not CPU
    float32/float64 of one dtype, under autocast or tracing, a tensor subclass, an empty or
    1-D input, or a tracker without native counters. Both paths give the same gradients."""
    lib = native.module()
    if lib is None or s.mode != "unified" or s.sparse_bias or selection_synced():
        return None
    dtype = x.dtype
    if (dtype not in _COMPILED_DTYPES or x.device.type != "cpu" or weight.dtype != dtype
            or type(x) not in _PLAIN or type(weight) not in _PLAIN or x.dim() < 2
            or x.numel() == 0 or not weight.is_contiguous()
            or (bias is not None and (bias.dtype != dtype or type(bias) not in _PLAIN))
            or torch.is_autocast_enabled("cpu") or torch.jit.is_tracing()
            or torch.compiler.is_compiling()):
        return None
    hits = seen = None
    if s.tracker is not None:
        counter = getattr(s.tracker, "native_counter", None)
        if counter is None:
            return None
        hits, seen = counter(s.key, weight.shape[0])
    ran("compiled")
    return lib.linear(x, weight, bias, s.k, rowgrad.slot(weight, lib), hits, seen)


def _settings(module: nn.Module, key: str, k: Any, mode: str, sparse_bias: bool,
              tracker: Any) -> MePropSettings:
    return build_settings(key, module.weight.shape[0], k, mode, sparse_bias, tracker)
