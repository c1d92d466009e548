"""RowSparseAdam / RowSparseSGD: rows with a gradient step like dense, the others stay put."""

from __future__ import annotations

import copy
import gc
import math

import pytest
import torch
from torch import nn

from mesimp_compress.errors import ConfigError
from mesimp_compress.meprop import apply_meprop, rowgrad
from mesimp_compress.optim import RowSparseAdam, RowSparseSGD

torch.set_num_threads(1)


def _mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 12), nn.Tanh(), nn.Linear(12, 10), nn.Tanh(),
                         nn.Linear(10, 3))


def _backward(model: nn.Module, seed: int) -> None:
    torch.manual_seed(100 + seed)
    x, w = torch.randn(4, 5), torch.randn(4, 3)
    (model(x) * w).sum().backward()


def _pair(make_sparse, make_dense, seed=0):
    """A meProp model with a row-sparse optimizer and a twin with a dense one."""
    sparse, dense = _mlp(seed), _mlp(seed)
    apply_meprop(sparse, 3)
    apply_meprop(dense, 3)
    return sparse, make_sparse(sparse.parameters()), dense, make_dense(dense.parameters())


def _step_alike(sparse, opt_s, dense, opt_d) -> None:
    """Step both optimizers; the two models must then hold the same parameters."""
    opt_s.step()
    opt_d.step()
    for p_s, p_d in zip(sparse.parameters(), dense.parameters(), strict=True):
        torch.testing.assert_close(p_s, p_d, atol=1e-6, rtol=0)


OPTIMIZERS = {
    "adam": (lambda p: RowSparseAdam(p, lr=0.05), lambda p: torch.optim.Adam(p, lr=0.05)),
    "sgd_momentum": (lambda p: RowSparseSGD(p, lr=0.1, momentum=0.9),
                     lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9)),
    "sgd_nesterov_wd": (lambda p: RowSparseSGD(p, lr=0.1, momentum=0.5, nesterov=True,
                                               weight_decay=0.01),
                        lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.5, nesterov=True,
                                                  weight_decay=0.01)),
}


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_first_step_equals_dense_on_rows_with_gradient_and_others_stay(name):
    sparse, opt_s, dense, opt_d = _pair(*OPTIMIZERS[name])
    before = [p.detach().clone() for p in sparse.parameters()]
    _backward(sparse, 0)
    _backward(dense, 0)
    assert sparse[0].weight.grad is None  # pending as rows, no full-size zero gradient
    rows, values = opt_s.row_grad(sparse[0].weight)
    assert rows.shape == (3,) and values.shape == (3, 5)
    torch.testing.assert_close(values, dense[0].weight.grad[rows], atol=1e-6, rtol=0)
    rows_of = {0: opt_s.row_grad(sparse[0].weight)[0], 2: opt_s.row_grad(sparse[2].weight)[0]}
    opt_s.step()
    opt_d.step()
    pairs = zip(sparse.named_parameters(), dense.parameters(), before, strict=True)
    for (name, a), b, old in pairs:
        layer = int(name.split(".")[0])
        if name.endswith("weight") and layer in rows_of:
            rows_here = rows_of[layer]
            # rows with a gradient: as the dense optimizer; the others: not moved at all
            torch.testing.assert_close(a[rows_here], b[rows_here], atol=1e-6, rtol=0)
            others = [r for r in range(a.shape[0]) if r not in set(rows_here.tolist())]
            assert torch.equal(a[others], old[others])
        else:
            torch.testing.assert_close(a, b, atol=1e-6, rtol=0)
    moved = (sparse[0].weight != before[0]).any(1)
    assert int(moved.sum()) == 3
    assert torch.equal(moved.nonzero().squeeze(1).sort().values, rows.sort().values)


