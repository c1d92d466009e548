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
# torch's own modules warn that torch.jit is deprecated when the exporter first loads them
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.script_method`:DeprecationWarning")

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

    class Holder(nn.Module):  # an attribute of that name is no compile wrapper
        def __init__(self) -> None:
            super().__init__()
            self._orig_mod, self.head = _tiny.mlp(), nn.Linear(4, 2)

    holder = Holder()
    assert unwrap(holder) is holder


def test_a_compiled_submodule_is_refused_by_name() -> None:
    model = nn.Sequential(torch.compile(nn.Linear(12, 8)), nn.ReLU(), nn.Linear(8, 4))
    with pytest.raises(ConfigError, match="'0' is compiled with torch.compile inside the model"):
        check_model(model)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # torch.jit is deprecated
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


def test_the_dense_twin_rebuilds_a_subclass_with_state_of_its_own_as_the_plain_layer() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(_Scaled(12, 8), nn.ReLU(), nn.Linear(8, 4)).eval()
    twin = dense_twin(model)  # (its load_state_dict of the extra buffer was a raw error)
    assert [type(m) for m in twin] == [nn.Linear, nn.ReLU, nn.Linear]
    assert torch.equal(twin[0].weight, model[0].weight)
    x = torch.randn(5, 12)
    plain = nn.functional.linear(x, model[0].weight, model[0].bias)
    assert torch.equal(twin[0](x), plain)  # a timing reference: shapes and weights kept


def test_compress_with_a_subclass_holding_extra_state_finishes(tmp_path, data) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(_Scaled(12, 32), nn.ReLU(), nn.Linear(32, 24), nn.ReLU(),
                          nn.Linear(24, 4))
    result = mc.compress(model, *data, config=CFG.replace(batches=[1]), out=tmp_path / "out")
    assert result.report["status"] == "ok"
    assert "0" not in result.plan.kept  # its scale follows no smaller width: left alone
