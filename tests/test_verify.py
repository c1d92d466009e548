import copy

import _onnx_zoo as zoo
import numpy as np
import pytest
import torch
from torch import nn

from mesimp_compress.errors import ConfigError, ExportError, ParityError, ShapeError
from mesimp_compress.export import export_onnx
from mesimp_compress.verify import (
    _accumulate,
    check_parity,
    evaluate_onnx,
    evaluate_torch,
    feed,
    make_session,
    parity_inputs,
    run_onnx,
)

torch.set_num_threads(1)


def _data(batches=3, batch=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(batch, 16, generator=g), torch.randint(0, 4, (batch,), generator=g))
        for _ in range(batches)
    ]


def test_session_options_are_pinned():
    e = zoo.mlp_torchscript()
    session = make_session(e.result.path, threads=1)
    options = session.get_session_options()
    assert options.intra_op_num_threads == 1 and options.inter_op_num_threads == 1
    assert str(options.graph_optimization_level).endswith("ORT_ENABLE_ALL")
    assert str(options.execution_mode).endswith("ORT_SEQUENTIAL")
    with pytest.raises(ExportError, match="does not exist"):
        make_session(e.result.path.with_name("missing.onnx"))


def test_parity_reports_tiny_errors_for_a_faithful_export():
    e = zoo.mlp_torchscript()
    result = check_parity(e.result.path, e.model, [x for x, _ in _data()], label="mlp")
    (out,) = result.outputs
    assert result.passed and result.batches == 3 and out.name == "output"
    assert out.max_abs < 1e-5 and out.worst < 0.1
    assert result.to_dict()["passed"] is True


def test_parity_error_names_the_output_when_onnx_and_torch_differ():
    e = zoo.mlp_torchscript()
    changed = copy.deepcopy(e.model)
    with torch.no_grad():
        changed[4].bias += 0.01  # the ONNX file still holds the old bias
    batches = [x for x, _ in _data(1)]
    with pytest.raises(ParityError, match=r"output 'output' differs from PyTorch by up to 0.01"):
        check_parity(e.result.path, changed, batches, label="compressed")
    result = check_parity(e.result.path, changed, batches, raise_on_fail=False)
    assert not result.passed
    assert result.outputs[0].max_abs == pytest.approx(0.01, rel=1e-3)
    # worst = max |d| / (atol + rtol |ref|) is well beyond 1
    assert result.outputs[0].worst > 5
    loose = check_parity(e.result.path, changed, batches, atol=0.02, rtol=0.0)
    assert loose.passed


def test_metric_of_the_onnx_model_equals_pytorch_and_a_hand_count():
    e = zoo.mlp_torchscript()
    data = _data(batches=4, batch=5)
    with torch.no_grad():
        correct = sum(int((e.model(x).argmax(-1) == y).sum()) for x, y in data)
    expected = correct / 20
    assert evaluate_onnx(e.result.path, data) == pytest.approx(expected)
    assert evaluate_torch(e.model, data) == pytest.approx(expected)


def test_a_user_metric_gets_tensors_and_may_return_a_batch_mean():
    e = zoo.mlp_torchscript()
    data = _data(batches=2, batch=4)

    def mean_logit(outputs, targets):
        assert isinstance(outputs, torch.Tensor) and outputs.shape == (4, 4)
        return float(outputs.mean())

    with torch.no_grad():
        expected = float(torch.stack([e.model(x).mean() for x, _ in data]).mean())
    assert evaluate_onnx(e.result.path, data, mean_logit) == pytest.approx(expected, abs=1e-6)


class _TwoInputs(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(10, 4)

    def forward(self, ids: torch.Tensor, unused: torch.Tensor) -> torch.Tensor:
        return self.embed(ids).sum(1)


def test_inputs_are_fed_by_name_when_the_exporter_dropped_one(tmp_path):
    model = _TwoInputs().eval()
    ids = torch.randint(0, 10, (2, 3))
    r = export_onnx(model, (ids, torch.ones(2, 3)), tmp_path / "two.onnx", exporter="torchscript")
    session = make_session(r.path)
    assert [i.name for i in session.get_inputs()] == ["ids"]
    (out,) = run_onnx(session, (ids.int(), torch.ones(2, 3)), input_names=["ids", "unused"])
    assert np.allclose(out, model(ids, None).detach().numpy())
    assert feed(session, (ids.int(), None), ["ids", "unused"])["ids"].dtype == np.int64
    with pytest.raises(ShapeError, match="takes 1 inputs"):
        feed(session, (ids, ids))
    with pytest.raises(ShapeError, match="were not given"):
        feed(session, (ids,), ["other"])


def test_parity_inputs_take_real_batches_and_a_resized_one():
    data = _data(batches=5, batch=6)
    picked, names = parity_inputs(data, max_batches=2, resize_to=(1, 9))
    assert [tuple(p[0].shape) for p in picked] == [(6, 16), (6, 16), (1, 16), (9, 16)]
    assert torch.equal(picked[2][0][0], data[0][0][0])
    assert names == ["eval batch 1", "eval batch 2", "eval batch 1 resized to batch 1",
                     "eval batch 1 resized to batch 9"]
    with pytest.raises(ShapeError, match="no batches"):
        parity_inputs([])


def test_parity_inputs_skip_a_batch_without_examples_and_name_the_rest_by_position():
    data = _data(batches=3, batch=6)
    data[0] = (data[0][0][:0], data[0][1][:0])
    picked, names = parity_inputs(data, max_batches=2)
    assert [tuple(p[0].shape) for p in picked] == [(6, 16), (6, 16), (1, 16)]
    assert names == ["eval batch 2", "eval batch 3", "eval batch 2 resized to batch 1"]


@pytest.mark.parametrize(
    ("bias", "agrees"),
    [(float("nan"), False), (float("inf"), False), (-float("inf"), False), (0.0, True)],
)
def test_a_non_finite_pytorch_output_must_be_matched_exactly(bias, agrees):
    e = zoo.mlp_torchscript()  # its ONNX file gives finite outputs
    changed = copy.deepcopy(e.model)
    with torch.no_grad():
        changed[4].bias[0] += bias
    result = check_parity(e.result.path, changed, [x for x, _ in _data(1)], raise_on_fail=False)
    assert result.passed is agrees
    if not agrees:
        assert result.outputs[0].worst == float("inf") and result.outputs[0].max_abs == float("inf")


def test_non_finite_outputs_agree_only_with_the_same_value():
    stat = [0.0, 0.0, 0.0]
    same = np.array([np.nan, np.inf, -np.inf, 1.0])
    _accumulate(stat, same.copy(), same, 1e-4, 1e-3)
    assert stat == [0.0, 1.0, 0.0]
    _accumulate(stat, np.array([np.nan, -np.inf, -np.inf, 1.0]), same, 1e-4, 1e-3)
    assert stat[0] == stat[2] == float("inf")


@pytest.mark.parametrize(("atol", "rtol"), [(-1.0, 1e-3), (float("nan"), 1e-3), (0.0, 0.0),
                                            (1e-4, -1.0), (1e-4, float("inf"))])
def test_bad_tolerances_are_refused(atol, rtol):
    e = zoo.mlp_torchscript()
    with pytest.raises(ConfigError, match="tolerances must be"):
        check_parity(e.result.path, e.model, [x for x, _ in _data(1)], atol=atol, rtol=rtol)
