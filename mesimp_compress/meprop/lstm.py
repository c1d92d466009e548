"""meProp for nn.LSTM: the unit is a hidden unit, selected as a whole across its four gates.

Design (see :mod:`.lstm_bptt` for the backward): the model runs layer by layer, each layer
(both directions) an autograd Function whose forward is torch's native one-layer kernel,
so forward outputs equal nn.LSTM's. At the start of a layer's backward, each direction
selects its units, once for the whole sequence:

- unified (default): the top-k of |dL/d output| summed over batch and time (plus |dL/d h_n|
  and |dL/d c_n|), shared by the minibatch; BPTT then runs on those k units only
  (4k gate rows, small dense matmuls). Activity: the batch size for each selected unit.
- per_example: each sequence its own top-k of the same sums over its own time steps; BPTT
  runs on the union with a per-sequence mask. Activity: one example is one sequence, so a
  unit's count is the number of sequences that selected it.

Layer keys are ``f"{name}.l{layer}"`` and ``f"{name}.l{layer}_reverse"``. Variable-length
batches come as PackedSequence (e.g. from ``pack_padded_sequence(x, lengths)``); padded
positions are not part of the packed data, so they add neither hits nor gradients. The
gates' biases are part of the selected rows, so they always get the gradient of the
selected units only (``sparse_bias`` does not apply). Dropout between layers is applied
with ``F.dropout`` (a different random stream from nn.LSTM's). ``proj_size > 0`` is not
supported.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.rnn import PackedSequence

from ..errors import ConfigError, ShapeError
from .functions import once_per_backward
from .lstm_bptt import LayerPlan, LSTMLayerFn, layout
from .settings import MePropSettings, Swappable, build_settings


class MePropLSTM(Swappable, nn.LSTM):
    """nn.LSTM whose backward keeps only the top-k hidden units per layer and direction.

    ``k`` is an int, a fraction of ``hidden_size`` in (0, 1], or None (dense backprop); a k at
    or above the current hidden size runs nn.LSTM itself (exact dense backprop).
    """

    BASE = nn.LSTM
    meprop: MePropSettings

    def __init__(self, *args: Any, k: int | float | None = None, mode: str = "unified",
                 key: str = "", tracker: Any = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.meprop = _settings(self, key, k, mode, tracker)

    @classmethod
    def wrap(cls, module: nn.LSTM, k: int | float | None, *, mode: str = "unified",
             sparse_bias: bool = False, key: str = "", tracker: Any = None) -> MePropLSTM:
        """Turn ``module`` itself into a MePropLSTM (same object, same Parameters).

        ``sparse_bias`` is accepted for symmetry and has no effect: the gate biases always
        follow the selected units.
        """
        return cls._swap_in(module, _settings(module, key, k, mode, tracker))

    def layer_keys(self) -> list[str]:
        """The activity keys of this LSTM, per layer and direction."""
        sfx = ["", "_reverse"] if self.bidirectional else [""]
        return [f"{self.meprop.key}.l{i}{d}" for i in range(self.num_layers) for d in sfx]

    def forward(self, input: Any, hx: Any = None) -> Any:  # noqa: D102
        s = self.meprop
        weights = [getattr(self, name) for name in self._flat_weights_names]
        if s.k is None or not torch.is_grad_enabled() or not _needs_grad(input, hx, weights):
            return super().forward(input, hx)
        hidden = weights[1].shape[1]
        if s.k >= hidden:
            output, state = super().forward(input, hx)
            if s.tracker is not None:
                _record_dense(self, input, output, state, hidden)
            return output, state
        return self._meprop_forward(input, hx, weights, hidden)

    def _meprop_forward(self, input: Any, hx: Any, weights: list[torch.Tensor],
                        hidden: int) -> Any:
        s = self.meprop
        dirs = 2 if self.bidirectional else 1
        packed = isinstance(input, PackedSequence)
        if packed:
            x, batch_sizes, sorted_indices, unsorted_indices = input
            self.check_input(x, batch_sizes)  # nn.LSTM's own checks and messages
            sizes = tuple(batch_sizes.tolist())
            examples = sizes[0]
        else:
            if input.dim() not in (2, 3):
                raise ShapeError(
                    f"LSTM '{s.key}' expects 2-D or 3-D input; got {input.dim()}-D"
                )
            batched = input.dim() == 3
            x = input if batched else input.unsqueeze(0 if self.batch_first else 1)
            self.check_input(x, None)
            if x.shape[1 if self.batch_first else 0] == 0:
                raise ShapeError(f"LSTM '{s.key}' got a sequence of length 0")
            if self.batch_first:
                x = x.transpose(0, 1)
            batch_sizes = None
            examples = x.shape[1]
            sizes = (examples,) * x.shape[0]
        shape = (self.num_layers * dirs, examples, hidden)
        if hx is None:
            h0 = c0 = x.new_zeros(shape)
        else:
            h0, c0 = hx
            if not packed and not batched:
                h0, c0 = h0.unsqueeze(1), c0.unsqueeze(1)
            if tuple(h0.shape) != shape or tuple(c0.shape) != shape:
                raise ShapeError(
                    f"LSTM '{s.key}' expects (h0, c0) of shape {shape}; got "
                    f"{tuple(h0.shape)} and {tuple(c0.shape)}"
                )
            if packed and sorted_indices is not None:
                h0, c0 = h0.index_select(1, sorted_indices), c0.index_select(1, sorted_indices)
        lay = layout(sizes)
        per_layer = len(weights) // self.num_layers
        h_n, c_n = [], []
        for layer in range(self.num_layers):
            plan = LayerPlan(s, layer, s.k, self.bias, self.bidirectional, batch_sizes, lay)
            span = slice(layer * dirs, (layer + 1) * dirs)
            x, hn, cn = LSTMLayerFn.apply(
                plan, x, h0[span], c0[span],
                *weights[layer * per_layer:(layer + 1) * per_layer],
            )
            if self.dropout and self.training and layer + 1 < self.num_layers:
                x = F.dropout(x, self.dropout, training=True)
            h_n.append(hn)
            c_n.append(cn)
        state = (torch.cat(h_n), torch.cat(c_n))
        if packed:
            if unsorted_indices is not None:
                state = tuple(t.index_select(1, unsorted_indices) for t in state)
            return PackedSequence(x, batch_sizes, sorted_indices, unsorted_indices), state
        if self.batch_first:
            x = x.transpose(0, 1)
        if not batched:
            x = x.squeeze(0 if self.batch_first else 1)
            state = (state[0].squeeze(1), state[1].squeeze(1))
        return x, state

    def extra_repr(self) -> str:  # noqa: D102
        s = self.meprop
        return f"{super().extra_repr()}, k={s.k}, mode={s.mode}"


def _settings(module: nn.LSTM, key: str, k: Any, mode: str, tracker: Any) -> MePropSettings:
    if module.proj_size > 0:
        raise ConfigError(f"meProp does not support nn.LSTM with proj_size > 0 ('{key}')")
    return build_settings(key, module.hidden_size, k, mode, False, tracker)


def _needs_grad(input: Any, hx: Any, weights: list[torch.Tensor]) -> bool:
    data = input.data if isinstance(input, PackedSequence) else input
    if data.requires_grad or any(w.requires_grad for w in weights):
        return True
    return hx is not None and any(t.requires_grad for t in hx)


def _record_dense(module: MePropLSTM, input: Any, output: Any, state: Any, hidden: int) -> None:
    """Dense backprop selects every unit: record that once when the outputs get gradients."""
    s = module.meprop
    if isinstance(input, PackedSequence):
        examples = int(input.batch_sizes[0])
        tensors = [output.data, *state]
    else:
        batched = input.dim() == 3
        examples = (input.shape[0 if module.batch_first else 1]) if batched else 1
        tensors = [output, *state]
    def record() -> None:
        for key in module.layer_keys() if examples else ():  # an empty batch: nothing
            s.tracker.record_selected(key, None, examples, hidden)

    hook = once_per_backward(record)
    for tensor in tensors:
        if tensor.requires_grad:
            tensor.register_hook(hook)
