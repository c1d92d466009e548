"""apply_meprop / remove_meprop / set_k / wrapped_layers on whole models."""

from __future__ import annotations

import copy
import io

import pytest
import torch
from torch import nn

from mesimp_compress.activity import ActivityTracker
from mesimp_compress.errors import ConfigError, KError, UnsupportedStructureError
from mesimp_compress.meprop import (
    MePropConv2d,
    MePropLinear,
    MePropLSTM,
    apply_meprop,
    output_layer_of,
    remove_meprop,
    set_k,
    wrapped_layers,
)

torch.set_num_threads(1)


class Net(nn.Module):
    """Conv -> Linear -> LSTM -> Linear head, with a Linear subclass that is not eligible."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3)
        self.proj = nn.Linear(16, 8)
        self.rnn = nn.LSTM(8, 6, bidirectional=True)
        self.attn = nn.MultiheadAttention(12, 2)  # its out_proj is a Linear subclass
        self.head = nn.Linear(12, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (T, N, 1, 4, 4)
        T, N = x.shape[:2]
        h = self.conv(x.flatten(0, 1)).relu().flatten(1)[:, :16]
        h = self.proj(h).view(T, N, 8)
        h, _ = self.rnn(h)
        return self.head(h)


def _net_and_input(seed: int = 0):
    torch.manual_seed(seed)
    return Net(), torch.randn(5, 2, 1, 4, 4)


def test_default_wraps_every_eligible_layer_but_the_output_layer():
    net, x = _net_and_input()
    params = {n: p for n, p in net.named_parameters()}
    keys = list(net.state_dict())
    expected = net(x)
    names = apply_meprop(net, 2)
    assert names == ["conv", "proj", "rnn"]
    assert type(net.conv) is MePropConv2d and type(net.proj) is MePropLinear
    assert type(net.rnn) is MePropLSTM and type(net.head) is nn.Linear
    assert type(net.attn.out_proj) is not MePropLinear
    assert all(p is params[n] for n, p in net.named_parameters())
    assert list(net.state_dict()) == keys
    with torch.no_grad():  # inference runs the native kernels, as unwrapped
        inference = net(x)
        remove_meprop(net)
        assert torch.equal(net(x), inference)
        apply_meprop(net, 2)
    # training runs the LSTM's own top-k recurrence: the same sums in another order (~1 ulp)
    torch.testing.assert_close(net(x), expected, atol=1e-6, rtol=0)
    assert set(wrapped_layers(net)) == {"conv", "proj", "rnn"}


def test_trained_weights_survive_remove_and_optimizer_keeps_working():
    net, x = _net_and_input(1)
    optimizer = torch.optim.SGD(net.parameters(), lr=0.1)  # built before wrapping
    before = {n: p.detach().clone() for n, p in net.named_parameters()}
    tracker = ActivityTracker()
    apply_meprop(net, 2, tracker=tracker)
    net(x).pow(2).sum().backward()
    optimizer.step()
    changed = {n for n, p in net.named_parameters() if not torch.equal(p, before[n])}
    assert {"conv.weight", "proj.weight", "rnn.weight_ih_l0", "head.weight"} <= changed
    # only k rows of each wrapped weight moved
    moved = (net.proj.weight != before["proj.weight"]).any(1)
    assert int(moved.sum()) == 2
    trained = {n: p.detach().clone() for n, p in net.named_parameters()}
    out = net(x)
    params = list(net.parameters())
    assert remove_meprop(net) is net
    assert type(net.conv) is nn.Conv2d and type(net.proj) is nn.Linear
    assert type(net.rnn) is nn.LSTM
    assert wrapped_layers(net) == {}
    assert all(a is b for a, b in zip(net.parameters(), params, strict=True))
    assert all(torch.equal(p, trained[n]) for n, p in net.named_parameters())
    torch.testing.assert_close(net(x), out, atol=1e-6, rtol=1e-6)  # native LSTM vs meProp's
    assert set(tracker.keys()) == {"conv", "proj", "rnn.l0", "rnn.l0_reverse"}


def test_include_exclude_and_named_output_layer():
    net, _ = _net_and_input()
    assert apply_meprop(net, 2, include=["p*", "r*"]) == ["proj", "rnn"]
    remove_meprop(net)
    assert apply_meprop(net, 2, exclude="rnn") == ["conv", "proj"]
    remove_meprop(net)
    assert apply_meprop(net, 2, output_layer="rnn") == ["conv", "proj", "head"]
    remove_meprop(net)
    assert output_layer_of(net) == "head"


def test_errors_for_bad_settings():
    net, _ = _net_and_input()
    with pytest.raises(UnsupportedStructureError, match="classifier"):
        apply_meprop(net, 2, output_layer="classifier")
    with pytest.raises(ConfigError, match="nothing_like_this"):
        apply_meprop(net, 2, include="nothing_like_this")
    with pytest.raises(ConfigError, match="cannot wrap"):
        apply_meprop(net, 2, include="attn.out_proj")
    with pytest.raises(ConfigError, match="mode"):
        apply_meprop(net, 2, mode="sometimes")
    with pytest.raises(KError, match=r"'conv'.*-2"):
        apply_meprop(net, -2)
    with pytest.raises(KError, match=r"1\.5"):
        apply_meprop(net, 1.5)
    with pytest.raises(ConfigError, match="tracker must be an ActivityTracker.*got int"):
        apply_meprop(net, 2, tracker=5)  # it failed only inside the first backward
    for call in (apply_meprop, set_k):
        with pytest.raises(ConfigError, match=f"{call.__name__} needs an nn.Module; got str"):
            call("net", 2)
    with pytest.raises(ConfigError, match="remove_meprop needs an nn.Module; got str"):
        remove_meprop("net")
    assert wrapped_layers(net) == {}  # nothing half-applied
    apply_meprop(net, 2)
    with pytest.raises(ConfigError, match="already"):
        apply_meprop(net, 2)


def test_set_k_fraction_uses_width_at_wrap_time():
    net, _ = _net_and_input()
    apply_meprop(net, 0.5)
    assert net.conv.meprop.k == 2 and net.proj.meprop.k == 4 and net.rnn.meprop.k == 3
    net.proj.weight.data = net.proj.weight.data[:5]  # surgery-like shrink
    net.proj.bias.data = net.proj.bias.data[:5]
    set_k(net, 0.25)
    assert net.proj.meprop.k == 2 and net.rnn.meprop.k == 2  # of 8 and 6, not of 5
    set_k(net, 3)
    assert {m.meprop.k for m in wrapped_layers(net).values()} == {3}
    with pytest.raises(KError, match=r"'conv'.*got 0"):
        set_k(net, 0)
    assert net.proj.meprop.k == 3  # unchanged after the error
    set_k(net, None)
    assert {m.meprop.k for m in wrapped_layers(net).values()} == {None}


def test_set_k_none_gives_exact_dense_gradients_and_no_activity():
    net, x = _net_and_input(2)
    reference = copy.deepcopy(net)
    reference(x).pow(2).sum().backward()
    tracker = ActivityTracker()
    apply_meprop(net, 2, tracker=tracker)
    set_k(net, None)
    net(x).pow(2).sum().backward()
    for (name, a), b in zip(net.named_parameters(), reference.parameters(), strict=True):
        if name.startswith("attn."):  # unused by forward
            assert a.grad is None and b.grad is None
        else:
            assert torch.equal(a.grad, b.grad), name
    assert tracker.keys() == []


def test_wrapped_model_deepcopies_and_pickles():
    net, x = _net_and_input(3)
    apply_meprop(net, 2, tracker=ActivityTracker())
    clone = copy.deepcopy(net)
    assert type(clone.rnn) is MePropLSTM and clone.proj.meprop.k == 2
    buffer = io.BytesIO()
    torch.save(net, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    assert torch.equal(loaded(x), net(x))


def test_sequential_mlp_output_layer_is_last_linear():
    torch.manual_seed(4)
    mlp = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))
    assert apply_meprop(mlp, 3, mode="per_example", sparse_bias=True) == ["0", "2"]
    assert mlp[0].meprop.mode == "per_example" and mlp[2].meprop.sparse_bias
    assert mlp[0].meprop.key == "0"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_meprop_trains_under_cpu_autocast_after_a_low_precision_layer(dtype):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(),
                          nn.Linear(16, 4))
    lstm = nn.LSTM(4, 6, batch_first=True)
    apply_meprop(model, 4)
    apply_meprop(nn.ModuleList([lstm]), 3, output_layer="")
    with torch.autocast("cpu", dtype=dtype):
        out = model(torch.randn(5, 8))
        seq, _ = lstm(out.unsqueeze(1).expand(5, 3, 4))  # the LSTM's input is low precision
        loss = out.float().pow(2).mean() + seq.float().pow(2).mean()
    loss.backward()
    for p in (*model.parameters(), *lstm.parameters()):
        assert p.grad is not None and p.grad.dtype == torch.float32
        assert torch.isfinite(p.grad).all()
    rows = (model[2].weight.grad.abs().sum(1) > 0).sum().item()
    assert 1 <= rows <= 4  # only the top-k rows of the second layer got a gradient
    assert (lstm.weight_hh_l0.grad.abs().sum(1) > 0).sum().item() <= 4 * 3


@pytest.mark.parametrize("k", [2, 100])  # k >= width: dense backprop, recorded by a hook
def test_every_backward_pass_is_recorded_also_through_a_kept_graph(k) -> None:
    net, x = _net_and_input()
    tracker = ActivityTracker()
    apply_meprop(net, k=k, tracker=tracker)
    loss = net(x).square().sum()
    loss.backward(retain_graph=True)
    loss.backward(retain_graph=True)
    torch.autograd.grad(loss, [net.conv.weight])
    # three backward passes of 5 * 2 examples through the conv, 5 * 2 rows through proj, and
    # 2 sequences through the LSTM
    assert tracker.total_examples("conv") == 3 * 10
    assert tracker.total_examples("proj") == 3 * 10
    assert tracker.total_examples("rnn.l0") == 3 * 2
