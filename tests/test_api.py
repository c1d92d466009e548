"""mc.compress / mc.load end to end on a tiny MLP: files, numbers, reload, safety, determinism."""

from __future__ import annotations

import json
import re
import warnings
from pathlib import Path

import _tiny
import numpy as np
import pytest
import torch

import mesimp_compress as mc
from mesimp_compress import api
from mesimp_compress.config import CompressConfig
from mesimp_compress.errors import ExportError, OutputExistsError
from mesimp_compress.report import read_report

torch.set_num_threads(1)

CFG = CompressConfig(k=8, window=0.25, epochs=1, cycles=1, recovery_epochs=0, lr=1e-2,
                     threads=1, batches=[1, 4], quantize=False, seed=3)
FILES = {"model.onnx", "original.onnx", "plan.json", "weights.pt", "report.json"}


@pytest.fixture(scope="module")
def data():
    return _tiny.mlp_data()


@pytest.fixture(scope="module")
def run(tmp_path_factory, data):
    """One full compression with an output folder (export, proof, report), shared."""
    root = tmp_path_factory.mktemp("api")
    model = _tiny.mlp()
    result = mc.compress(model, *data, config=CFG, out=root / "out")
    return model, result, root / "out"


@pytest.mark.slow
def test_the_folder_holds_exactly_the_promised_files(run) -> None:
    _, result, out = run
    assert result.out == out
    assert {p.name for p in out.iterdir() if p.is_file()} == FILES
    assert {p.name for p in out.iterdir() if p.is_dir()} == {"plots"}
    plots = list((out / "plots").iterdir())
    assert plots and all(p.suffix == ".png" and p.stat().st_size > 1000 for p in plots)
    assert [p.name for p in out.parent.iterdir()] == ["out"]  # no staging folder left beside it


@pytest.mark.slow
def test_report_numbers_agree_with_the_result(run) -> None:
    _, result, out = run
    report = read_report(out / "report.json")
    assert report == json.loads(json.dumps(result.report))
    assert report["status"] == "ok" and report["error"] is None
    assert report["widths"] == {"0": {"before": 32, "after": result.widths["0"]},
                                "2": {"before": 24, "after": result.widths["2"]}}
    assert result.widths["0"] < 32 and result.widths["2"] < 24
    metrics = report["metrics"]
    assert metrics["torch_before"] == result.metric_before
    assert metrics["torch_after"] == result.metric_after
    assert metrics["ort_before"] == pytest.approx(result.metric_before, abs=1 / 64)
    assert metrics["ort_after"] == pytest.approx(result.metric_after, abs=1 / 64)
    assert {r["batch"] for r in report["latency"]["rows"]} == {1, 4}
    assert len(report["extra"]["history"]) == len(result.history)
    assert report["extra"]["history"][-1]["widths"] == result.widths
    rows = {r["name"]: r for r in report["layers"]}
    assert rows["0"]["width_after"] == result.widths["0"]
    assert rows["4"]["width_after"] == _tiny.CLASSES and rows["4"]["params_after"] == (
        result.widths["2"] * _tiny.CLASSES + _tiny.CLASSES)


@pytest.mark.slow
def test_load_rebuilds_the_compressed_model_from_a_fresh_one(run, data) -> None:
    _, result, out = run
    rebuilt = mc.load(_tiny.mlp(), out).eval()
    assert rebuilt[0].out_features == result.widths["0"]
    x = torch.cat([b[0] for b in data[1]])
    with torch.no_grad():
        assert torch.equal(rebuilt(x), result.model.eval()(x))
    assert json.loads((out / "plan.json").read_text())["kept"] == result.plan.kept


@pytest.mark.slow
def test_the_callers_model_is_unchanged(run) -> None:
    model, _, _ = run
    fresh = _tiny.mlp()
    assert [m.out_features for m in model if hasattr(m, "out_features")] == [32, 24, 4]
    for (name, a), b in zip(model.state_dict().items(), fresh.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    assert type(model[0]) is torch.nn.Linear and not model[0]._forward_pre_hooks


def test_the_compressed_model_comes_back_in_the_callers_mode(data) -> None:
    for training in (False, True):
        model = _tiny.mlp().train(training)
        result = mc.compress(model, *data, config=CFG)
        assert result.model.training is training
        assert all(m.training is training for m in result.model.modules())


@pytest.mark.slow
def test_same_seed_gives_the_same_plan_and_metrics(run, data) -> None:
    _, first, _ = run
    again = mc.compress(_tiny.mlp(), *data, config=CFG)
    assert again.plan.to_dict() == first.plan.to_dict()
    assert (again.metric_before, again.metric_after) == (first.metric_before, first.metric_after)
    assert [r.to_dict() for r in again.history] == [r.to_dict() for r in first.history]


class CountingData(list):
    """A list of batches that counts how often it is iterated."""

    passes = 0

    def __iter__(self):
        type(self).passes += 1
        return super().__iter__()


def test_a_non_empty_folder_is_refused_before_any_training(tmp_path, data) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    events = []
    train = CountingData(data[0])
    with pytest.raises(OutputExistsError, match="not empty"):
        mc.compress(_tiny.mlp(), train, data[1], config=CFG, out=out, sink=events.append)
    assert CountingData.passes == 0 and events == []
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_an_export_failure_leaves_no_folder_and_no_staging(tmp_path, data, monkeypatch) -> None:
    from mesimp_compress import export

    real = export.export_onnx
    calls = []

    def failing(model, inputs, path, **kwargs):
        calls.append(path)
        if len(calls) == 2:  # original.onnx is already in the staging folder
            raise ExportError("ONNX export failed in module 'x' (Test): refused")
        return real(model, inputs, path, **kwargs)

    monkeypatch.setattr(export, "export_onnx", failing)
    out = tmp_path / "out"
    with pytest.raises(ExportError, match="refused"):
        api.compress(_tiny.mlp(), *data, config=CFG.replace(epochs=1, window=0.5), out=out)
    assert len(calls) == 2 and calls[0].name == "original.onnx"
    assert ".partial-" in str(calls[0].parent)  # it was written to the staging folder
    assert not out.exists() and not calls[0].parent.exists()
    # only the window checkpoint stays (for --resume); no staging folder, no half-written DIR
    assert [p.name for p in tmp_path.iterdir()] in ([], [".out.checkpoint"])


def test_an_original_that_cannot_be_exported_fails_before_fine_tuning(tmp_path, data) -> None:
    events: list = []
    out = tmp_path / "out"
    with pytest.raises(ExportError):
        api.compress(_tiny.no_export(), *data, config=CFG, out=out, sink=events.append)
    kinds = [e.kind for e in events]
    assert "baseline" not in kinds and "step" not in kinds  # nothing was trained
    assert list(tmp_path.iterdir()) == []  # no folder, no staging, no checkpoint


def test_an_original_file_the_size_proof_cannot_read_fails_before_fine_tuning(
    tmp_path, data, monkeypatch
) -> None:
    """The size proof of original.onnx runs with its export, not after the fine-tune."""
    from mesimp_compress import sizes
    from mesimp_compress.errors import SizeError

    def unreadable(path, model, **kwargs):
        raise SizeError(f"{path.name} does not hold the model's layers")

    monkeypatch.setattr(sizes, "onnx_layer_sizes", unreadable)
    events: list = []
    with pytest.raises(SizeError, match="original.onnx does not hold"):
        api.compress(_tiny.mlp(), *data, config=CFG, out=tmp_path / "out", sink=events.append)
    assert not {"baseline", "step", "window"} & {e.kind for e in events}
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("spoil", "message"),
    [
        ("label", r"train batch 3 \(epoch 1\): the targets hold class 99, but the model gives "
                  r"4 class scores"),
        ("shape", r"the model failed on train batch 3 \(epoch 1\): RuntimeError"),
        ("eval", r"the model failed on eval batch 2: RuntimeError"),
    ],
)
def test_a_bad_batch_after_the_first_is_a_data_error_naming_it(tmp_path, data, spoil,
                                                                message) -> None:
    train, eval_data = list(data[0]), list(data[1])
    if spoil == "label":
        x, y = train[2]
        train[2] = (x, y.clone().fill_(99))
    elif spoil == "shape":
        x, y = train[2]
        train[2] = (x[:, :-1], y)
    else:
        x, y = eval_data[1]
        eval_data[1] = (x[:, :-1], y)
    with pytest.raises(mc.DataError, match=message) as info:
        mc.compress(_tiny.mlp(), train, eval_data, config=CFG, out=tmp_path / "out")
    assert info.value.__cause__ is not None  # the user's own error stays chained


