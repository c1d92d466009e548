"""What compress() accepts as a model: wrappers looked through, the rest refused by name."""

from __future__ import annotations

import _tiny
import pytest
import torch
from torch import nn
from torch.nn.utils import prune

import mesimp_compress as mc
from mesimp_compress.config import CompressConfig
from mesimp_compress.errors import ConfigError
from mesimp_compress.latency import dense_twin
from mesimp_compress.modelcheck import check_model, copy_failed, unwrap

torch.set_num_threads(1)

CFG = CompressConfig(k=8, window=0.5, epochs=1, cycles=1, recovery_epochs=0, lr=1e-2,
                     threads=1, distill=0.0, seed=3)


@pytest.fixture(scope="module")
def data():
    return _tiny.mlp_data(n_train=128, n_eval=32)


@pytest.mark.parametrize("wrap", [torch.compile, nn.DataParallel])
def test_a_wrapped_model_is_compressed_as_the_model_inside(data, wrap) -> None:
    notes: list[str] = []
    plain = mc.compress(_tiny.mlp(), *data, config=CFG)
    wrapped = mc.compress(wrap(_tiny.mlp()), *data, config=CFG,
                          sink=lambda e: notes.append(e.data.get("message", "")))
    assert type(wrapped.model) is nn.Sequential
    assert wrapped.widths == plain.widths
    for a, b in zip(plain.model.state_dict().values(), wrapped.model.state_dict().values(),
                    strict=True):
        assert torch.equal(a, b)
    assert any("inside its" in n and "wrapper" in n for n in notes)


def test_unwrap_leaves_a_plain_model_alone() -> None:
    model = _tiny.mlp()
    assert unwrap(model) is model
    assert unwrap(nn.DataParallel(torch.compile(model))) is model


def test_torchscript_is_refused_by_name() -> None:
    with pytest.raises(ConfigError, match="the model is a TorchScript module"):
        check_model(torch.jit.script(_tiny.mlp()))
    outer = nn.Sequential(nn.Linear(12, 12), torch.jit.script(nn.Linear(12, 4)))
    with pytest.raises(ConfigError, match="'1' is a TorchScript module"):
        check_model(outer)


def test_an_uninitialised_lazy_layer_is_refused() -> None:
    model = nn.Sequential(nn.LazyLinear(16), nn.ReLU(), nn.Linear(16, 4))
    with pytest.raises(ConfigError, match="'0.weight' belongs to a lazy layer that has not run"):
        check_model(model)
    model(torch.randn(2, 12))  # once run, it is an ordinary Linear
    check_model(model)


def test_a_prune_mask_is_refused_with_the_call_that_makes_it_permanent() -> None:
    model = _tiny.mlp()
    prune.l1_unstructured(model[2], "weight", amount=0.3)
    with pytest.raises(ConfigError, match=r"module '2' carries a torch.nn.utils.prune mask on "
                                          r"'weight'.*prune.remove\(module, 'weight'\)"):
        check_model(model)
    prune.remove(model[2], "weight")
    check_model(model)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_weights_are_refused(dtype) -> None:
    with pytest.raises(ConfigError, match=r"'0.weight' is .*float16: .*call model.float\(\)"):
        check_model(_tiny.mlp().to(dtype))


def test_a_copy_failure_names_weight_norm_only_when_it_is_the_cause() -> None:
    assert "weight_norm" not in str(copy_failed(RuntimeError("no pickling of a lock")))
    error = copy_failed(RuntimeError("this may be because of a torch.nn.utils.weight_norm"))
    assert "use torch.nn.utils.parametrizations.weight_norm" in str(error)


class _Scaled(nn.Linear):
    """A Linear subclass with a buffer and a forward of its own."""

    def __init__(self, i: int, o: int) -> None:
        super().__init__(i, o)
        self.register_buffer("scale", torch.linspace(0.5, 2.0, o))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x) * self.scale


def test_the_dense_twin_keeps_a_subclass_that_computes_something_else() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(_Scaled(12, 8), nn.ReLU(), nn.Linear(8, 4)).eval()
    twin = dense_twin(model)
    assert type(twin[0]) is _Scaled and type(twin[2]) is nn.Linear
    x = torch.randn(5, 12)
    assert torch.equal(twin(x), model(x))
