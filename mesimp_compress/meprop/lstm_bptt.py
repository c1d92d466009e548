"""One LSTM layer (both directions) as an autograd Function: native forward, meProp backward.

Forward runs torch's own one-layer LSTM kernel (``_VF.lstm``), so outputs are those of
nn.LSTM. Backward, per direction:

1. select the units S: unified, the top-k of |dL/d out| summed over batch and time plus
   |dL/d h_n| and |dL/d c_n|; per-example, each sequence its own top-k of the same sums
   over its own time steps (S is then the union, with a per-sequence mask);
2. recompute the gates of S only from the saved input and outputs (one matmul with the
   4k gate rows of W_ih and W_hh) and their cell states (an elementwise recurrence);
3. run BPTT restricted to S: dL/dh_t and dL/dc_t are kept for the units of S only, so
   each step is a (batch x 4k) @ (4k x k) matmul; W_ih, W_hh and both biases get gradients
   for the 4k gate rows of S, the layer input gets its gradient through them, and (h0, c0)
   get theirs for the units of S only (the initial state is one more step of the
   restricted recurrence; the other units' entries are zero).

Packed sequences run in their packed layout (rows of step t are the first ``batch_sizes[t]``
sequences), so padded positions never exist here and contribute neither hits nor gradients.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import torch
from torch import _VF
from torch.autograd.function import once_differentiable

from . import rowgrad
from .functions import per_example_units, unified_units
from .settings import MePropSettings

GATES = 4  # input, forget, cell, output: rows [g*H, (g+1)*H) of W_ih, W_hh and the biases


class Layout:
    """Time steps of a batch in packed layout: step t holds rows offsets[t] .. + sizes[t]."""

    def __init__(self, sizes: tuple[int, ...]) -> None:
        self.sizes = sizes
        offsets, total = [], 0
        for size in sizes:
            offsets.append(total)
            total += size
        self.offsets = offsets
        self.rows = total
        self.examples = sizes[0]
        self.uniform = len(set(sizes)) == 1
        self._index: dict[Any, torch.Tensor] = {}

    def order(self, reverse: bool) -> list[tuple[int, int]]:
        """(offset, size) of each step in the order the direction processes them."""
        steps = list(zip(self.offsets, self.sizes, strict=True))
        return steps[::-1] if reverse else steps

    def previous(self, reverse: bool, device: torch.device) -> torch.Tensor:
        """For each row, the row of its previous state in ``cat([states, initial])``."""
        key = ("prev", reverse, device)
        index = self._index.get(key)
        if index is None:
            index = torch.empty(self.rows, dtype=torch.int64)
            last = None
            for off, size in self.order(reverse):
                held = 0 if last is None else min(size, last[1])
                if held:
                    index[off:off + held] = torch.arange(last[0], last[0] + held)
                if size > held:
                    index[off + held:off + size] = torch.arange(self.rows + held, self.rows + size)
                last = (off, size)
            index = self._index[key] = index.to(device)
        return index

    def example(self, device: torch.device) -> torch.Tensor:
        """For each row, the index of its sequence."""
        key = ("example", device)
        index = self._index.get(key)
        if index is None:
            index = torch.cat([torch.arange(size) for size in self.sizes]).to(device)
            self._index[key] = index
        return index


@lru_cache(maxsize=64)
def layout(sizes: tuple[int, ...]) -> Layout:
    """The (cached) layout of a batch with these per-step sizes."""
    return Layout(sizes)


@dataclass
class LayerPlan:
    """What one layer's backward needs besides tensors."""

    settings: MePropSettings
    layer: int
    k: int
    bias: bool
    bidirectional: bool
    batch_sizes: torch.Tensor | None
    layout: Layout