def _spoiled(batches, index, how):
    batches = list(batches)
    x, y = batches[index]
    if how == "nan":
        x = x.clone()
        x[0, 0] = float("nan")
    elif how == "empty":
        x, y = x[:0], y[:0]
    else:
        x = x.to("meta")
    batches[index] = (x, y)
    return batches


@pytest.mark.parametrize(
    ("where", "how", "message"),
    [
        ("train", "nan", r"train batch 3 \(epoch 1\): input 0 holds NaN values"),
        ("train", "empty", r"train batch 3 \(epoch 1\) has no examples"),
        ("train", "meta", r"train batch 3 \(epoch 1\) holds a tensor on the meta device"),
        ("eval", "meta", r"eval batch 2 holds a tensor on the meta device"),
        ("eval", "nan", r"eval batch 2: input 0 holds NaN values"),
    ],
)
def test_nan_empty_or_meta_data_after_the_first_batch_is_named(tmp_path, data, where, how,
                                                                message) -> None:
    train, eval_data = list(data[0]), list(data[1])
    if where == "train":
        train = _spoiled(train, 2, how)
    else:
        eval_data = _spoiled(eval_data, 1, how)
    with pytest.raises(mc.DataError, match=message):
        mc.compress(_tiny.mlp(), train, eval_data, config=CFG, out=tmp_path / "out")
    assert not (tmp_path / "out").exists()
    assert not (tmp_path / "out").exists()


def _loss_of_kind(kind: str):
    """A loss that is fine on the first batch and returns ``kind`` from the third on."""
    calls = {"n": 0}

    def loss(outputs, targets):
        calls["n"] += 1
        value = torch.nn.functional.cross_entropy(outputs, targets)
        if calls["n"] < 3:
            return value
        return {"vector": value.expand(3), "detached": value.detach(),
                "float": float(value.detach())}[kind]

    return loss


@pytest.mark.parametrize(
    ("kind", "says"),
    [
        ("vector", "the loss must return a scalar float tensor; got a torch.float32 tensor of "
                   "shape (3,) on train batch 2 (epoch 1)"),
        ("detached", "the loss on train batch 2 (epoch 1) does not depend on"),
        ("float", "got a float on train batch 2 (epoch 1)"),
    ],
)
def test_a_loss_that_cannot_train_on_a_later_batch_is_a_data_error(data, kind, says) -> None:
    # calls: 1 = the first-batch check, 2 = train batch 1, 3 = train batch 2
    for distill in (0.0, 0.5):  # distillation alone must not hide a broken task loss
        with pytest.raises(mc.DataError, match=re.escape(says)):
            mc.compress(_tiny.mlp(), *data, config=CFG.replace(distill=distill),
                        loss=_loss_of_kind(kind))


@pytest.mark.parametrize("error", [KeyError("logits"), AttributeError("x"), AssertionError()])
def test_any_failure_of_the_first_batch_checks_is_typed(data, error) -> None:
    def fails(outputs, targets):
        raise error

    for role in ("loss", "metric"):
        with pytest.raises(mc.ShapeError, match=f"^the {role} failed on the first train batch: "
                                                f"{type(error).__name__}"):
            mc.compress(_tiny.mlp(), *data, config=CFG, **{role: fails})


def test_regression_targets_with_the_default_metric_name_it_and_the_cure(data) -> None:
    train = [(x, x[:, :1]) for x, _ in data[0]]

    def mse(outputs, targets):
        return torch.nn.functional.mse_loss(outputs[:, :1], targets)

    with pytest.raises(mc.ShapeError, match=r"^the default metric \(accuracy over class "
                                            r"scores\): .*the targets are floats \(a "
                                            r"regression\?\): pass loss= and metric="):
        mc.compress(_tiny.mlp(), train, train, config=CFG, loss=mse)
    with pytest.raises(mc.ShapeError, match=r"^the default loss \(cross-entropy over class "
                                            r"scores\): class targets must be integers, got "
                                            r"torch.float32 \(for a regression"):
        mc.compress(_tiny.mlp(), [(x, y.float()) for x, y in data[0]], data[1], config=CFG)


