"""How units enter, leave and pass through the layer modules the tracer treats as atomic.

Linear, Conv1d, Conv2d and Hugging Face's Conv1D layers produce units (their output features
/ channels) and consume them (their input features / channels); BatchNorm and depthwise
convolutions pass units through, one feature or channel per unit; nn.LSTM consumes input
features and produces hidden units, one group per layer and direction. Each module kind is
one small rule class; a new kind is one class and one registry line.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from torch.nn.utils import parametrize
from torch.nn.utils.rnn import PackedSequence

from ..hfconv1d import is_conv1d, widths
from .labels import AxisLabel, ProbeLabel
from .structure import ROLE_FEATURES, ROLE_IN

if TYPE_CHECKING:
    from .trace import Tracer


def _first_input(args: tuple, kwargs: dict, key: str = "input") -> Any:
    return args[0] if args else kwargs.get(key)


def _odd_parameters(module: nn.Module, expected: set[str]) -> str | None:
    if parametrize.is_parametrized(module):
        return "its weights are parametrized (weight_norm, spectral_norm, ...)"
    extra = sorted(set(module._parameters) - expected)
    if extra:
        return f"it has unexpected parameters {extra} (e.g. an old-style weight_norm)"
    return None


class ModuleRule:
    """Unit flow through one kind of atomic module."""

    kind: str = ""

    def producer_problem(self, module: nn.Module) -> str | None:
        """Why this module's own units cannot be pruned (None if they can)."""
        return None

    def before(
        self, tracer: Tracer, name: str, module: nn.Module, args: tuple, kwargs: dict
    ) -> None:
        """Record the module as a consumer of labelled inputs."""

    def after(
        self, tracer: Tracer, name: str, module: nn.Module, args: tuple, kwargs: dict, output: Any
    ) -> None:
        """Label the module's outputs."""


class LinearRule(ModuleRule):
    kind = "Linear"

    def producer_problem(self, module: nn.Module) -> str | None:
        return _odd_parameters(module, {"weight", "bias"})

    def before(self, tracer, name, module, args, kwargs):
        x = _first_input(args, kwargs)
        if isinstance(x, torch.Tensor):
            tracer.consume(
                name, self.kind, ROLE_IN, module.in_features, "in_features", x, x.dim() - 1
            )

    def after(self, tracer, name, module, args, kwargs, output):
        if isinstance(output, torch.Tensor):
            tracer.produce(name, self, module.out_features, output, output.dim() - 1, module)


class HFConv1DRule(ModuleRule):
    """Hugging Face's Conv1D: a Linear over the last axis, weight stored (nx, nf)."""

    kind = "Conv1D"

    def producer_problem(self, module: nn.Module) -> str | None:
        return _odd_parameters(module, {"weight", "bias"})

    def before(self, tracer, name, module, args, kwargs):
        x = _first_input(args, kwargs, "x")  # Conv1D.forward(self, x)
        if isinstance(x, torch.Tensor):
            tracer.consume(name, self.kind, ROLE_IN, widths(module)[0], "nx", x, x.dim() - 1)

    def after(self, tracer, name, module, args, kwargs, output):
        if isinstance(output, torch.Tensor):
            tracer.produce(name, self, widths(module)[1], output, output.dim() - 1, module)


def depthwise(module: nn.Module) -> bool:
    """A depthwise convolution (one filter per channel, groups = in = out channels): it has
    no units of its own, its channel c reads channel c only (MobileNet, ConvNeXt blocks)."""
    return (isinstance(module, (nn.Conv1d, nn.Conv2d)) and module.groups > 1
            and module.groups == module.in_channels == module.out_channels)


class ConvRule(ModuleRule):
    """Conv1d / Conv2d: channels along axis 1 of a batched input, axis 0 of an unbatched one.
    A depthwise convolution passes its input's units through, channel by channel, as
    BatchNorm does; other grouped convolutions are left alone."""

    def __init__(self, kind: str, spatial: int) -> None:
        self.kind, self.spatial = kind, spatial

    def producer_problem(self, module: nn.Module) -> str | None:
        if module.groups != 1:
            return f"grouped convolution (groups={module.groups}) is not supported"
        return _odd_parameters(module, {"weight", "bias"})

    def channel_axis(self, t: torch.Tensor) -> int:
        return 1 if t.dim() == self.spatial + 2 else 0

    def before(self, tracer, name, module, args, kwargs):
        x = _first_input(args, kwargs)
        if not isinstance(x, torch.Tensor):
            return
        if depthwise(module):
            problem = _odd_parameters(module, {"weight", "bias"})
            if problem:
                tracer.block_tensors([x], f"passes through depthwise '{name}' and {problem}")
                return
            tracer.consume(name, self.kind, ROLE_FEATURES, module.in_channels, "in_channels", x,
                           self.channel_axis(x))
            return
        if module.groups != 1:
            tracer.block_tensors([x], f"consumed by grouped convolution '{name}'")
            return
        tracer.consume(name, self.kind, ROLE_IN, module.in_channels, "in_channels", x,
                       self.channel_axis(x))

    def after(self, tracer, name, module, args, kwargs, output):
        if not isinstance(output, torch.Tensor):
            return
        if depthwise(module):
            x = _first_input(args, kwargs)
            label = tracer.label(x) if isinstance(x, torch.Tensor) else None
            if (isinstance(label, AxisLabel) and label.axis == self.channel_axis(x)
                    and tracer.is_recorded(name, ROLE_FEATURES, label)):
                tracer.set_label(output, AxisLabel(self.channel_axis(output), label.codes))
            return
        tracer.produce(name, self, module.out_channels, output, self.channel_axis(output),
                       module)


