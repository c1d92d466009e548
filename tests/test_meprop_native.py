"""The compiled meProp Linear backward against the Python one (the reference)."""

from __future__ import annotations

import copy
import gc
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import mesimp_compress as mc
from mesimp_compress.meprop import MePropLinear, native

pytestmark = pytest.mark.skipif(native.module() is None,
                                reason="compiled meProp backward not built (mesimp build-native)")


def _compiled(y: torch.Tensor) -> bool:
    return "MePropLinear" in y.grad_fn.name()


def _run(layer: nn.Module, x: torch.Tensor, up: torch.Tensor, python: bool, **kw):
    """Gradients and activity of one backward of a wrapped copy of ``layer``."""
    tracker = mc.ActivityTracker()
    mep = MePropLinear.wrap(copy.deepcopy(layer), tracker=tracker, key="l", **kw)
    xm = x.detach().clone().requires_grad_(x.requires_grad)
    if python:
        with native.disabled():
            y = mep(xm)
    else:
        y = mep(xm)
    assert _compiled(y) is not python
    (y * up).sum().backward()
    grads = [xm.grad, mep.weight.grad, None if mep.bias is None else mep.bias.grad]
    return grads, tracker.window_hits("l"), tracker.window_examples("l")


@pytest.mark.parametrize("shape", [(1, 7), (6, 7), (3, 4, 7)])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("input_grad", [True, False])
def test_same_gradients_and_hits_as_python(shape, bias, dtype, input_grad):
    torch.manual_seed(0)
    layer = nn.Linear(7, 9, bias=bias, dtype=dtype)
    x = torch.randn(shape, dtype=dtype).requires_grad_(input_grad)
    up = torch.randn(*shape[:-1], 9, dtype=dtype)
    fast, hits, examples = _run(layer, x, up, python=False, k=3)
    ref, ref_hits, ref_examples = _run(layer, x, up, python=True, k=3)
    for got, want in zip(fast, ref, strict=True):
        if want is None:
            assert got is None
        else:
            torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)
    assert torch.equal(hits, ref_hits) and int(hits.sum()) == 3 * shape[0]
    assert examples == ref_examples == shape[0]
    assert int((fast[1].abs().sum(1) > 0).sum()) == 3  # k rows of the weight gradient


def _mlp() -> nn.Module:
    torch.manual_seed(3)
    return nn.Sequential(nn.Linear(10, 16), nn.ReLU(), nn.Linear(16, 16), nn.Tanh(),
                         nn.Linear(16, 4))


def _wrapped(k: int = 4, tracker=None) -> nn.Module:
    model = _mlp()
    mc.apply_meprop(model, k, tracker=tracker)
    return model


def _loss(model: nn.Module, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randn(8, 10, generator=g), torch.randint(0, 4, (8,), generator=g)
    return F.cross_entropy(model(x), y)


def test_row_sparse_steps_match_python():
    params = {}
    for python in (False, True):
        model = _wrapped()
        opt = mc.RowSparseAdam(model.parameters(), lr=1e-2)
        with native.disabled() if python else torch.enable_grad():
            for step in range(3):
                opt.zero_grad()
                _loss(model, step).backward()
                _loss(model, step + 10).backward()  # two backward passes accumulate
                assert model[0].weight.grad is None
                rows, values = opt.row_grad(model[0].weight)
                assert rows.numel() <= 8 and values.shape == (rows.numel(), 10)
                opt.step()
        params[python] = [p.detach().clone() for p in model.parameters()]
    for fast, ref in zip(params[False], params[True], strict=True):
        torch.testing.assert_close(fast, ref, atol=1e-6, rtol=1e-6)


def test_autograd_grad_and_backward_inputs_hand_nothing_to_the_optimizer():
    model = _wrapped()
    opt = mc.RowSparseSGD(model.parameters(), lr=0.1)
    reference = copy.deepcopy(model)
    with native.disabled():
        (want,) = torch.autograd.grad(_loss(reference), [reference[2].weight])
    (got,) = torch.autograd.grad(_loss(model), [model[2].weight])
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)  # the masked gradient
    assert int((got.abs().sum(1) > 0).sum()) == 4
    torch.autograd.grad(_loss(model), [model[4].bias])
    _loss(model).backward(inputs=[model[4].weight])
    assert all(opt.row_grad(p) is None for p in model.parameters())


def test_create_graph_differentiates_once():
    model = _wrapped()
    reference = copy.deepcopy(model)
    with native.disabled():
        want = torch.autograd.grad(_loss(reference), list(reference.parameters()))
    got = torch.autograd.grad(_loss(model), list(model.parameters()), create_graph=True)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, atol=1e-6, rtol=1e-6)
    with pytest.raises(RuntimeError, match="differentiate twice"):
        got[0].sum().backward()


def test_claims_decide_at_backward_where_rows_go():
    model = _wrapped()
    opt = mc.RowSparseAdam(model.parameters())
    loss = _loss(model)
    opt.release()  # released between forward and backward: rows go to .grad
    loss.backward()
    assert int((model[0].weight.grad.abs().sum(1) > 0).sum()) == 4
    model.zero_grad()
    opt = mc.RowSparseAdam(model.parameters())
    loss = _loss(model)
    del opt  # the optimizer is gone before the backward
    gc.collect()
    loss.backward()
    assert model[0].weight.grad is not None