def test_adam_later_steps_are_lazy():
    sparse, opt, _, _ = _pair(*OPTIMIZERS["adam"])
    weight = sparse[2].weight
    _backward(sparse, 0)
    rows0, g0 = opt.row_grad(weight)
    opt.step()
    opt.zero_grad()
    after_first = weight.detach().clone()
    m_first = opt.state[weight]["exp_avg"].clone()
    _backward(sparse, 1)
    rows1, g1 = opt.row_grad(weight)
    opt.step()
    untouched = [r for r in range(10) if r not in set(rows1.tolist())]
    # rows without a gradient in step 2 keep their weights and moments
    assert torch.equal(weight[untouched], after_first[untouched])
    assert torch.equal(opt.state[weight]["exp_avg"][untouched], m_first[untouched])
    # rows with a gradient follow Adam with the parameter's step count (2)
    b1, b2, lr, eps = 0.9, 0.999, 0.05, 1e-8
    for j, r in enumerate(rows1.tolist()):
        hit0 = (rows0 == r).nonzero()
        g_prev = g0[hit0.item()] if hit0.numel() else torch.zeros(12)
        m = (1 - b1) * g_prev * b1 + (1 - b1) * g1[j]
        v = (1 - b2) * g_prev**2 * b2 + (1 - b2) * g1[j] ** 2
        step = lr / (1 - b1**2) * m / (v.sqrt() / math.sqrt(1 - b2**2) + eps)
        torch.testing.assert_close(weight[r], after_first[r] - step, atol=1e-6, rtol=0)