def test_a_one_shot_eval_iterator_is_refused_before_it_is_read(data) -> None:
    batches = iter(data[1])
    with pytest.raises(mc.DataError, match="eval data: data must be re-iterable"):
        mc.compress(_tiny.mlp(), data[0], batches, config=CFG)
    assert len(list(batches)) == len(data[1])  # nothing was consumed


def test_eval_data_that_is_empty_after_its_first_pass_is_named_not_the_metric(data) -> None:
    class Once:
        """Re-iterable in appearance: __iter__ returns one shared iterator."""

        def __init__(self, batches):
            self.it = iter(batches)

        def __iter__(self):
            return self.it

    with pytest.raises(mc.DataError, match="^the eval data gave no batches this time"):
        mc.compress(_tiny.mlp(), data[0], Once(data[1]), config=CFG)


def test_a_nan_metric_is_a_data_error_naming_the_batch(data) -> None:
    calls = {"n": 0}

    def metric(outputs, targets):  # calls: the first-batch check, then eval batches 1, 2
        calls["n"] += 1
        return float("nan") if calls["n"] == 3 else 1.0

    with pytest.raises(mc.DataError, match="the metric is not finite on eval batch 2"):
        mc.compress(_tiny.mlp(), *data, config=CFG, metric=metric)


class DictMLP(torch.nn.Module):
    """The tiny MLP returning {"logits": ..., "hidden": None}: a structured output."""

    def __init__(self) -> None:
        super().__init__()
        self.net = _tiny.mlp()

    def forward(self, x):
        return {"logits": self.net(x), "hidden": None}


def _dict_loss(out, targets):
    return torch.nn.functional.cross_entropy(out["logits"], targets)


def _dict_metric(out, targets):
    assert set(out) == {"logits", "hidden"} and out["hidden"] is None
    return float((out["logits"].argmax(-1) == targets).sum()), float(len(targets))


@pytest.mark.slow
def test_a_dict_output_reaches_the_metric_as_a_dict_in_onnxruntime_too(tmp_path, data) -> None:
    result = mc.compress(DictMLP(), *data, config=CFG, out=tmp_path / "out", loss=_dict_loss,
                         metric=_dict_metric)
    metrics = result.report["metrics"]
    assert metrics["ort_before"] == pytest.approx(metrics["torch_before"], abs=1e-6)
    assert metrics["ort_after"] == pytest.approx(metrics["torch_after"], abs=1e-6)
    assert 0.0 < metrics["ort_after"] <= 1.0


def test_widths_name_every_prunable_layer_even_one_left_whole(data) -> None:
    result = mc.compress(_tiny.mlp(), *data, config=CFG.replace(min_width=24))
    assert set(result.widths) == {"0", "2"}
    assert result.widths["2"] == 24 and "2" not in result.plan.kept  # nothing cut: kept whole
    assert 24 <= result.widths["0"] < 32
    assert result.model[2].out_features == 24 and result.model[0].out_features == result.widths["0"]


def test_a_model_that_cannot_be_copied_is_a_config_error_naming_the_cure(data) -> None:
    model = _tiny.mlp()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # deprecated, which is the point
        torch.nn.utils.weight_norm(model[0])  # old style: a hook holding a non-leaf weight
    with pytest.raises(mc.ConfigError, match="parametrizations.weight_norm"):
        mc.compress(model, *data, config=CFG)


def test_config_may_be_a_mapping_or_a_recipe_path_and_anything_else_is_refused(
        tmp_path, data) -> None:
    recipe = tmp_path / "recipe.toml"
    recipe.write_text("[compress]\nk = 8\nwindow = 0.25\nepochs = 1\nrecovery-epochs = 0\n"
                      "lr = 1e-2\nthreads = 1\nseed = 3\n")
    from_cfg = mc.compress(_tiny.mlp(), *data, config=CFG.replace(quantize=True))
    from_dict = mc.compress(_tiny.mlp(), *data, config={"k": 8, "window": 0.25, "epochs": 1,
                                                        "recovery_epochs": 0, "lr": 1e-2,
                                                        "threads": 1, "seed": 3})
    from_toml = mc.compress(_tiny.mlp(), *data, config=str(recipe))
    assert from_dict.plan.kept == from_cfg.plan.kept == from_toml.plan.kept
    for bad, message in ((5, "config must be a CompressConfig"), ({"kk": 1}, "unknown key 'kk'"),
                         (tmp_path / "none.toml", "config file not found")):
        with pytest.raises(mc.ConfigError, match=message):
            mc.compress(_tiny.mlp(), *data, config=bad)
    with pytest.raises(mc.ConfigError, match="out must be a folder path"):
        mc.compress(_tiny.mlp(), *data, config=CFG, out=7)


def test_a_sink_that_edits_or_raises_on_events_cannot_spoil_the_run(tmp_path, data) -> None:
    def vandal(event) -> None:
        for value in event.data.values():
            if isinstance(value, dict):
                value.clear()
        if event.kind == "written":
            raise RuntimeError("sink failed after publishing")

    out = tmp_path / "out"
    with pytest.raises(RuntimeError, match="sink failed"):
        mc.compress(_tiny.mlp(), *data, config=CFG, out=out, sink=vandal)
    assert (out / "report.json").is_file()  # published before the sink raised
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # checkpoint removed
    report = json.loads((out / "report.json").read_text())
    assert all(record["widths"] for record in report["extra"]["history"])


class CausalMask(torch.nn.Module):
    """The tiny MLP plus a -inf mask buffer, as causal attention keeps one: a valid model."""

    def __init__(self) -> None:
        super().__init__()
        self.net = _tiny.mlp()
        self.register_buffer("mask", torch.triu(torch.full((4, 4), float("-inf")), 1))

    def forward(self, x):
        return self.net(x) + self.mask.softmax(-1)[0]


def test_an_infinite_buffer_is_no_bad_weight(data) -> None:
    result = mc.compress(CausalMask(), *data, config=CFG)
    assert result.metric_after > 0