class LSTMLayerFn(torch.autograd.Function):
    """Inputs ``(plan, x, h0, c0, *weights)``; returns ``(out, h_n, c_n)`` of one layer."""

    @staticmethod
    def forward(ctx, plan, x, h0, c0, *weights):  # noqa: D102
        with warnings.catch_warnings():
            # cuDNN warns that one layer's weights are not the whole flat buffer
            warnings.filterwarnings("ignore", message=".*single contiguous chunk")
            out, hn, cn = _one_layer_as_trained(plan, x, h0, c0, weights)
        ctx.save_for_backward(x, h0, c0, out, *weights)
        ctx.plan = plan
        ctx.params = weights
        return out, hn, cn

    @staticmethod
    @once_differentiable
    def backward(ctx, dout, dhn, dcn):  # noqa: D102
        x, h0, c0, out, *weights = ctx.saved_tensors
        if any(t.dtype != out.dtype for t in (x, h0, c0, *weights)):
            # autocast ran the forward in out's precision: the backward computes in it too
            x, h0, c0 = x.to(out.dtype), h0.to(out.dtype), c0.to(out.dtype)
            weights = [w.to(out.dtype) for w in weights]
        plan = ctx.plan
        needs = ctx.needs_input_grad
        if out.numel() == 0:  # no sequences: zero gradients as autograd gives, nothing recorded
            return (None, *_empty_grads(ctx, x, h0, c0))
        dirs = 2 if plan.bidirectional else 1
        per_dir = 4 if plan.bias else 2
        hidden = weights[1].shape[1]
        X = x.reshape(-1, x.shape[-1])
        out2 = out.reshape(-1, dirs * hidden)
        dout2 = dout.reshape(-1, dirs * hidden)
        grad_x = None
        grad_h0 = h0.new_zeros(h0.shape) if needs[2] else None
        grad_c0 = c0.new_zeros(c0.shape) if needs[3] else None
        grads: list[torch.Tensor | None] = []
        for d in range(dirs):
            cols = slice(d * hidden, (d + 1) * hidden)
            w = weights[d * per_dir:(d + 1) * per_dir]
            result = _direction(
                plan, d == 1, X, out2[:, cols], dout2[:, cols], h0[d], c0[d], dhn[d], dcn[d],
                w[0], w[1], w[2] if plan.bias else None, w[3] if plan.bias else None,
            )
            units, rows, dA, W_ih, Hprev, dh0, dc0 = result
            if needs[1]:
                part = dA @ W_ih
                grad_x = part if grad_x is None else grad_x.add_(part)
            if grad_h0 is not None:
                grad_h0[d].index_copy_(1, units, dh0)
            if grad_c0 is not None:
                grad_c0[d].index_copy_(1, units, dc0)
            params = ctx.params[d * per_dir:(d + 1) * per_dir]
            wanted = needs[4 + d * per_dir:4 + (d + 1) * per_dir]
            for param, want, source in zip(params[:2], wanted[:2], (X, Hprev), strict=True):
                grads.append(rowgrad.deliver(param, rows, dA.t() @ source, ctx) if want else None)
            if plan.bias:
                bias_rows = dA.sum(0) if wanted[2] or wanted[3] else None
                for param, want in zip(params[2:], wanted[2:], strict=True):
                    grads.append(rowgrad.deliver(param, rows, bias_rows, ctx) if want else None)
        if grad_x is not None:
            grad_x = grad_x.view(x.shape)
        return (None, grad_x, grad_h0, grad_c0, *grads)


def _empty_grads(ctx: Any, x, h0, c0) -> list[torch.Tensor | None]:
    """The gradients of a batch without sequences: zeros (no rows for a row-sparse
    optimizer)."""
    needs = ctx.needs_input_grad
    grads = [torch.zeros_like(t) if want else None
             for t, want in zip((x, h0, c0), needs[1:4], strict=True)]
    grads += [rowgrad.no_rows(p, ctx) if want else None
              for p, want in zip(ctx.params, needs[4:], strict=True)]
    return grads


def _one_layer_as_trained(plan: LayerPlan, x, h0, c0, weights):
    """:func:`_one_layer` on the kernel path nn.LSTM takes while training (grad on, weights
    requiring grad): torch's CPU LSTM rounds differently without grad, and the outputs must
    be nn.LSTM's to the bit. The graph that builds is dropped."""
    with torch.enable_grad():
        trained = [w.detach().requires_grad_() for w in weights]
        out, hn, cn = _one_layer(plan, x.detach(), h0.detach(), c0.detach(), trained)
    return out.detach(), hn.detach(), cn.detach()


def _one_layer(plan: LayerPlan, x, h0, c0, weights):
    """torch's own LSTM kernel for one layer (both directions)."""
    if plan.batch_sizes is None:
        return _VF.lstm(x, (h0, c0), weights, plan.bias, 1, 0.0, False, plan.bidirectional,
                        False)
    return _VF.lstm(x, plan.batch_sizes, (h0, c0), weights, plan.bias, 1, 0.0, False,
                    plan.bidirectional)