def test_sgd_momentum_later_steps_are_lazy():
    sparse, opt, _, _ = _pair(*OPTIMIZERS["sgd_momentum"])
    weight = sparse[0].weight
    _backward(sparse, 0)
    rows0, g0 = opt.row_grad(weight)
    opt.step()
    opt.zero_grad()
    after_first = weight.detach().clone()
    _backward(sparse, 1)
    rows1, g1 = opt.row_grad(weight)
    opt.step()
    for r in range(12):
        hit0 = (rows0 == r).nonzero()
        hit1 = (rows1 == r).nonzero()
        buf = g0[hit0.item()] if hit0.numel() else torch.zeros(5)
        if hit1.numel():
            expected = after_first[r] - 0.1 * (0.9 * buf + g1[hit1.item()])
        else:
            expected = after_first[r]  # dense SGD would move it by 0.1 * 0.9 * buf
        torch.testing.assert_close(weight[r], expected, atol=1e-6, rtol=0)


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_dense_gradients_follow_the_dense_optimizer_over_steps(name):
    make_sparse, make_dense = OPTIMIZERS[name]
    plain, twin = _mlp(), _mlp()  # no meProp: every gradient is dense
    opt_s, opt_d = make_sparse(plain.parameters()), make_dense(twin.parameters())
    for step in range(4):
        for model, opt in ((plain, opt_s), (twin, opt_d)):
            opt.zero_grad()
            _backward(model, step)
            opt.step()
    for a, b in zip(plain.parameters(), twin.parameters(), strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


def test_accumulated_backwards_are_summed():
    sparse, opt, dense, _ = _pair(*OPTIMIZERS["adam"])
    for seed in (0, 1):
        _backward(sparse, seed)
        _backward(dense, seed)
    rows, values = opt.row_grad(sparse[0].weight)
    assert rows.tolist() == sorted(set(rows.tolist()))
    full = torch.zeros(12, 5).index_add_(0, rows, values)
    torch.testing.assert_close(full, dense[0].weight.grad, atol=1e-6, rtol=0)


def test_zero_grad_drops_pending_rows():
    sparse, opt, _, _ = _pair(*OPTIMIZERS["sgd_momentum"])
    before = sparse[0].weight.detach().clone()
    _backward(sparse, 0)
    opt.zero_grad()
    assert opt.row_grad(sparse[0].weight) is None
    opt.step()
    assert torch.equal(sparse[0].weight, before)


def test_grad_returns_when_the_optimizer_is_gone_or_released():
    sparse, opt, dense, _ = _pair(*OPTIMIZERS["adam"])
    opt.release()
    _backward(sparse, 0)
    _backward(dense, 0)
    assert torch.equal(sparse[0].weight.grad, dense[0].weight.grad)
    opt = RowSparseAdam(sparse.parameters())
    sparse.zero_grad()
    del opt
    gc.collect()
    _backward(sparse, 0)
    assert torch.equal(sparse[0].weight.grad, dense[0].weight.grad)


def test_dense_and_row_gradients_of_one_parameter_are_summed():
    torch.manual_seed(3)
    layer = nn.Linear(4, 6)
    apply_meprop(nn.Sequential(layer, nn.Linear(6, 2)), 2)
    twin = copy.deepcopy(layer)
    opt = RowSparseSGD([layer.weight], lr=1.0)
    ref = torch.optim.SGD([twin.weight], lr=1.0)
    x = torch.randn(3, 4)
    for mod, o in ((layer, opt), (twin, ref)):
        (mod(x).pow(2).sum() + mod.weight.pow(2).sum()).backward()  # weight also used densely
        o.step()
    torch.testing.assert_close(layer.weight, twin.weight, atol=1e-6, rtol=0)


def test_state_is_param_shaped_and_round_trips():
    sparse, opt, _, _ = _pair(*OPTIMIZERS["adam"])
    _backward(sparse, 0)
    opt.step()
    for param in sparse.parameters():
        state = opt.state[param]
        assert state["exp_avg"].shape == param.shape == state["exp_avg_sq"].shape
        assert state["step"].dim() == 0
    other = RowSparseAdam(sparse.parameters(), lr=0.05)
    other.load_state_dict(opt.state_dict())
    for param in sparse.parameters():
        assert torch.equal(other.state[param]["exp_avg"], opt.state[param]["exp_avg"])


@pytest.mark.parametrize("make", [
    lambda p: RowSparseAdam(p, lr=-1.0),
    lambda p: RowSparseAdam(p, betas=(0.9, 1.0)),
    lambda p: RowSparseAdam(p, eps=-1e-8),
    lambda p: RowSparseSGD(p, momentum=1.5),
    lambda p: RowSparseSGD(p, nesterov=True),
    lambda p: RowSparseSGD(p, weight_decay=-0.1),
    lambda p: RowSparseAdam(p, lr=None),
    lambda p: RowSparseAdam(p, lr=float("nan")),
    lambda p: RowSparseAdam(p, betas=0.9),
    lambda p: RowSparseAdam(p, weight_decay=float("inf")),
    lambda p: RowSparseSGD(p, lr="0.1"),
    lambda p: RowSparseSGD(p, momentum=True),
])
def test_bad_hyperparameters(make):
    with pytest.raises(ConfigError):
        make(nn.Linear(2, 2).parameters())


def test_a_copy_of_a_claimed_parameter_is_not_claimed_and_claims_leave_with_the_parameter():
    sparse, opt, _, _ = _pair(*OPTIMIZERS["adam"])
    weight = sparse[0].weight
    assert rowgrad.consumer_of(weight) is opt
    twin = copy.deepcopy(sparse)
    assert rowgrad.consumer_of(twin[0].weight) is None
    _backward(twin, 0)
    assert twin[0].weight.grad is not None and opt.row_grad(weight) is None
    claims = len(rowgrad._CLAIMS)
    del sparse, weight, twin, opt
    gc.collect()
    assert len(rowgrad._CLAIMS) < claims


def test_autograd_grad_and_backward_inputs_leave_the_optimizer_alone():
    sparse, opt_s, dense, opt_d = _pair(*OPTIMIZERS["sgd_momentum"])
    for model in (sparse, dense):
        torch.manual_seed(7)
        x, w = torch.randn(4, 5, requires_grad=True), torch.randn(4, 3)
        loss = (model(x) * w).sum()
        (gx,) = torch.autograd.grad(loss, [x], retain_graph=True)  # an FGSM-style input grad
        model(x).sum().backward(inputs=[x])  # only x.grad
        assert x.grad is not None
        (model(x + 0.1 * gx.sign()) * w).sum().backward()  # the training backward
    assert len(opt_s.row_grad(sparse[0].weight)[0]) == 3  # the last backward's rows only
    _step_alike(sparse, opt_s, dense, opt_d)


def test_autograd_grad_of_a_claimed_weight_returns_the_masked_gradient():
    sparse, opt_s, dense, _ = _pair(*OPTIMIZERS["adam"])
    torch.manual_seed(3)
    x = torch.randn(4, 5)
    got = torch.autograd.grad(sparse(x).square().sum(), [sparse[0].weight, sparse[2].weight])
    want = torch.autograd.grad(dense(x).square().sum(), [dense[0].weight, dense[2].weight])
    for g, w in zip(got, want, strict=True):
        assert int((g.abs().sum(1) > 0).sum()) == 3  # k rows
        torch.testing.assert_close(g, w, atol=1e-6, rtol=0)
    assert opt_s.row_grad(sparse[0].weight) is None  # nothing was handed to the optimizer


@pytest.mark.parametrize("name", ["adam", "sgd_momentum"])
def test_grad_scaler_unscales_row_gradients_and_skips_overflowing_steps(name):
    make = OPTIMIZERS[name][0]
    plain, scaled = _mlp(1), _mlp(1)
    for model in (plain, scaled):
        apply_meprop(model, 3)
    opt_plain, opt_scaled = make(plain.parameters()), make(scaled.parameters())
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16)
    for seed in range(3):
        _backward(plain, seed)
        opt_plain.step()
        opt_plain.zero_grad()
        torch.manual_seed(100 + seed)
        x, w = torch.randn(4, 5), torch.randn(4, 3)
        scaler.scale((scaled(x) * w).sum()).backward()
        scaler.step(opt_scaled)
        scaler.update()
        opt_scaled.zero_grad()
    for p, q in zip(plain.parameters(), scaled.parameters(), strict=True):
        torch.testing.assert_close(p, q, atol=1e-6, rtol=1e-5)
    before = [p.detach().clone() for p in scaled.parameters()]
    scaler.scale((scaled(torch.randn(4, 5)) * 1e38).sum()).backward()  # overflows once scaled
    scaler.step(opt_scaled)
    scaler.update()
    assert scaler.get_scale() == 2.0**15
    assert all(torch.equal(p, b) for p, b in zip(scaled.parameters(), before, strict=True))
    assert opt_scaled.row_grad(scaled[0].weight) is None  # the skipped step's rows are gone