def test_an_output_folder_does_not_change_the_fine_tuning(tmp_path) -> None:
    """The original's proof reads the eval DataLoader before fine-tuning, which draws a
    seed from torch's generator: the run must train as it does without an output folder."""
    from torch.utils.data import DataLoader, TensorDataset

    g = torch.Generator().manual_seed(0)
    x = torch.randn(96, 12, generator=g)
    y = x[:, :4].argmax(1)

    def model():
        torch.manual_seed(0)
        return torch.nn.Sequential(torch.nn.Linear(12, 32), torch.nn.ReLU(),
                                   torch.nn.Dropout(0.2), torch.nn.Linear(32, 4))

    def loaders():
        return (DataLoader(TensorDataset(x, y), batch_size=16, shuffle=True),
                DataLoader(TensorDataset(x[:48], y[:48]), batch_size=16))

    cfg = CFG.replace(window=0.34, distill=0.0, batches=[1])
    plain = mc.compress(model(), *loaders(), config=cfg)
    written = mc.compress(model(), *loaders(), config=cfg, out=tmp_path / "out")
    assert [r.loss for r in written.history] == [r.loss for r in plain.history]
    assert written.plan.kept == plain.plan.kept


class FloatTagger(torch.nn.Module):
    """Float features through an LSTM, one class per position: audio or time series padded
    to each batch's own length."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.proj = torch.nn.Linear(6, 24)
        self.lstm = torch.nn.LSTM(24, 16, batch_first=True)
        self.head = torch.nn.Linear(16, 3)

    def forward(self, x):
        return self.head(self.lstm(torch.relu(self.proj(x)))[0])


@pytest.mark.parametrize("lengths", [(7, 12, 5), (9, 9, 9, 9, 13)])
def test_float_sequences_whose_length_varies_by_batch_export_with_a_dynamic_length(tmp_path,
                                                                                   lengths):
    """Only the batch axis (and token ids' length) was dynamic: the original's proof failed
    on the first eval batch of another length, before any training (also when that was the
    fifth, after three like the first train batch)."""
    g = torch.Generator().manual_seed(0)

    def batch(length: int):
        x = torch.randn(8, length, 6, generator=g)
        return x, (x[..., :3].argmax(-1))

    train = [batch(n) for n in (9, 5, 7, 11, 6, 8, 10, 4)]
    evaluation = [batch(n) for n in lengths]
    cfg = CFG.replace(batches=[1, 2], window=0.5)
    result = mc.compress(FloatTagger(), train, evaluation, config=cfg, out=tmp_path / "out")
    report = result.report
    assert report["status"] == "ok"  # parity held on the eval batches of every length
    metrics = report["metrics"]
    assert metrics["ort_after"] == pytest.approx(metrics["torch_after"], abs=1e-6)
    import onnx

    for name in ("original.onnx", "model.onnx"):
        dims = onnx.load(str(tmp_path / "out" / name)).graph.input[0].type.tensor_type.shape.dim
        assert [d.dim_param or d.dim_value for d in dims] == ["batch", "seq", 6]
    widths = result.widths
    assert widths["proj"] < 24 and widths["lstm.l0"] < 16


class _Siamese(torch.nn.Module):
    """One encoder over both halves of the features (weights shared), a head over both."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.enc = torch.nn.Sequential(torch.nn.Linear(6, 32), torch.nn.ReLU(),
                                       torch.nn.Linear(32, 24), torch.nn.ReLU())
        self.head = torch.nn.Linear(48, _tiny.CLASSES)

    def forward(self, a, b):
        return self.head(torch.cat([self.enc(a), self.enc(b)], -1))


def test_a_siamese_encoder_called_twice_a_step_is_compressed_end_to_end(tmp_path, data) -> None:
    train, eval_data = ([((x[:, :6], x[:, 6:]), y) for x, y in part] for part in data)
    result = mc.compress(_Siamese(), train, eval_data, config=CFG,
                         out=tmp_path / "out")
    assert result.widths["enc.0"] < 32 and result.widths["enc.2"] < 24
    report = read_report(tmp_path / "out" / "report.json")
    assert report["status"] == "ok"
    assert report["layers"][-1]["params_after"] == (2 * result.widths["enc.2"] + 1) * 4
    rebuilt = mc.load(_Siamese(), tmp_path / "out").eval()
    a, b = eval_data[0][0]
    with torch.no_grad():
        assert torch.equal(rebuilt(a, b), result.model.eval()(a, b))


class _Audio(torch.nn.Module):
    """Conv1d -> BatchNorm1d -> Conv1d -> mean over time -> Linear, on any length."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.c1 = torch.nn.Conv1d(3, 32, 5, padding=2)
        self.bn = torch.nn.BatchNorm1d(32)
        self.c2 = torch.nn.Conv1d(32, 24, 3, padding=1)
        self.out = torch.nn.Linear(24, _tiny.CLASSES)

    def forward(self, x):
        h = torch.relu(self.c2(torch.relu(self.bn(self.c1(x)))))
        return self.out(h.mean(-1))


def _audio(n: int, seed: int) -> list:
    g = torch.Generator().manual_seed(seed)
    batches = []
    for i in range(n):
        x = torch.randn(16, 3, 10 + 3 * (i % 4), generator=g)
        batches.append((x, (x[:, 0].mean(-1) > 0).long() + 2 * (x[:, 1].mean(-1) > 0).long()))
    return batches


def test_a_conv1d_model_over_varying_lengths_is_compressed_end_to_end(tmp_path) -> None:
    import onnxruntime as ort

    result = mc.compress(_Audio(), _audio(16, 1), _audio(4, 2), config=CFG.replace(epochs=2),
                         out=tmp_path / "out")
    assert result.widths["c1"] < 32 and result.widths["c2"] < 24
    report = read_report(tmp_path / "out" / "report.json")
    assert report["status"] == "ok"
    assert {layer["name"]: layer["size_status"] for layer in report["layers"]}["bn"] == "folded"
    session = ort.InferenceSession(str(tmp_path / "out" / "model.onnx"))
    x = torch.randn(2, 3, 23)  # a length no batch had
    got = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
    with torch.no_grad():
        torch.testing.assert_close(torch.from_numpy(got), result.model.eval()(x),
                                   rtol=1e-4, atol=1e-5)
    rebuilt = mc.load(_Audio(), tmp_path / "out").eval()
    with torch.no_grad():
        assert torch.equal(rebuilt(x), result.model(x))


class _ConcatDepthwise(torch.nn.Module):
    """A depthwise conv over two branches concatenated: its channels are two groups' units."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.a, self.b = torch.nn.Conv2d(3, 8, 1), torch.nn.Conv2d(3, 8, 1)
        self.dw = torch.nn.Conv2d(16, 16, 3, padding=1, groups=16)
        self.pw = torch.nn.Conv2d(16, 12, 1)
        self.fc = torch.nn.Linear(12, 2)

    def forward(self, x):
        h = torch.cat([torch.relu(self.a(x)), torch.relu(self.b(x))], 1)
        return self.fc(torch.relu(self.pw(torch.relu(self.dw(h)))).mean((2, 3)))


