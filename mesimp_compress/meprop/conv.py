"""meProp for nn.Conv1d and nn.Conv2d: the unit is an output channel (one filter).

Backward, unified mode: one top-k over |dL/dy| summed over batch and positions; dy and W are
gathered to the k selected channels and ``aten.convolution_backward`` runs on that small
convolution, giving grad_x and the gradient of the k selected filters only. Per-example
mode: each example its own top-k over |dy| summed over its positions, dy masked and
gathered to the union of selected channels. Grouped convolutions (groups > 1) cannot be
gathered into a smaller grouped convolution, so their masked dy runs through the full-size
backward (correct, not faster). The bias gets the dense gradient unless ``sparse_bias``.
The k filters' gradients go to a row-sparse optimizer that claimed the weight
(:mod:`.rowgrad`), else into ``.grad`` as the exact masked dense gradient.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable

from . import rowgrad
from .functions import empty_batch_grads, per_example_units, record_hook, unified_units
from .settings import MePropSettings, Swappable, build_settings, runs_dense


class _ConvFn(torch.autograd.Function):
    """One Function for Conv1d and Conv2d: the spatial dims are those of ``x`` after the
    channel axis."""

    @staticmethod
    def forward(ctx, x, weight, bias, settings, k, stride, padding, dilation, groups):  # noqa: D102
        ctx.save_for_backward(x, weight)
        ctx.params = (weight, bias)
        ctx.settings = settings
        ctx.conf = (k, stride, padding, dilation, groups)
        conv = F.conv1d if x.dim() == 3 else F.conv2d
        return conv(x, weight, bias, stride, padding, dilation, groups)

    @staticmethod
    @once_differentiable
    def backward(ctx, dy):  # noqa: D102
        x, weight = ctx.saved_tensors
        if dy.numel() == 0:
            return (*empty_batch_grads(ctx, x), None, None, None, None, None, None)
        if x.dtype != dy.dtype or weight.dtype != dy.dtype:  # autocast: compute in dy's
            x, weight = x.to(dy.dtype), weight.to(dy.dtype)  # precision, as autocast does
        weight_param, bias_param = ctx.params
        s = ctx.settings
        k, stride, padding, dilation, groups = ctx.conf
        width = weight.shape[0]
        examples = x.shape[0]
        spatial = tuple(range(2, dy.dim()))
        per_channel = (slice(None), slice(None), *(None for _ in spatial))  # (n, c) -> dy's dims
        counts = None
        if s.mode == "unified":
            units = unified_units(dy.abs().sum((0, *spatial)), k)
            dy_sel = dy
        else:
            score = dy.abs().sum(spatial)
            mask, counts, units = per_example_units(score, k)
            dy_sel = dy * mask[per_channel]
        needs = ctx.needs_input_grad
        mask_out = [needs[0], needs[1], False]
        no_output_padding = [0] * len(spatial)
        if groups == 1:
            dy_k = dy_sel.index_select(1, units)
            grad_x, grad_wk, _ = torch.ops.aten.convolution_backward(
                dy_k, x, weight.index_select(0, units), None, stride, padding, dilation,
                False, no_output_padding, 1, mask_out)
        else:
            if counts is None:
                keep = dy.new_zeros(width).index_fill_(0, units, 1.0)
                dy_sel = dy * keep[None][per_channel]
            grad_x, grad_w, _ = torch.ops.aten.convolution_backward(
                dy_sel, x, weight, None, stride, padding, dilation, False, no_output_padding,
                groups, mask_out)
            grad_wk = grad_w.index_select(0, units) if grad_w is not None else None
        grad_w = grad_b = None
        if needs[1]:
            grad_w = rowgrad.deliver(weight_param, units, grad_wk, ctx)
        if needs[2]:
            if s.sparse_bias:
                grad_b = rowgrad.deliver(bias_param, units,
                                         dy_sel.index_select(1, units).sum((0, *spatial)), ctx)
            else:
                grad_b = dy.sum((0, *spatial))
        if s.tracker is not None:
            if counts is None:
                s.tracker.record_selected(s.key, units, examples, width)
            else:
                s.tracker.record(s.key, counts, examples)
        return grad_x if needs[0] else None, grad_w, grad_b, None, None, None, None, None, None


class _MePropConv(Swappable):
    """What MePropConv1d and MePropConv2d share (``SPATIAL``: spatial dims of an example)."""

    SPATIAL: int
    meprop: MePropSettings

    def __init__(self, in_channels: int, out_channels: int, kernel_size: Any, stride: Any = 1,
                 padding: Any = 0, dilation: Any = 1, groups: int = 1, bias: bool = True,
                 padding_mode: str = "zeros", *, k: int | float | None = None,
                 mode: str = "unified", sparse_bias: bool = False, key: str = "",
                 tracker: Any = None, device: Any = None, dtype: Any = None) -> None:
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, dilation,
                         groups, bias, padding_mode, device=device, dtype=dtype)
        self.meprop = _settings(self, key, k, mode, sparse_bias, tracker)

    @classmethod
    def wrap(cls, module: nn.Module, k: int | float | None, *, mode: str = "unified",
             sparse_bias: bool = False, key: str = "", tracker: Any = None) -> Any:
        """Turn ``module`` itself into the meProp layer (same object, same Parameters)."""
        return cls._swap_in(module, _settings(module, key, k, mode, sparse_bias, tracker))

    def forward(self, input: torch.Tensor) -> torch.Tensor:  # noqa: D102
        s = self.meprop
        weight = self.weight
        if runs_dense(s, input, weight, self.bias):
            return self._conv_forward(input, weight, self.bias)
        width = weight.shape[0]
        batched = input.dim() == self.SPATIAL + 2
        x = input if batched else input.unsqueeze(0)
        if s.k >= width:
            out = self._conv_forward(x, weight, self.bias)
            if s.tracker is not None:
                out.register_hook(record_hook(s, s.key, x.shape[0], width))
            return out if batched else out.squeeze(0)
        padding = self.padding
        if self.padding_mode != "zeros" or isinstance(padding, str):
            if padding != "valid":
                mode = "constant" if self.padding_mode == "zeros" else self.padding_mode
                x = F.pad(x, self._reversed_padding_repeated_twice, mode=mode)
            padding = (0,) * self.SPATIAL
        out = _ConvFn.apply(x, weight, self.bias, s, s.k, list(self.stride), list(padding),
                            list(self.dilation), self.groups)
        return out if batched else out.squeeze(0)

    def extra_repr(self) -> str:  # noqa: D102
        s = self.meprop
        return f"{super().extra_repr()}, k={s.k}, mode={s.mode}, sparse_bias={s.sparse_bias}"


class MePropConv1d(_MePropConv, nn.Conv1d):
    """nn.Conv1d whose backward keeps only the top-k output channels (see module docstring).

    ``k`` is an int, a fraction of ``out_channels`` in (0, 1], or None (dense backprop);
    a k at or above the current width gives exact dense backprop.
    """

    BASE = nn.Conv1d
    SPATIAL = 1


class MePropConv2d(_MePropConv, nn.Conv2d):
    """nn.Conv2d whose backward keeps only the top-k output channels (see module docstring).

    ``k`` is an int, a fraction of ``out_channels`` in (0, 1], or None (dense backprop);
    a k at or above the current width gives exact dense backprop.
    """

    BASE = nn.Conv2d
    SPATIAL = 2


def _settings(module: nn.Module, key: str, k: Any, mode: str, sparse_bias: bool,
              tracker: Any) -> MePropSettings:
    return build_settings(key, module.weight.shape[0], k, mode, sparse_bias, tracker)