def test_float16_rows_are_unscaled_in_the_weights_precision():
    """Under float16 autocast meProp computes the rows in float16; unscaled there, gradients
    of a small loss flushed to zero (no weight row moved while dense Adam moved all k)."""
    moved = {}
    for name, make in (("rows", RowSparseAdam), ("dense", torch.optim.Adam)):
        model = _mlp(2)
        apply_meprop(model, 3)
        opt, before = make(model.parameters(), lr=1e-3), model[0].weight.detach().clone()
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16)
        torch.manual_seed(5)
        x, w = torch.randn(64, 5), torch.randn(64, 3)
        with torch.autocast("cpu", dtype=torch.float16):
            loss = (model(x) * w).sum() * 1e-7
        scaler.scale(loss).backward()
        scaler.step(opt)
        moved[name] = model[0].weight.detach() - before
    assert int((moved["dense"] != 0).any(1).sum()) == 3
    torch.testing.assert_close(moved["rows"], moved["dense"], atol=1e-9, rtol=0)


def test_rows_of_accumulated_bfloat16_backwards_are_summed_in_float32():
    sparse, opt_s, dense, opt_d = _pair(lambda p: RowSparseSGD(p, lr=1.0),
                                        lambda p: torch.optim.SGD(p, lr=1.0))
    for seed in range(16):
        for model in (sparse, dense):
            torch.manual_seed(100 + seed)
            x, w = torch.randn(8, 5), torch.randn(8, 3)
            with torch.autocast("cpu", dtype=torch.bfloat16):
                out = model(x)
            (out.float() * w).sum().backward()
    rows, values = opt_s.row_grad(sparse[0].weight)
    assert values.dtype == torch.float32
    _step_alike(sparse, opt_s, dense, opt_d)


def test_load_state_dict_keeps_the_rows_of_a_backward_already_run():
    sparse, opt_s, dense, opt_d = _pair(*OPTIMIZERS["adam"])
    for model, opt in ((sparse, opt_s), (dense, opt_d)):
        _backward(model, 0)
        opt.load_state_dict(opt.state_dict())  # restoring state keeps .grad: and the rows
        opt.step()
    for p_s, p_d in zip(sparse.parameters(), dense.parameters(), strict=True):
        torch.testing.assert_close(p_s, p_d, atol=1e-6, rtol=0)
    assert not torch.equal(sparse[0].weight, _mlp(0)[0].weight)