def _images(n: int, seed: int) -> list:
    g = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(n):
        x = torch.randn(16, 3, 5, 5, generator=g)
        batches.append((x, (x[:, 0].mean((1, 2)) > 0).long()))
    return batches


def test_a_depthwise_conv_over_a_concat_follows_both_branches(tmp_path) -> None:
    """Its counters are cut at its own channel positions (b's units sit after a's)."""
    result = mc.compress(_ConcatDepthwise(), _images(8, 1), _images(2, 2),
                         config=CFG.replace(k=3, epochs=2), out=tmp_path / "out")
    widths = result.widths
    assert widths["a"] < 8 and widths["b"] < 8
    assert result.model.dw.groups == result.model.pw.in_channels == widths["a"] + widths["b"]
    assert read_report(tmp_path / "out" / "report.json")["status"] == "ok"


def test_a_depthwise_block_is_compressed_and_its_activity_follows_the_prune(tmp_path) -> None:
    """The depthwise conv is wrapped by meProp too: its counters must shrink with 'expand'."""
    from test_surgery_zoo import InvertedResidual

    def build() -> torch.nn.Module:
        torch.manual_seed(0)
        return InvertedResidual()

    result = mc.compress(build(), _images(16, 1), _images(4, 2), config=CFG.replace(epochs=2),
                         out=tmp_path / "out")
    width = result.widths["expand"]
    assert width < 12 and result.model.dw.groups == result.model.dw.out_channels == width
    report = read_report(tmp_path / "out" / "report.json")
    assert report["status"] == "ok"
    layers = {layer["name"]: layer for layer in report["layers"]}
    assert layers["dw"]["width_after"] == width and layers["dw"]["params_after"] == 9 * width
    # the bias-free 1x1 projection cannot take the removed channels' mean: said once
    assert report["notes"] == [
        "'project' is not compensated: it has no bias to fold the removed inputs into"]
    x = _images(1, 3)[0][0]
    rebuilt = mc.load(build(), tmp_path / "out").eval()
    with torch.no_grad():
        assert torch.equal(rebuilt(x), result.model.eval()(x))


def _batch_statistics_mlp() -> torch.nn.Module:
    """BatchNorm on batch statistics in eval too: it runs on two or more examples only."""
    torch.manual_seed(0)
    nn = torch.nn
    return nn.Sequential(nn.Linear(12, 32), nn.BatchNorm1d(32, track_running_stats=False),
                         nn.ReLU(), nn.Linear(32, 24), nn.ReLU(), nn.Linear(24, 4))


def test_the_batch_axis_is_checked_at_two_when_the_model_needs_two_examples(data) -> None:
    from mesimp_compress.pipeline import _resized_batch

    model = _batch_statistics_mlp().eval()
    batches, names = [(torch.randn(8, 12),)], ["eval batch 1"]
    assert _resized_batch(model, batches, names) == []
    assert names[1] == "eval batch 1 resized to batch 2" and batches[1][0].shape == (2, 12)
    assert torch.equal(batches[1][0], batches[0][0][:2])
    batches, names = [(torch.randn(2, 12),)], ["eval batch 1"]  # 2 is its own size: 1 fails
    assert _resized_batch(model, batches, names) == [
        "the model does not run on eval batch 1 resized to batch 1 (ValueError): the ONNX "
        "files' batch axis is checked at the eval batches' own sizes only"]
    assert len(batches) == 1


def test_a_model_that_needs_two_examples_per_batch_is_compressed(tmp_path, data) -> None:
    result = mc.compress(_batch_statistics_mlp(), *data, config=CFG, out=tmp_path / "out")
    assert result.report["status"] == "ok" and result.report["notes"] == []
    assert result.widths["0"] < 32


class _WithSpare(torch.nn.Module):
    """The tiny MLP with a trained scalar gain and a parameter forward never reads."""

    def __init__(self) -> None:
        super().__init__()
        self.mlp = _tiny.mlp()
        self.gain = torch.nn.Parameter(torch.tensor(1.3))
        self.spare = torch.nn.Parameter(torch.randn(8))

    def forward(self, x):
        return self.mlp(x) * self.gain


def test_a_parameter_forward_never_uses_is_no_size_error(tmp_path, data) -> None:
    """The exporter leaves it out of both files: '' held 1 of its 9 elements, a SizeError
    after fine-tuning (the whole run lost, its checkpoint left behind)."""
    result = mc.compress(_WithSpare(), *data, config=CFG, out=tmp_path / "out")
    assert result.report["status"] == "ok" and result.widths["mlp.0"] < 32
    assert not list(tmp_path.glob(".*checkpoint*"))


