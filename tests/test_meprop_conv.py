"""MePropConv1d/2d: gradients against a dense reference with the same top-k channel mask."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from mesimp_compress.activity import ActivityTracker
from mesimp_compress.errors import KError
from mesimp_compress.meprop import MePropConv1d, MePropConv2d

torch.set_num_threads(1)


def _spatial(dy: torch.Tensor) -> tuple[int, ...]:
    return tuple(range(2, dy.dim()))


def _per_channel(mask: torch.Tensor, dy: torch.Tensor) -> torch.Tensor:
    return mask.reshape(*mask.shape, *(1 for _ in _spatial(dy))).expand_as(dy)


def _mask(dy: torch.Tensor, k: int, mode: str) -> torch.Tensor:
    channels = dy.shape[1]
    if mode == "unified":
        idx = dy.abs().sum((0, *_spatial(dy))).topk(k).indices
        return _per_channel(torch.zeros(1, channels).index_fill_(1, idx, 1.0), dy)
    idx = dy.abs().sum(_spatial(dy)).topk(k, dim=1).indices
    return _per_channel(torch.zeros(dy.shape[0], channels).scatter_(1, idx, 1.0), dy)


def _run(layer: nn.Module, x: torch.Tensor, weights: torch.Tensor, hook=None):
    xr = x.detach().clone().requires_grad_()
    y = layer(xr)
    if hook is not None:
        y.register_hook(hook)
    (y * weights + y.pow(2)).sum().backward()
    return xr.grad, layer.weight.grad, None if layer.bias is None else layer.bias.grad


def _reference(conv: nn.Module, x: torch.Tensor, weights: torch.Tensor, k: int | None = None,
               mode: str = "unified"):
    """Plain autograd, dy masked by the meProp rule when k is given; also dy and dense bias."""
    seen = {}
    batched_dims = conv.weight.dim()  # (out, in, *kernel): a batched input has as many

    def hook(dy):
        batched = dy if dy.dim() == batched_dims else dy.unsqueeze(0)
        seen["dy"] = batched
        seen["dense_bias"] = batched.sum((0, *_spatial(batched)))
        return (batched * _mask(batched, k, mode)).reshape(dy.shape)

    return (*_run(copy.deepcopy(conv), x, weights, hook if k is not None else None), seen)


def _meprop(conv: nn.Module, x: torch.Tensor, weights: torch.Tensor, **kw):
    wrapper = MePropConv1d if isinstance(conv, nn.Conv1d) else MePropConv2d
    return _run(wrapper.wrap(copy.deepcopy(conv), **kw), x, weights)


def _conv(dims: int, *args, **kwargs) -> nn.Module:
    return (nn.Conv1d if dims == 1 else nn.Conv2d)(*args, **kwargs)


def _input(dims: int, *shape: int) -> torch.Tensor:
    """A random input of ``shape`` then 7 (1-d) or 7 x 6 (2-d) positions."""
    return torch.randn(*shape, *((7,) if dims == 1 else (7, 6)))


CONVS = {
    "plain": lambda d, bias: _conv(d, 3, 8, 3, bias=bias),
    "stride_pad_dilation": lambda d, bias: _conv(d, 3, 8, 3, stride=2, padding=2, dilation=2,
                                                 bias=bias),
    "groups": lambda d, bias: _conv(d, 4, 8, 3, padding=1, groups=2, bias=bias),
    "reflect": lambda d, bias: _conv(d, 3, 8, 3, padding=1, padding_mode="reflect", bias=bias),
    "same": lambda d, bias: _conv(d, 3, 8, 4, padding="same", bias=bias),
}
DIMS = pytest.mark.parametrize("dims", [1, 2], ids=["conv1d", "conv2d"])


@pytest.mark.filterwarnings("ignore:Using padding='same'")
@DIMS
@pytest.mark.parametrize("kind", list(CONVS))
@pytest.mark.parametrize("mode", ["unified", "per_example"])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("batch", [1, 3])
def test_gradients_equal_masked_dense_reference(dims, kind, mode, bias, batch):
    torch.manual_seed(0)
    conv = CONVS[kind](dims, bias)
    x = _input(dims, batch, conv.in_channels)
    weights = torch.randn(conv(x).shape)
    gx, gw, _, seen = _reference(conv, x, weights, 3, mode)
    mx, mw, mb = _meprop(conv, x, weights, k=3, mode=mode)
    torch.testing.assert_close(mx, gx, atol=1e-5, rtol=0)
    torch.testing.assert_close(mw, gw, atol=1e-5, rtol=0)
    if bias:
        torch.testing.assert_close(mb, seen["dense_bias"], atol=1e-5, rtol=0)
    filters = int((mw.flatten(1).abs().sum(1) > 0).sum())
    assert filters == 3 if mode == "unified" else filters <= min(8, 3 * batch)


@DIMS
@pytest.mark.parametrize("mode", ["unified", "per_example"])
def test_sparse_bias_follows_the_mask(dims, mode):
    torch.manual_seed(1)
    conv = _conv(dims, 2, 6, 3)
    x = _input(dims, 2, 2)
    weights = torch.randn(conv(x).shape)
    _, _, gb, _ = _reference(conv, x, weights, 2, mode)
    _, _, mb = _meprop(conv, x, weights, k=2, mode=mode, sparse_bias=True)
    torch.testing.assert_close(mb, gb, atol=1e-5, rtol=0)


@DIMS
def test_unbatched_input(dims):
    torch.manual_seed(2)
    conv = _conv(dims, 2, 5, 3)
    x = _input(dims, 2)
    weights = torch.randn(conv(x).shape)
    gx, gw, _, _ = _reference(conv, x, weights, 2)
    mx, mw, _ = _meprop(conv, x, weights, k=2)
    assert mx.shape == x.shape
    torch.testing.assert_close(mx, gx, atol=1e-5, rtol=0)
    torch.testing.assert_close(mw, gw, atol=1e-5, rtol=0)


@DIMS
@pytest.mark.parametrize("kind", ["plain", "reflect"])
def test_k_at_or_above_width_is_exact_autograd(dims, kind):
    torch.manual_seed(3)
    conv = CONVS[kind](dims, True)
    x = _input(dims, 2, 3)
    weights = torch.randn(conv(x).shape)
    gx, gw, gb, _ = _reference(conv, x, weights)
    mx, mw, mb = _meprop(conv, x, weights, k=8)
    assert torch.equal(mx, gx) and torch.equal(mw, gw) and torch.equal(mb, gb)


@DIMS
def test_forward_is_unchanged(dims):
    torch.manual_seed(4)
    conv = _conv(dims, 3, 4, 3, padding=1, padding_mode="circular")
    x = _input(dims, 2, 3).requires_grad_()
    expected = conv(x)
    wrapper = MePropConv1d if dims == 1 else MePropConv2d
    assert torch.equal(wrapper.wrap(conv, 2)(x), expected)


@DIMS
def test_activity_unified_and_per_example(dims):
    torch.manual_seed(5)
    conv = _conv(dims, 2, 6, 3)
    x = _input(dims, 4, 2)
    weights = torch.randn(conv(x).shape)
    _, _, _, seen = _reference(conv, x, weights, 2)
    dy = seen["dy"]
    tracker = ActivityTracker()
    _meprop(conv, x, weights, k=2, tracker=tracker, key="c")
    expected = torch.zeros(6, dtype=torch.int64)
    expected[dy.abs().sum((0, *_spatial(dy))).topk(2).indices] = 4
    assert torch.equal(tracker.window_hits("c"), expected)
    tracker = ActivityTracker()
    _meprop(conv, x, weights, k=2, mode="per_example", tracker=tracker, key="c")
    expected = torch.zeros(6, dtype=torch.int64)
    for example in dy:
        expected[example.abs().sum(tuple(range(1, example.dim()))).topk(2).indices] += 1
    assert torch.equal(tracker.window_hits("c"), expected)
    assert tracker.window_examples("c") == 4


def test_bad_k_names_layer():
    with pytest.raises(KError, match=r"'features\.0'.*-1"):
        MePropConv2d.wrap(nn.Conv2d(1, 2, 3), -1, key="features.0")
    with pytest.raises(KError, match=r"'encoder\.conv'.*1\.5"):
        MePropConv1d.wrap(nn.Conv1d(1, 2, 3), 1.5, key="encoder.conv")


@pytest.mark.parametrize(("wrapper", "base"), [(MePropConv1d, nn.Conv1d),
                                                (MePropConv2d, nn.Conv2d)])
def test_constructor_and_parameters(wrapper, base):
    conv = wrapper(2, 4, 3, k=0.5, key="c")
    assert conv.meprop.k == 2 and isinstance(conv, base)
    weight = conv.weight
    plain = conv.unwrap()
    assert type(plain) is base and plain.weight is weight


@DIMS
@pytest.mark.parametrize("mode", ["unified", "per_example"])
def test_an_empty_batch_gives_zero_gradients_like_plain_autograd(dims, mode):
    layer = _conv(dims, 3, 6, 3)
    wrapper = MePropConv1d if dims == 1 else MePropConv2d
    mep = wrapper.wrap(copy.deepcopy(layer), k=2, mode=mode)
    for module in (layer, mep):
        x = _input(dims, 0, 3).requires_grad_()
        module(x).sum().backward()
        assert x.grad.shape == x.shape
    assert torch.equal(mep.weight.grad, layer.weight.grad)
    assert torch.equal(mep.bias.grad, layer.bias.grad)