def test_zero_grad_drops_and_another_optimizer_takes_back_waiting_rows():
    model = _wrapped()
    opt = mc.RowSparseAdam(model.parameters())
    _loss(model).backward()
    opt.zero_grad()
    assert opt.row_grad(model[0].weight) is None
    _loss(model).backward()
    rows, values = opt.row_grad(model[0].weight)
    before = model[0].weight.detach().clone()
    sgd = torch.optim.SGD([model[0].weight], lr=1.0)
    sgd.step()  # its pre-hook hands the claimed weight back: the rows step under SGD
    moved = (model[0].weight.detach() - before).abs().sum(1) > 0
    assert torch.equal(moved.nonzero().squeeze(1), rows.sort().values)
    torch.testing.assert_close(before[rows] - model[0].weight.detach()[rows], values)


def test_retain_graph_counts_every_backward():
    tracker = mc.ActivityTracker()
    model = _wrapped(tracker=tracker)
    loss = _loss(model)
    loss.backward(retain_graph=True)
    loss.backward()
    assert tracker.window_examples("0") == 16 and int(tracker.window_hits("0").sum()) == 64


def test_nan_gradient_selects_the_nan_unit_as_python_does():
    layer = nn.Linear(5, 6)
    x = torch.randn(3, 5)
    up = torch.randn(3, 6)
    up[1, 2] = float("nan")
    fast, hits, _ = _run(layer, x, up, python=False, k=2)
    ref, ref_hits, _ = _run(layer, x, up, python=True, k=2)
    assert int(hits[2]) == 3 and torch.equal(hits, ref_hits)
    torch.testing.assert_close(fast[1], ref[1], equal_nan=True)


@pytest.mark.parametrize("case", ["bfloat16", "autocast", "per_example", "sparse_bias", "1-D",
                                  "empty"])
def test_other_cases_run_the_python_function(case):
    layer = MePropLinear.wrap(nn.Linear(5, 6), 2, mode="per_example" if case == "per_example"
                              else "unified", sparse_bias=case == "sparse_bias")
    x = torch.randn(0 if case == "empty" else 3, 5)
    if case == "bfloat16":
        layer.to(torch.bfloat16)
        x = x.to(torch.bfloat16)
    if case == "1-D":
        x = x[0]
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=case == "autocast"):
        y = layer(x)
    assert not _compiled(y)


def test_tracker_folds_compiled_counts_through_reset_select_and_state():
    tracker = mc.ActivityTracker()
    model = _wrapped(tracker=tracker)
    _loss(model).backward()
    state = tracker.state_dict()  # nothing read before: the compiled counts are in it
    assert state["window_examples"] == {"0": 8, "2": 8}
    assert int(state["window_hits"]["2"].sum()) == 32
    tracker.reset_window()
    _loss(model).backward()
    assert tracker.window_examples("0") == 8 and tracker.total_examples("0") == 16
    tracker.select("0", torch.arange(10))  # after surgery the layer has 10 units
    with torch.no_grad():
        model[0].weight = nn.Parameter(model[0].weight[:10].clone())
        model[0].bias = nn.Parameter(model[0].bias[:10].clone())
        model[2].weight = nn.Parameter(model[2].weight[:, :10].clone())
    model[0].meprop.width = 10
    _loss(model).backward()
    assert tracker.window_hits("0").shape == (10,) and tracker.window_examples("0") == 16
    tracker.reset()
    with pytest.raises(mc.ConfigError):
        tracker.window_hits("0")



def test_tied_scores_go_to_the_lower_units():
    # units no gradient reaches tie at 0: the same gradients as Python, and the hits go to
    # the lowest indices (torch.topk leaves the order of ties open)
    layer = nn.Linear(6, 64)
    x = torch.randn(4, 6)
    up = torch.zeros(4, 64)
    up[:, 40:43] = torch.randn(4, 3)
    fast, hits, _ = _run(layer, x, up, python=False, k=5)
    ref, _, _ = _run(layer, x, up, python=True, k=5)
    for got, want in zip(fast, ref, strict=True):
        torch.testing.assert_close(got, want)
    assert hits.nonzero().squeeze(1).tolist() == [0, 1, 40, 41, 42]


def test_select_and_reset_see_compiled_counts_not_read_yet():
    tracker = mc.ActivityTracker()
    layer = MePropLinear.wrap(nn.Linear(5, 8), 2, tracker=tracker, key="l")
    x = torch.randn(4, 5)
    layer(x).sum().backward()
    tracker.select("l", [0, 1, 2, 3])  # nothing read since the backward
    layer.weight = nn.Parameter(layer.weight[:4].detach().clone())
    layer.bias = nn.Parameter(layer.bias[:4].detach().clone())
    layer(x).sum().backward()
    assert tracker.window_hits("l").shape == (4,) and tracker.window_examples("l") == 8
    y = layer(x)
    tracker.reset()  # between a forward and its backward: that backward counts afresh
    y.sum().backward()
    assert tracker.window_examples("l") == 4 and int(tracker.window_hits("l").sum()) == 8


def test_a_damaged_build_is_not_loaded(monkeypatch, tmp_path):
    library = Path(native.module().__file__)
    monkeypatch.setenv("MESIMP_CACHE", str(tmp_path))
    copy_dir = native.build_dir()
    copy_dir.mkdir(parents=True)
    (copy_dir / native.STAMP).write_bytes((library.parent / native.STAMP).read_bytes())
    (copy_dir / library.name).write_bytes(library.read_bytes()[:100_000])  # cut short
    assert native._load_built() is None  # loading it would kill the process (SIGBUS)
    (copy_dir / library.name).write_bytes(library.read_bytes())
    assert native._load_built() is not None