class _TimeMajor(torch.nn.Module):
    """nn.LSTM as torch builds it by default: inputs (T, B, F), one class score row per
    sequence."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.lstm = torch.nn.LSTM(6, 24)
        self.hidden = torch.nn.Linear(24, 24)
        self.out = torch.nn.Linear(24, 3)

    def forward(self, x):
        return self.out(torch.relu(self.hidden(self.lstm(x)[0][-1])))


def test_time_major_inputs_weigh_metrics_by_examples_and_export_any_batch(tmp_path) -> None:
    import onnxruntime as ort

    g = torch.Generator().manual_seed(0)

    def batch(steps, examples):
        return (torch.randn(steps, examples, 6, generator=g),
                torch.randint(0, 3, (examples,), generator=g))

    train = [batch(5, 4) for _ in range(8)]
    evaluation = [batch(5, 2), batch(5, 6)]  # 2 examples, then 6

    def first_right(outputs, targets):  # a batch mean: 1 on the batch of 2, 0 on that of 6
        return float(outputs.shape[0] == 2)

    cfg = CFG.replace(batch_dim=1, batches=[1, 3])
    said: list[str] = []
    result = mc.compress(_TimeMajor(), train, evaluation, config=cfg, metric=first_right,
                         out=tmp_path / "out", sink=lambda e: said.append(e.kind))
    assert result.metric_before == pytest.approx(2 / 8)  # by T (5 and 5) it would be 1/2
    assert result.report["status"] == "ok"
    assert not [n for n in result.report["notes"] if "time-major" in n]
    assert result.report["metrics"]["ort_before"] == pytest.approx(2 / 8)
    session = ort.InferenceSession(str(tmp_path / "out" / "model.onnx"))
    assert session.get_inputs()[0].shape == [5, "batch", 6]
    x = torch.randn(5, 7, 6)
    with torch.no_grad():
        expected = result.model.eval()(x)
    got = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
    assert got.shape == (7, 3) and np.allclose(got, expected.numpy(), atol=1e-5)
    assert [row["batch"] for row in result.report["latency"]["rows"]][:2] == [1, 3]

    # batch-first assumed, the batches weigh by T (a note names batch_dim)
    quick = mc.compress(_TimeMajor(), train, evaluation, config=CFG, metric=first_right)
    assert quick.metric_before == pytest.approx(1 / 2)


def test_a_time_major_layer_with_batch_first_inputs_assumed_is_noted() -> None:
    from mesimp_compress.simplify import _layout_notes

    assert _layout_notes(_TimeMajor(), 0) == [
        "'lstm' (LSTM) takes time-major input (batch_first=False): if the model's inputs are "
        "(T, B, ...) too, set batch_dim = 1, so that metrics count examples and the ONNX files "
        "take any batch size"]
    assert _layout_notes(_TimeMajor(), 1) == []
    layer = torch.nn.TransformerEncoderLayer(8, 2, batch_first=True)
    assert _layout_notes(torch.nn.Sequential(layer), 0) == []
    assert "'0' (TransformerEncoderLayer)" in _layout_notes(
        torch.nn.Sequential(torch.nn.TransformerEncoderLayer(8, 2)), 0)[0]


class _KeywordClassifier(torch.nn.Module):
    """Named inputs and a dict output, as Hugging Face sequence classifiers have them."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed = torch.nn.Embedding(50, 16)
        self.hidden = torch.nn.Linear(16, 32)
        self.head = torch.nn.Linear(32, 3)

    def forward(self, input_ids, attention_mask=None):
        mask = attention_mask.unsqueeze(-1).float()
        pooled = (self.embed(input_ids) * mask).sum(1) / mask.sum(1).clamp(min=1)
        return {"logits": self.head(torch.relu(self.hidden(pooled)))}


def test_dict_batches_and_a_dict_output_with_logits_compress_end_to_end(tmp_path) -> None:
    g = torch.Generator().manual_seed(0)

    def batch(n):
        ids = torch.randint(1, 50, (n, 7), generator=g)
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids),
                "labels": ids[:, 0] % 3}

    train, evaluation = [batch(8) for _ in range(8)], [batch(8), batch(3)]
    result = mc.compress(_KeywordClassifier(), train, evaluation, config=CFG,
                         out=tmp_path / "out")
    assert result.report["status"] == "ok" and result.widths["hidden"] < 32
    right = count = 0
    with torch.no_grad():
        for b in evaluation:
            logits = result.model(b["input_ids"], b["attention_mask"])["logits"]
            right += int((logits.argmax(-1) == b["labels"]).sum())
            count += len(b["labels"])
    assert result.metric_after == pytest.approx(right / count)
    assert result.report["export"]["compressed"]["input_names"] == ["input_ids", "attention_mask"]


class TinyForCausalLM(torch.nn.Module):
    """Named like a Hugging Face causal LM: it would shift its labels itself."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed = torch.nn.Embedding(12, 16)
        self.hidden = torch.nn.Linear(16, 32)
        self.head = torch.nn.Linear(32, 12)

    def forward(self, input_ids, attention_mask=None):
        return {"logits": self.head(torch.relu(self.hidden(self.embed(input_ids))))}


def test_a_causal_lm_given_collator_labels_is_scored_on_the_next_token() -> None:
    g = torch.Generator().manual_seed(0)

    def batch():  # each sequence counts up: the next token is always the current one + 1
        start = torch.randint(0, 4, (8, 1), generator=g)
        ids = start + torch.arange(6)
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}

    train, evaluation = [batch() for _ in range(8)], [batch(), batch()]
    said: list[str] = []
    result = mc.compress(TinyForCausalLM(), train, evaluation, config=CFG.replace(lr=3e-2),
                         sink=lambda e: said.append(e.data["message"]) if e.kind == "note" else 0)
    with torch.no_grad():
        logits = [TinyForCausalLM()(b["input_ids"])["logits"] for b in evaluation]
    right = sum(int((out[:, :-1].argmax(-1) == b["labels"][:, 1:]).sum())
                for out, b in zip(logits, evaluation, strict=True))
    assert result.metric_before == pytest.approx(right / (2 * 8 * 5))
    assert result.metric_after > 0.9  # learned to count on; copying the input scores 0
    assert any("TinyForCausalLM is a causal language model" in n for n in said)


class _Quits(torch.nn.Module):
    """The tiny MLP whose forward calls sys.exit() on its ``at``-th call."""

    def __init__(self, at: int) -> None:
        super().__init__()
        self.mlp, self.at, self.calls = _tiny.mlp(), at, 0

    def forward(self, x):
        self.calls += 1
        if self.calls == self.at:
            raise SystemExit(4)
        return self.mlp(x)


@pytest.mark.parametrize("at", [1, 2, 3, 12])
def test_sys_exit_in_the_model_is_a_typed_error_wherever_it_runs(tmp_path, data, at) -> None:
    """First-batch check, tracing, the original's export, training: the library never exits."""
    with pytest.raises(mc.MesimpError, match=r"SystemExit \(sys.exit\(4\) was called\)"):
        mc.compress(_Quits(at), *data, config=CFG, out=tmp_path / "out")
    assert not (tmp_path / "out").exists()