def _direction(plan: LayerPlan, reverse: bool, X, out_d, dout_d, h0, c0, dhn, dcn,
               w_ih, w_hh, b_ih, b_hh):
    """Restricted BPTT of one direction.

    Returns the units, their gate rows, dA (rows x 4k), W_ih's gate rows, h_prev, dh0, dc0.
    """
    s = plan.settings
    lay = plan.layout
    hidden = w_hh.shape[1]
    device = X.device
    mask = None
    if s.mode == "unified":
        score = dout_d.abs().sum(0) + dhn.abs().sum(0) + dcn.abs().sum(0)
        units = unified_units(score, plan.k)
        counts = None
    else:
        if lay.uniform:
            per_seq = dout_d.reshape(-1, lay.examples, hidden).abs().sum(0)
        else:
            per_seq = dout_d.new_zeros(lay.examples, hidden)
            per_seq.index_add_(0, lay.example(device), dout_d.abs())
        per_seq += dhn.abs() + dcn.abs()
        full, counts, units = per_example_units(per_seq, plan.k)
        mask = full.index_select(1, units)
    k = units.numel()
    rows = (units + hidden * torch.arange(GATES, device=device).unsqueeze(1)).reshape(-1)
    W_ih = w_ih.index_select(0, rows)
    W_hh = w_hh.index_select(0, rows)
    W_rec = W_hh.index_select(1, units)
    previous = lay.previous(reverse, device)
    Hprev = torch.cat([out_d, h0]).index_select(0, previous)
    if b_ih is not None:
        A = torch.addmm(b_ih.index_select(0, rows) + b_hh.index_select(0, rows), X, W_ih.t())
    else:
        A = X @ W_ih.t()
    A.addmm_(Hprev, W_hh.t())
    act = A.view(-1, GATES, k).sigmoid()
    gate_i, gate_f, gate_o = act[:, 0], act[:, 1], act[:, 3]
    gate_g = A.view(-1, GATES, k)[:, 2].tanh()
    c0_units = c0.index_select(1, units)
    C = _cell_states(lay.order(reverse), gate_i * gate_g, gate_f, c0_units)
    Cprev = torch.cat([C, c0_units]).index_select(0, previous)
    tc = C.tanh()
    coef = act * (1 - act)
    coef[:, 0].mul_(gate_g)
    coef[:, 1].mul_(Cprev)
    torch.mul(gate_i, 1 - gate_g * gate_g, out=coef[:, 2])
    coef[:, 3].mul_(tc)
    coef_c = gate_o * (1 - tc * tc)
    dA, dh0, dc0 = _bptt(lay.order(reverse), dout_d.index_select(1, units),
                         dhn.index_select(1, units), dcn.index_select(1, units),
                         coef, coef_c, gate_f, W_rec, mask)
    if s.tracker is not None:
        key = f"{s.key}.l{plan.layer}{'_reverse' if reverse else ''}"
        if counts is None:
            s.tracker.record_selected(key, units, lay.examples, hidden)
        else:
            s.tracker.record(key, counts, lay.examples)
    return units, rows, dA.view(-1, GATES * k), W_ih, Hprev, dh0, dc0


def _cell_states(steps, ig, gate_f, c0):
    """Cell states of the selected units, rows in packed layout."""
    C = torch.empty_like(ig)
    prev = c0[:0]
    for off, size in steps:
        held = prev.shape[0]
        start = prev[:size] if held >= size else torch.cat([prev, c0[held:size]])
        prev = torch.addcmul(ig[off:off + size], gate_f[off:off + size], start,
                             out=C[off:off + size])
    return C


def _bptt(steps, dout, dhn, dcn, coef, coef_c, gate_f, W_rec, mask):
    """Backward through time for the selected units; dA (rows x 4 x k), dh0 and dc0."""
    k = dout.shape[1]
    dA = torch.empty_like(coef)
    if mask is not None:
        dhn = dhn * mask
        dcn = dcn * mask
    dh0 = dout.new_zeros(dhn.shape)
    dc0 = dout.new_zeros(dcn.shape)
    last = steps[-1][1]
    carry_h, carry_c = dhn[:last], dcn[:last]
    for j in range(len(steps) - 1, -1, -1):
        off, size = steps[j]
        rows = slice(off, off + size)
        dh = dout[rows] + carry_h
        if mask is not None:
            dh.mul_(mask[:size])
        dc = torch.addcmul(carry_c, dh, coef_c[rows])
        block = dA[rows]
        torch.mul(coef[rows, :3], dc.unsqueeze(1), out=block[:, :3])
        torch.mul(coef[rows, 3], dh, out=block[:, 3])
        dh_prev = block.view(size, GATES * k) @ W_rec
        dc_prev = dc * gate_f[rows]
        before = steps[j - 1][1] if j else 0
        if before > size:
            carry_h = torch.cat([dh_prev, dhn[size:before]])
            carry_c = torch.cat([dc_prev, dcn[size:before]])
        elif before == size:
            carry_h, carry_c = dh_prev, dc_prev
        else:
            dh0[before:size] = dh_prev[before:]
            dc0[before:size] = dc_prev[before:]
            carry_h, carry_c = dh_prev[:before], dc_prev[:before]
    if mask is not None:
        dh0.mul_(mask)
    return dA, dh0, dc0