class BatchNormRule(ModuleRule):
    """BatchNorm1d/2d: one feature per unit, passed through."""

    def before(self, tracer, name, module, args, kwargs):
        x = _first_input(args, kwargs)
        if not isinstance(x, torch.Tensor):
            return
        problem = _odd_parameters(module, {"weight", "bias"})
        if problem:
            tracer.block_tensors([x], f"passes through BatchNorm '{name}' and {problem}")
            return
        kind = type_name(module)
        tracer.consume(name, kind, ROLE_FEATURES, module.num_features, "num_features", x, 1)

    def after(self, tracer, name, module, args, kwargs, output):
        x = _first_input(args, kwargs)
        label = tracer.label(x) if isinstance(x, torch.Tensor) else None
        if isinstance(label, AxisLabel) and label.axis == 1 and isinstance(output, torch.Tensor):
            if tracer.is_recorded(name, ROLE_FEATURES, label):
                tracer.set_label(output, label)


class LSTMRule(ModuleRule):
    kind = "LSTM"

    def producer_problem(self, module: nn.Module) -> str | None:
        if module.proj_size > 0:
            return "nn.LSTM with proj_size > 0 is not supported"
        return _odd_parameters(module, set(module._flat_weights_names))

    def before(self, tracer, name, module, args, kwargs):
        x = _first_input(args, kwargs)
        data = x.data if isinstance(x, PackedSequence) else x
        if isinstance(data, torch.Tensor):
            axis = data.dim() - 1
            tracer.consume(name, self.kind, ROLE_IN, module.input_size, "input_size", data, axis)
        hx = args[1] if len(args) > 1 else kwargs.get("hx")
        if hx is not None:
            tracer.explicit_state(name, hx)

    def after(self, tracer, name, module, args, kwargs, output):
        codes = tracer.produce_lstm(name, module)
        if codes is None:
            return
        out, state = output
        data = out.data if isinstance(out, PackedSequence) else out
        layers, dirs = module.num_layers, 2 if module.bidirectional else 1
        last = torch.cat([codes[(layers - 1, d)] for d in range(dirs)])
        tracer.set_label(data, AxisLabel(data.dim() - 1, last))
        for h in state:
            probe = torch.zeros(h.shape, dtype=torch.int64)
            for k in range(layers * dirs):
                probe[k] = codes[(k // dirs, k % dirs)]
            tracer.set_label(h, ProbeLabel(probe))


_RULES: list[tuple[type[nn.Module], ModuleRule]] = [
    (nn.Linear, LinearRule()),
    (nn.Conv1d, ConvRule("Conv1d", 1)),
    (nn.Conv2d, ConvRule("Conv2d", 2)),
    (nn.BatchNorm1d, BatchNormRule()),
    (nn.BatchNorm2d, BatchNormRule()),
    (nn.LSTM, LSTMRule()),
]
_HF_CONV1D = HFConv1DRule()  # matched by name (transformers is never imported here)
PRODUCER_KINDS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.LSTM)
# Layers with units of their own that this toolkit does not prune (reported, not traced into).
UNSUPPORTED_KINDS = (
    nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d, nn.GRU, nn.RNN,
    nn.LSTMCell, nn.GRUCell, nn.RNNCell, nn.Bilinear,
)


def producer(module: nn.Module) -> bool:
    """Whether ``module`` is a layer kind whose units this toolkit prunes."""
    return isinstance(module, PRODUCER_KINDS) or is_conv1d(module)


def unsupported(module: nn.Module) -> bool:
    """Whether ``module`` has units of its own that this toolkit does not prune."""
    return isinstance(module, UNSUPPORTED_KINDS)


def rule_for(module: nn.Module) -> ModuleRule | None:
    """The atomic-module rule for ``module`` (subclasses included), or None."""
    for kind, rule in _RULES:
        if isinstance(module, kind):
            return rule
    return _HF_CONV1D if is_conv1d(module) else None


def type_name(module: nn.Module) -> str:
    """The base layer kind of ``module`` (``"Linear"`` for any nn.Linear subclass, ...)."""
    for kind in (nn.Linear, nn.Conv1d, nn.Conv2d, nn.BatchNorm1d, nn.BatchNorm2d, nn.LSTM):
        if isinstance(module, kind):
            return kind.__name__
    return _HF_CONV1D.kind if is_conv1d(module) else type(module).__name__