class _StopAfterCheckpoint(Exception):
    pass


def _stop_at_first_checkpoint(event) -> None:
    if event.kind == "checkpoint":
        raise _StopAfterCheckpoint


def test_a_resume_from_other_original_weights_is_refused(tmp_path, data) -> None:
    """Resuming with another weights file mixed two models: the report's metric before came
    from the checkpoint's original, original.onnx and the teacher from the new one."""
    from mesimp_compress.checkpoint import Checkpointer, default_dir

    out = tmp_path / "out"
    with pytest.raises(_StopAfterCheckpoint):
        mc.compress(_tiny.mlp(), *data, config=CFG, out=out, sink=_stop_at_first_checkpoint)
    assert Checkpointer(default_dir(out)).exists()
    other = _tiny.mlp()
    with torch.no_grad():
        other[0].weight.mul_(1.01)
    with pytest.raises(mc.CheckpointError, match="made from other original weights"):
        mc.compress(other, *data, config=CFG, out=out, resume=True)
    result = mc.compress(_tiny.mlp(), *data, config=CFG, out=out, resume=True)
    assert result.report["status"] == "ok"


def test_a_damaged_checkpoint_is_a_checkpoint_error(tmp_path, data) -> None:
    from mesimp_compress.checkpoint import Checkpointer, default_dir

    out = tmp_path / "out"
    Checkpointer(default_dir(out)).save({"config": CFG.to_dict()})  # settings, nothing else
    with pytest.raises(mc.CheckpointError, match="is damaged: it lacks epoch, batch, window"):
        mc.compress(_tiny.mlp(), *data, config=CFG, out=out, resume=True)
    Checkpointer(default_dir(out)).save({"plan": {}})
    with pytest.raises(mc.CheckpointError, match="is damaged: it holds no settings"):
        mc.compress(_tiny.mlp(), *data, config=CFG, out=out, resume=True)


def test_the_original_is_timed_from_the_compressed_files_exporter(tmp_path, data,
                                                                  monkeypatch) -> None:
    """model.onnx fell back to TorchScript while original.onnx came from dynamo: the
    speedup then partly measured the exporters."""
    from mesimp_compress import export

    made: list[tuple[str, str]] = []
    real = export.export_onnx

    def export_onnx(model, inputs, path, **kwargs):
        if Path(path).name == "model.onnx":
            kwargs["exporter"] = "torchscript"  # as after a dynamo failure
        result = real(model, inputs, path, **kwargs)
        made.append((Path(path).name, result.exporter))
        return result

    monkeypatch.setattr(export, "export_onnx", export_onnx)
    result = mc.compress(_tiny.mlp(), *data, config=CFG, out=tmp_path / "out")
    assert result.report["status"] == "ok"
    assert made == [("original.onnx", "dynamo"), ("model.onnx", "torchscript"),
                    ("original.onnx", "torchscript"), ("reference.onnx", "torchscript")]
    assert any("the original is timed from a torchscript export of its own" in note
               for note in result.report["notes"])
    assert (tmp_path / "out" / "original.onnx").is_file()  # the published file is unchanged


class _OptionalBias(torch.nn.Module):
    """The tiny MLP with an optional second argument, passed as None in every batch."""

    def __init__(self) -> None:
        super().__init__()
        self.mlp = _tiny.mlp()

    def forward(self, x, shift=None):
        return self.mlp(x if shift is None else x + shift)


def test_a_none_input_is_a_shape_error_naming_it_with_an_output_folder(tmp_path, data) -> None:
    """It trained without out= and was an AttributeError traceback with it."""
    train, evaluation = ([((x, None), y) for x, y in part] for part in data)
    with pytest.raises(mc.ShapeError, match="example input 1 is a NoneType, not a tensor: an "
                                            "ONNX file takes tensors only"):
        mc.compress(_OptionalBias(), train, evaluation, config=CFG, out=tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


class _ClassBias(torch.nn.Module):
    """The tiny MLP plus a per-class bias passed whole with every batch."""

    def __init__(self) -> None:
        super().__init__()
        self.mlp = _tiny.mlp()

    def forward(self, x, bias):
        return self.mlp(x) + bias


def test_an_input_without_a_batch_axis_is_exported_whole(tmp_path, data) -> None:
    """Its dim 0 was taken for the batch: the export failed, blaming the features."""
    import onnx

    bias = torch.tensor([0.1, -0.2, 0.3, 0.0])
    train, evaluation = ([((x, bias), y) for x, y in part] for part in data)
    result = mc.compress(_ClassBias(), train, evaluation, config=CFG, out=tmp_path / "out")
    assert result.report["status"] == "ok"
    for name in ("original.onnx", "model.onnx"):
        graph = onnx.load(str(tmp_path / "out" / name)).graph
        dims = [[d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]
                for v in graph.input]
        assert dims == [["batch", _tiny.IN_FEATURES], [4]]


class _BatchBranch(torch.nn.Module):
    """The tiny MLP whose output flips sign for batches of 8 or fewer examples."""

    def __init__(self) -> None:
        super().__init__()
        self.mlp = _tiny.mlp()

    def forward(self, x):
        out = self.mlp(x)
        return out if x.shape[0] > 8 else -out


def test_a_file_wrong_only_at_the_resized_batch_says_so(tmp_path, data) -> None:
    """The advice was 'set atol/rtol or opset', naming no batch."""
    with pytest.raises(mc.ParityError, match=r"on eval batch 1 resized to batch 1, beyond atol "
                                             r".*a model that branches on its batch size"):
        mc.compress(_BatchBranch(), *data, config=CFG, out=tmp_path / "out")


class _Counter(torch.nn.Module):
    """The tiny MLP counting its forward calls in a buffer."""

    def __init__(self) -> None:
        super().__init__()
        self.mlp = _tiny.mlp()
        self.register_buffer("calls", torch.zeros((), dtype=torch.long))

    def forward(self, x):
        self.calls += 1
        return self.mlp(x)


def test_weights_pt_holds_the_returned_model_even_when_forward_moves_a_buffer(tmp_path,
                                                                              data) -> None:
    """The proof's forwards ran on the copy before it was saved: 49 calls saved, 41 returned."""
    result = mc.compress(_Counter(), *data, config=CFG, out=tmp_path / "out")
    saved = torch.load(tmp_path / "out" / "weights.pt", weights_only=True)
    assert int(saved["calls"]) == int(result.model.calls) > 0
    assert int(mc.load(_Counter(), tmp_path / "out").calls) == int(result.model.calls)


def test_compress_gives_back_the_callers_threads_and_random_generators(data) -> None:
    """It left torch at its threads setting and every generator reseeded to its seed."""
    import random

    torch.set_num_threads(1)
    model = _tiny.mlp()  # (it seeds torch itself)
    torch.manual_seed(123)
    random.seed(123)
    np.random.seed(123)
    want = (torch.rand(3), random.random(), np.random.rand())
    torch.manual_seed(123)
    random.seed(123)
    np.random.seed(123)
    mc.compress(model, *data, config=CFG.replace(threads=2))
    assert torch.get_num_threads() == 1
    got = (torch.rand(3), random.random(), np.random.rand())
    assert torch.equal(got[0], want[0]) and got[1:] == want[1:]


def test_submodules_the_caller_froze_in_eval_mode_stay_frozen(data) -> None:
    """m.train(); m.bn.eval() (a frozen BatchNorm): its statistics moved while fine-tuning
    and it came back in train mode."""
    nn = torch.nn
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(_tiny.IN_FEATURES, 32), nn.BatchNorm1d(32), nn.ReLU(),
                          nn.Linear(32, 24), nn.ReLU(), nn.Linear(24, _tiny.CLASSES))
    model.train()
    model[1].eval()
    result = mc.compress(model, *data, config=CFG)
    assert result.widths["0"] < 32
    bn = result.model[1]
    assert result.model.training and not bn.training and int(bn.num_batches_tracked) == 0


