"""MePropLinear: gradients against a dense reference with the same top-k mask."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from mesimp_compress.activity import ActivityTracker
from mesimp_compress.errors import KError
from mesimp_compress.meprop import MePropLinear, native

torch.set_num_threads(1)


@pytest.fixture(autouse=True, params=["compiled", "python"])
def backward(request):
    """Every test against both backward paths (the compiled one where it is built)."""
    if request.param == "compiled":
        if native.module() is None:
            pytest.skip("compiled meProp backward not built")
        yield request.param
    else:
        with native.disabled():
            yield request.param


def _mask(dy: torch.Tensor, k: int, mode: str) -> torch.Tensor:
    """The meProp mask of dy (examples along dim 0, positions in between, units last)."""
    width = dy.shape[-1]
    per_example = dy.reshape(dy.shape[0] if dy.dim() > 1 else 1, -1, width)
    if mode == "unified":
        idx = per_example.abs().sum((0, 1)).topk(k).indices
        mask = torch.zeros(width, dtype=dy.dtype).index_fill_(0, idx, 1.0)
        return mask.expand_as(dy)
    idx = per_example.abs().sum(1).topk(k, dim=1).indices
    mask = torch.zeros(per_example.shape[0], width, dtype=dy.dtype).scatter_(1, idx, 1.0)
    return mask.unsqueeze(1).expand_as(per_example).reshape(dy.shape)


def _reference(layer: nn.Linear, x: torch.Tensor, weights: torch.Tensor, k: int, mode: str,
               sparse_bias: bool):
    """Plain autograd with dy masked by the meProp rule (dense bias grad unless sparse)."""
    ref = copy.deepcopy(layer)
    xr = x.detach().clone().requires_grad_()
    y = ref(xr)
    seen = {}

    def hook(dy):
        seen["dy"] = dy
        return dy * _mask(dy, k, mode)

    y.register_hook(hook)
    (y * weights + y.pow(2)).sum().backward()
    bias_grad = None
    if ref.bias is not None:
        bias_grad = ref.bias.grad if sparse_bias else seen["dy"].reshape(-1, y.shape[-1]).sum(0)
    return xr.grad, ref.weight.grad, bias_grad, seen["dy"]


def _meprop(layer: nn.Linear, x: torch.Tensor, weights: torch.Tensor, **kw):
    mep = MePropLinear.wrap(copy.deepcopy(layer), **kw)
    xm = x.detach().clone().requires_grad_()
    y = mep(xm)
    (y * weights + y.pow(2)).sum().backward()
    return xm.grad, mep.weight.grad, None if mep.bias is None else mep.bias.grad


@pytest.mark.parametrize("mode", ["unified", "per_example"])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("shape", [(1, 7), (5, 7), (7,), (3, 4, 7)])
@pytest.mark.parametrize("sparse_bias", [False, True])
def test_gradients_equal_masked_dense_reference(mode, bias, shape, sparse_bias):
    torch.manual_seed(0)
    layer = nn.Linear(7, 9, bias=bias)
    x = torch.randn(shape)
    weights = torch.randn(*shape[:-1], 9)
    gx, gw, gb, _ = _reference(layer, x, weights, 3, mode, sparse_bias)
    mx, mw, mb = _meprop(layer, x, weights, k=3, mode=mode, sparse_bias=sparse_bias)
    torch.testing.assert_close(mx, gx, atol=1e-5, rtol=0)
    torch.testing.assert_close(mw, gw, atol=1e-5, rtol=0)
    if bias:
        torch.testing.assert_close(mb, gb, atol=1e-5, rtol=0)
    # only rows of selected units got a weight gradient
    assert int((mw.abs().sum(1) > 0).sum()) <= (3 if mode == "unified" else 9)
    if mode == "unified":
        assert int((mw.abs().sum(1) > 0).sum()) == 3


@pytest.mark.parametrize("mode", ["unified", "per_example"])
@pytest.mark.parametrize("k", [9, 20, 1.0])
def test_k_at_or_above_width_is_exact_autograd(mode, k):
    torch.manual_seed(1)
    layer = nn.Linear(6, 9)
    x = torch.randn(4, 6)
    weights = torch.randn(4, 9)
    ref = copy.deepcopy(layer)
    xr = x.clone().requires_grad_()
    (ref(xr) * weights).sum().backward()
    xm = x.clone().requires_grad_()
    mep = MePropLinear.wrap(copy.deepcopy(layer), k, mode=mode)
    (mep(xm) * weights).sum().backward()
    assert torch.equal(xm.grad, xr.grad)
    assert torch.equal(mep.weight.grad, ref.weight.grad)
    assert torch.equal(mep.bias.grad, ref.bias.grad)


def test_forward_is_unchanged():
    torch.manual_seed(2)
    layer = nn.Linear(5, 6)
    x = torch.randn(3, 5, requires_grad=True)
    expected = layer(x)
    mep = MePropLinear.wrap(layer, 2)
    assert torch.equal(mep(x), expected)
    with torch.no_grad():
        assert torch.equal(mep(x), expected)


def test_unified_activity_is_batch_size_for_selected_units():
    torch.manual_seed(3)
    tracker = ActivityTracker()
    layer = nn.Linear(4, 10)
    x = torch.randn(6, 4)
    weights = torch.randn(6, 10)
    _, _, _, dy = _reference(layer, x, weights, 3, "unified", False)
    _meprop(layer, x, weights, k=3, tracker=tracker, key="fc")
    expected = torch.zeros(10, dtype=torch.int64)
    expected[dy.abs().sum(0).topk(3).indices] = 6
    assert torch.equal(tracker.window_hits("fc"), expected)
    assert tracker.window_examples("fc") == 6


def test_per_example_activity_counts_examples_per_unit():
    torch.manual_seed(4)
    tracker = ActivityTracker()
    layer = nn.Linear(4, 10)
    x = torch.randn(2, 3, 4)  # 2 examples of 3 positions
    weights = torch.randn(2, 3, 10)
    _, _, _, dy = _reference(layer, x, weights, 4, "per_example", False)
    _meprop(layer, x, weights, k=4, mode="per_example", tracker=tracker, key="fc")
    expected = torch.zeros(10, dtype=torch.int64)
    for example in dy:
        expected[example.abs().sum(0).topk(4).indices] += 1
    assert torch.equal(tracker.window_hits("fc"), expected)
    assert tracker.window_examples("fc") == 2
    assert int(expected.sum()) == 8


def test_dense_k_records_every_unit():
    tracker = ActivityTracker()
    mep = MePropLinear(3, 5, k=5, tracker=tracker, key="fc")
    mep(torch.randn(4, 3)).sum().backward()
    assert torch.equal(tracker.window_hits("fc"), torch.full((5,), 4))


def test_k_none_is_plain_linear_without_activity():
    tracker = ActivityTracker()
    mep = MePropLinear(3, 5, k=None, tracker=tracker, key="fc")
    mep(torch.randn(4, 3)).sum().backward()
    assert tracker.keys() == []
    assert mep.weight.grad is not None


def test_fraction_is_of_the_width_at_wrap_time_and_capped_after_shrinking():
    torch.manual_seed(5)
    mep = MePropLinear(4, 8, k=0.25)
    assert mep.meprop.k == 2 and mep.meprop.original_width == 8
    # surgery shrinks the layer to 3 units: k stays 2, selecting 2 of the 3 rows
    with torch.no_grad():
        mep.weight = nn.Parameter(mep.weight[:3].clone())
        mep.bias = nn.Parameter(mep.bias[:3].clone())
    mep.out_features = 3
    mep(torch.randn(5, 4)).pow(2).sum().backward()
    assert int((mep.weight.grad.abs().sum(1) > 0).sum()) == 2
    # k above the new width is dense
    mep.meprop.k = 6
    mep.weight.grad = None
    mep(torch.randn(5, 4)).pow(2).sum().backward()
    assert int((mep.weight.grad.abs().sum(1) > 0).sum()) == 3


@pytest.mark.parametrize("bad", [0, -3, 0.0, 1.5, -0.2, float("nan"), True, "3", [3]])
def test_bad_k_raises_kerror_naming_layer_and_value(bad):
    with pytest.raises(KError) as err:
        MePropLinear.wrap(nn.Linear(3, 4), bad, key="encoder.fc1")
    assert "encoder.fc1" in str(err.value)
    assert repr(bad) in str(err.value)


def test_wrap_keeps_parameters_and_unwrap_restores_class():
    layer = nn.Linear(3, 4)
    weight, bias = layer.weight, layer.bias
    keys = list(layer.state_dict())
    mep = MePropLinear.wrap(layer, 2)
    assert mep is layer and isinstance(mep, nn.Linear)
    assert mep.weight is weight and mep.bias is bias
    assert list(mep.state_dict()) == keys
    plain = mep.unwrap()
    assert type(plain) is nn.Linear and plain.weight is weight
    assert not hasattr(plain, "meprop")


def test_create_graph_gives_first_order_gradients_and_refuses_a_second_order():
    torch.manual_seed(4)
    layer = nn.Linear(6, 5)
    x, weights = torch.randn(3, 6), torch.randn(3, 5)
    expected = _meprop(layer, x, weights, k=2)
    mep = MePropLinear.wrap(copy.deepcopy(layer), k=2)
    xm = x.clone().requires_grad_()
    y = mep(xm)
    (grad_x,) = torch.autograd.grad((y * weights + y.pow(2)).sum(), xm, create_graph=True)
    torch.testing.assert_close(grad_x, expected[0], atol=1e-6, rtol=0)
    with pytest.raises(RuntimeError, match="differentiate twice"):
        grad_x.sum().backward()


@pytest.mark.parametrize("mode", ["unified", "per_example"])
@pytest.mark.parametrize("shape", [(0, 6), (0, 3, 6)])
def test_an_empty_batch_gives_zero_gradients_like_plain_autograd(mode, shape):
    layer = nn.Linear(6, 5)
    tracker = ActivityTracker()
    mep = MePropLinear.wrap(copy.deepcopy(layer), k=2, mode=mode, tracker=tracker, key="fc")
    for module in (layer, mep):
        x = torch.randn(*shape, requires_grad=True)
        module(x).sum().backward()
        assert x.grad.shape == x.shape
    assert torch.equal(mep.weight.grad, layer.weight.grad)  # zeros
    assert torch.equal(mep.bias.grad, layer.bias.grad)
    assert tracker.keys() == []
