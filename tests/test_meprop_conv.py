"""MePropConv2d: gradients against a dense reference with the same top-k channel mask."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from mesimp_compress.activity import ActivityTracker
from mesimp_compress.errors import KError
from mesimp_compress.meprop import MePropConv2d

torch.set_num_threads(1)


def _mask(dy: torch.Tensor, k: int, mode: str) -> torch.Tensor:
    channels = dy.shape[1]
    if mode == "unified":
        idx = dy.abs().sum((0, 2, 3)).topk(k).indices
        mask = torch.zeros(channels).index_fill_(0, idx, 1.0)
        return mask[None, :, None, None].expand_as(dy)
    idx = dy.abs().sum((2, 3)).topk(k, dim=1).indices
    mask = torch.zeros(dy.shape[0], channels).scatter_(1, idx, 1.0)
    return mask[:, :, None, None].expand_as(dy)


def _run(layer: nn.Module, x: torch.Tensor, weights: torch.Tensor, hook=None):
    xr = x.detach().clone().requires_grad_()
    y = layer(xr)
    if hook is not None:
        y.register_hook(hook)
    (y * weights + y.pow(2)).sum().backward()
    return xr.grad, layer.weight.grad, None if layer.bias is None else layer.bias.grad


def _reference(conv: nn.Conv2d, x: torch.Tensor, weights: torch.Tensor, k: int | None = None,
               mode: str = "unified"):
    """Plain autograd, dy masked by the meProp rule when k is given; also dy and dense bias."""
    seen = {}

    def hook(dy):
        batched = dy if dy.dim() == 4 else dy.unsqueeze(0)
        seen["dy"] = batched
        seen["dense_bias"] = batched.sum((0, 2, 3))
        return (batched * _mask(batched, k, mode)).reshape(dy.shape)

    return (*_run(copy.deepcopy(conv), x, weights, hook if k is not None else None), seen)


def _meprop(conv: nn.Conv2d, x: torch.Tensor, weights: torch.Tensor, **kw):
    return _run(MePropConv2d.wrap(copy.deepcopy(conv), **kw), x, weights)


CONVS = {
    "plain": lambda bias: nn.Conv2d(3, 8, 3, bias=bias),
    "stride_pad_dilation": lambda bias: nn.Conv2d(3, 8, 3, stride=2, padding=2, dilation=2,
                                                  bias=bias),
    "groups": lambda bias: nn.Conv2d(4, 8, 3, padding=1, groups=2, bias=bias),
    "reflect": lambda bias: nn.Conv2d(3, 8, 3, padding=1, padding_mode="reflect", bias=bias),
    "same": lambda bias: nn.Conv2d(3, 8, 4, padding="same", bias=bias),
}


@pytest.mark.filterwarnings("ignore:Using padding='same'")
@pytest.mark.parametrize("kind", list(CONVS))
@pytest.mark.parametrize("mode", ["unified", "per_example"])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("batch", [1, 3])
def test_gradients_equal_masked_dense_reference(kind, mode, bias, batch):
    torch.manual_seed(0)
    conv = CONVS[kind](bias)
    x = torch.randn(batch, conv.in_channels, 7, 6)
    weights = torch.randn(conv(x).shape)
    gx, gw, _, seen = _reference(conv, x, weights, 3, mode)
    mx, mw, mb = _meprop(conv, x, weights, k=3, mode=mode)
    torch.testing.assert_close(mx, gx, atol=1e-5, rtol=0)
    torch.testing.assert_close(mw, gw, atol=1e-5, rtol=0)
    if bias:
        torch.testing.assert_close(mb, seen["dense_bias"], atol=1e-5, rtol=0)
    filters = int((mw.flatten(1).abs().sum(1) > 0).sum())
    assert filters == 3 if mode == "unified" else filters <= min(8, 3 * batch)


@pytest.mark.parametrize("mode", ["unified", "per_example"])
def test_sparse_bias_follows_the_mask(mode):
    torch.manual_seed(1)
    conv = nn.Conv2d(2, 6, 3)
    x = torch.randn(2, 2, 5, 5)
    weights = torch.randn(2, 6, 3, 3)
    _, _, gb, _ = _reference(conv, x, weights, 2, mode)
    _, _, mb = _meprop(conv, x, weights, k=2, mode=mode, sparse_bias=True)
    torch.testing.assert_close(mb, gb, atol=1e-5, rtol=0)


def test_unbatched_input():
    torch.manual_seed(2)
    conv = nn.Conv2d(2, 5, 3)
    x = torch.randn(2, 6, 6)
    weights = torch.randn(5, 4, 4)
    gx, gw, _, _ = _reference(conv, x, weights, 2)
    mx, mw, _ = _meprop(conv, x, weights, k=2)
    torch.testing.assert_close(mx, gx, atol=1e-5, rtol=0)
    torch.testing.assert_close(mw, gw, atol=1e-5, rtol=0)


@pytest.mark.parametrize("kind", ["plain", "reflect"])
def test_k_at_or_above_width_is_exact_autograd(kind):
    torch.manual_seed(3)
    conv = CONVS[kind](True)
    x = torch.randn(2, 3, 6, 6)
    weights = torch.randn(conv(x).shape)
    gx, gw, gb, _ = _reference(conv, x, weights)
    mx, mw, mb = _meprop(conv, x, weights, k=8)
    assert torch.equal(mx, gx) and torch.equal(mw, gw) and torch.equal(mb, gb)


def test_forward_is_unchanged():
    torch.manual_seed(4)
    conv = nn.Conv2d(3, 4, 3, padding=1, padding_mode="circular")
    x = torch.randn(2, 3, 5, 5, requires_grad=True)
    expected = conv(x)
    assert torch.equal(MePropConv2d.wrap(conv, 2)(x), expected)


def test_activity_unified_and_per_example():
    torch.manual_seed(5)
    conv = nn.Conv2d(2, 6, 3)
    x = torch.randn(4, 2, 5, 5)
    weights = torch.randn(4, 6, 3, 3)
    _, _, _, seen = _reference(conv, x, weights, 2)
    dy = seen["dy"]
    tracker = ActivityTracker()
    _meprop(conv, x, weights, k=2, tracker=tracker, key="c")
    expected = torch.zeros(6, dtype=torch.int64)
    expected[dy.abs().sum((0, 2, 3)).topk(2).indices] = 4
    assert torch.equal(tracker.window_hits("c"), expected)
    tracker = ActivityTracker()
    _meprop(conv, x, weights, k=2, mode="per_example", tracker=tracker, key="c")
    expected = torch.zeros(6, dtype=torch.int64)
    for example in dy:
        expected[example.abs().sum((1, 2)).topk(2).indices] += 1
    assert torch.equal(tracker.window_hits("c"), expected)
    assert tracker.window_examples("c") == 4


def test_bad_k_names_layer():
    with pytest.raises(KError, match=r"'features\.0'.*-1"):
        MePropConv2d.wrap(nn.Conv2d(1, 2, 3), -1, key="features.0")


def test_constructor_and_parameters():
    conv = MePropConv2d(2, 4, 3, k=0.5, key="c")
    assert conv.meprop.k == 2 and isinstance(conv, nn.Conv2d)
    weight = conv.weight
    plain = conv.unwrap()
    assert type(plain) is nn.Conv2d and plain.weight is weight


@pytest.mark.parametrize("mode", ["unified", "per_example"])
def test_an_empty_batch_gives_zero_gradients_like_plain_autograd(mode):
    layer = nn.Conv2d(3, 6, 3)
    mep = MePropConv2d.wrap(copy.deepcopy(layer), k=2, mode=mode)
    for module in (layer, mep):
        x = torch.randn(0, 3, 5, 5, requires_grad=True)
        module(x).sum().backward()
        assert x.grad.shape == x.shape
    assert torch.equal(mep.weight.grad, layer.weight.grad)
    assert torch.equal(mep.bias.grad, layer.bias.grad)