def test_a_file_where_the_checkpoint_folder_goes_is_refused_before_training(tmp_path,
                                                                           data) -> None:
    (tmp_path / ".out.checkpoint").write_text("mine")
    with pytest.raises(mc.CheckpointError, match="is a file; the run keeps its checkpoint "
                                                 "folder there"):
        mc.compress(_tiny.mlp(), *data, config=CFG, out=tmp_path / "out")
    assert (tmp_path / ".out.checkpoint").read_text() == "mine"


@pytest.mark.parametrize("case", ["out in /proc", "sink", "load None", "plan None",
                                  "no parameters"])
def test_wrong_arguments_of_public_calls_are_typed_errors(case, data) -> None:
    from mesimp_compress.errors import CheckpointError, ConfigError, OutputError, PlanError

    calls = {
        "out in /proc": (OutputError, lambda: mc.compress(_tiny.mlp(), *data, config=CFG,
                                                          out="/proc/mesimp-out")),
        "sink": (ConfigError, lambda: mc.compress(_tiny.mlp(), *data, config=CFG, sink=5)),
        "load None": (CheckpointError, lambda: mc.load(_tiny.mlp(), None)),
        "plan None": (PlanError, lambda: mc.Plan.from_json(None)),
        "no parameters": (ConfigError, lambda: mc.RowSparseAdam([])),
    }
    error, call = calls[case]
    with pytest.raises(error):
        call()


def test_an_optimizer_step_that_overflows_is_a_non_finite_error(data) -> None:
    with pytest.raises(mc.NonFiniteLossError, match="overflowed on train batch 1.*lower the"):
        mc.compress(_tiny.mlp(), *data, config=CFG.replace(lr=1e38))


def test_a_latency_batch_too_large_for_memory_fails_before_fine_tuning(tmp_path, data) -> None:
    events = []
    with pytest.raises(mc.ConfigError, match="batch 1000000000000 would take .* GiB"):
        mc.compress(_tiny.mlp(), *data, config=CFG.replace(batches=[1, 10**12]),
                    out=tmp_path / "out", sink=events.append)
    assert not [e for e in events if e.kind in ("window", "epoch_start")]
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("why", ["no hits under the rate", "every prune rolled back"])
def test_a_run_that_prunes_nothing_says_why(data, why) -> None:
    events, calls = [], []

    def falling(outputs, targets):  # worse at every evaluation: the guard undoes each prune
        calls.append(1)
        return torch.tensor(1.0 - 0.001 * len(calls))

    if why == "no hits under the rate":
        cfg, metric, says = CFG.replace(prune_rate=0.0), None, "no unit's hits fell below"
    else:
        cfg, metric, says = CFG.replace(max_drop=0.0001), falling, "rolled back every prune"
    result = mc.compress(_tiny.mlp(), *data, config=cfg, metric=metric, sink=events.append)
    assert all(len(v) == result.widths_before[k] for k, v in result.plan.kept.items())
    notes = [e.data["message"] for e in events if e.kind == "note"]
    assert any(n.startswith("nothing was pruned: ") and says in n for n in notes), notes


class _Unsized:
    """Re-iterable batches without a len(), as a stream gives them."""

    def __init__(self, batches) -> None:
        self.batches = list(batches)

    def __iter__(self):
        return iter(self.batches)


def test_every_note_of_the_run_reaches_the_report(tmp_path, data) -> None:
    train, evaluation = data
    events = []
    result = mc.compress(_tiny.mlp(), _Unsized(train), evaluation,
                         config=CFG.replace(epoch_batches=len(list(train)) * 2),
                         out=tmp_path / "out", sink=events.append)
    shown = [e.data["message"] for e in events if e.kind == "note"]
    assert any("epoch_batches gives" in n for n in shown)
    saved = read_report(tmp_path / "out" / "report.json")["notes"]
    assert set(shown) <= set(saved) and saved == result.report["notes"]


def test_the_report_names_the_meprop_backward_that_trained(run, data, tmp_path) -> None:
    from mesimp_compress.meprop import native

    _, result, _ = run
    built = native.module() is not None
    assert result.report["versions"]["meprop_backward"] == ("compiled" if built else "python")
    python = mc.compress(_tiny.mlp(), *data, config=CFG.replace(mode="per_example"),
                         out=tmp_path / "pe")  # a mode only the Python backward runs
    assert python.report["versions"]["meprop_backward"] == "python"