def test_grad_scaler_unscale_before_step_is_refused_while_rows_are_pending():
    model = _mlp()
    apply_meprop(model, 3)
    opt = RowSparseSGD(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu")
    scaler.scale(model(torch.randn(4, 5)).sum()).backward()
    scaler.unscale_(opt)
    with pytest.raises(ConfigError, match="without scaler.unscale_"):
        scaler.step(opt)


def test_an_empty_batch_gives_the_optimizer_no_rows_and_no_step():
    model = _mlp()
    apply_meprop(model, 3)
    opt = RowSparseAdam(model.parameters(), lr=0.1)
    model(torch.randn(0, 5)).sum().backward()
    assert opt.row_grad(model[0].weight) is None
    opt.step()
    assert "step" not in opt.state[model[0].weight]  # Adam's bias correction is untouched
    assert float(opt.state[model[0].bias]["step"]) == 1  # dense zero gradient: a dense step


def test_a_plain_optimizer_stepping_a_claimed_weight_takes_it_back():
    """A switch to torch.optim.Adam while the row-sparse one is still referenced (by its LR
    scheduler, say): the weights train as under Adam alone, no rows pile up unseen."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8))
    apply_meprop(model, 5)
    x, t = torch.randn(4, 16), torch.randn(4, 8)
    sparse = RowSparseAdam(model.parameters(), lr=1e-2)
    scheduler = torch.optim.lr_scheduler.StepLR(sparse, 5)  # keeps `sparse` alive
    reference = copy.deepcopy(model)  # its parameters are new objects: not claimed
    runs = [(model, torch.optim.Adam(model.parameters(), lr=1e-2)),
            (reference, torch.optim.Adam(reference.parameters(), lr=1e-2))]
    for _ in range(3):
        for m, optimizer in runs:
            optimizer.zero_grad()
            ((m(x) - t) ** 2).mean().backward()
            optimizer.step()
    assert scheduler.optimizer is sparse and not sparse._rows
    assert rowgrad.consumer_of(model[0].weight) is None
    for mine, theirs in zip(model.parameters(), reference.parameters(), strict=True):
        assert torch.equal(mine, theirs)


def test_a_gradient_zeroed_in_place_does_not_turn_row_steps_dense():
    """A backward before the optimizer existed leaves a .grad; zero_grad(set_to_none=False)
    zeroes it in place. Rows must still move alone (they moved 4, 8, 12, 14 per step)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8))
    data = [(torch.randn(4, 16), torch.randn(4, 8)) for _ in range(4)]
    ((model(data[0][0]) - data[0][1]) ** 2).mean().backward()  # a dense sanity backward
    apply_meprop(model, 4)
    opt = RowSparseAdam(model.parameters(), lr=1e-2)
    moved = []
    for x, t in data:
        opt.zero_grad(set_to_none=False)
        ((model(x) - t) ** 2).mean().backward()
        before = model[0].weight.detach().clone()
        opt.step()
        moved.append(int((model[0].weight != before).any(1).sum()))
    assert moved == [4, 4, 4, 4]


class _Recurrent(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lstm = nn.LSTM(5, 8)
        self.head = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.lstm(x)[0])


def test_gradscaler_unscales_rows_shared_by_two_parameters_once():
    # an LSTM's bias_ih and bias_hh are handed the very same row values tensor
    torch.manual_seed(0)
    scaled = _Recurrent()
    apply_meprop(scaled, 3)
    plain = copy.deepcopy(scaled)
    x = torch.randn(6, 4, 5)
    steps = {}
    for model, scaler in ((scaled, torch.amp.GradScaler("cpu", init_scale=1024.0)),
                          (plain, None)):
        opt = RowSparseSGD(model.parameters(), lr=0.1)
        before = [p.detach().clone() for p in model.parameters()]
        loss = model(x).pow(2).mean()
        if scaler is None:
            loss.backward()
            opt.step()
        else:
            scaler.scale(loss).backward()
            scaler.step(opt)
        steps[scaler is None] = [p.detach() - b for p, b in zip(model.parameters(), before,
                                                                  strict=True)]
    for with_scaler, without in zip(steps[False], steps[True], strict=True):
        torch.testing.assert_close(with_scaler, without, atol=1e-7, rtol=1e-5)
    assert float(steps[False][2].abs().max()) > 1e-4  # bias_ih moved as without the scaler
