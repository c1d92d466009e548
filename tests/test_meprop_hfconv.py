"""meProp on Hugging Face's Conv1D (GPT-2's layers): gradients against a dense reference."""

from __future__ import annotations

import copy
import io

import pytest
import torch
from test_meprop_conv import _run  # (x, weight, bias) grads of one backward
from torch import nn

from mesimp_compress.activity import ActivityTracker
from mesimp_compress.meprop import MePropHFConv1D, apply_meprop, remove_meprop
from mesimp_compress.optim import RowSparseAdam

pytorch_utils = pytest.importorskip("transformers.pytorch_utils")
torch.set_num_threads(1)


def _conv(seed: int = 0, nx: int = 6, nf: int = 9) -> nn.Module:
    torch.manual_seed(seed)
    conv = pytorch_utils.Conv1D(nf, nx)
    nn.init.normal_(conv.bias)  # a non-zero bias, so a wrong bias gradient would show
    return conv


def _mask(dy: torch.Tensor, k: int, mode: str) -> torch.Tensor:
    per_example = dy.reshape(dy.shape[0] if dy.dim() > 1 else 1, -1, dy.shape[-1])
    if mode == "unified":
        picks = per_example.abs().sum((0, 1)).topk(k).indices
        return torch.zeros(dy.shape[-1]).index_fill_(0, picks, 1.0).expand_as(dy)
    picks = per_example.abs().sum(1).topk(k, dim=1).indices
    mask = torch.zeros(per_example.shape[0], dy.shape[-1]).scatter_(1, picks, 1.0)
    return mask.unsqueeze(1).expand_as(per_example).reshape(dy.shape)


@pytest.mark.parametrize("mode", ["unified", "per_example"])
@pytest.mark.parametrize("shape", [(1, 6), (4, 6), (3, 5, 6)], ids=["b1", "b4", "seq"])
def test_gradients_equal_the_masked_dense_reference(mode, shape):
    conv = _conv()
    x = torch.randn(shape)
    weights = torch.randn(*shape[:-1], 9)
    seen = {}

    def hook(dy):
        seen["dense_bias"] = dy.reshape(-1, 9).sum(0)
        return dy * _mask(dy, 3, mode)

    gx, gw, _ = _run(copy.deepcopy(conv), x, weights, hook)
    wrapped = MePropHFConv1D.wrap(copy.deepcopy(conv), 3, mode=mode)
    mx, mw, mb = _run(wrapped, x, weights)
    torch.testing.assert_close(mx, gx, atol=1e-5, rtol=0)
    torch.testing.assert_close(mw, gw, atol=1e-5, rtol=0)
    torch.testing.assert_close(mb, seen["dense_bias"], atol=1e-5, rtol=0)
    columns = int((mw.abs().sum(0) > 0).sum())  # the unit is a column of (nx, nf)
    assert columns == 3 if mode == "unified" else 3 <= columns <= 9


def test_k_at_or_above_the_width_is_plain_autograd_and_counts_every_unit():
    conv = _conv(1)
    x, weights = torch.randn(4, 6), torch.randn(4, 9)
    plain = _run(copy.deepcopy(conv), x, weights)
    tracker = ActivityTracker()
    wrapped = MePropHFConv1D.wrap(copy.deepcopy(conv), 9, key="c", tracker=tracker)
    for got, want in zip(_run(wrapped, x, weights), plain, strict=True):
        assert torch.equal(got, want)
    assert torch.equal(tracker.window_hits("c"), torch.full((9,), 4))


def test_activity_counts_the_selected_columns():
    conv = _conv(2)
    x, weights = torch.randn(5, 6), torch.randn(5, 9)
    seen = {}
    _run(copy.deepcopy(conv), x, weights, lambda dy: seen.setdefault("dy", dy))
    tracker = ActivityTracker()
    _run(MePropHFConv1D.wrap(copy.deepcopy(conv), 2, key="c", tracker=tracker), x, weights)
    expected = torch.zeros(9, dtype=torch.int64)
    expected[seen["dy"].abs().sum(0).topk(2).indices] = 5
    assert torch.equal(tracker.window_hits("c"), expected)


def test_apply_and_remove_keep_parameters_outputs_and_copies():
    model = nn.Sequential(_conv(3), nn.ReLU(), _conv(4, nx=9, nf=2))
    x = torch.randn(3, 6)
    expected = model(x)
    weight = model[0].weight
    assert apply_meprop(model, 0.5) == ["0"]  # the Conv1D output layer keeps dense backprop
    assert isinstance(model[0], pytorch_utils.Conv1D) and model[0].weight is weight
    assert model[0].meprop.k == 4 and type(model[2]) is pytorch_utils.Conv1D
    assert torch.equal(model(x), expected)
    copied = copy.deepcopy(model)
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    for other in (copied, loaded):
        assert type(other[0]) is type(model[0]) and other[0].meprop.k == 4
        assert torch.equal(other(x), expected)
    remove_meprop(model)
    assert type(model[0]) is pytorch_utils.Conv1D and model[0].weight is weight
    assert repr(model[0]) == "Conv1D(nf=9, nx=6)"


def test_a_row_sparse_optimizer_steps_the_weight_densely_as_adam_does():
    conv = _conv(5)
    x, weights = torch.randn(4, 6), torch.randn(4, 9)
    params = {}
    for name, make in (("adam", torch.optim.Adam), ("rows", RowSparseAdam)):
        layer = MePropHFConv1D.wrap(copy.deepcopy(conv), 3)
        optimizer = make(layer.parameters(), lr=0.1)
        _run(layer, x, weights)
        optimizer.step()
        params[name] = layer.weight.detach().clone()
    moved = (params["rows"] != conv.weight).any(0)
    assert int(moved.sum()) == 3  # three columns got a gradient; Adam moves only those
    torch.testing.assert_close(params["rows"], params["adam"], atol=1e-6, rtol=0)
