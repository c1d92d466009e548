import _onnx_zoo as zoo
import pytest
import torch
from torch import nn

from mesimp_compress.errors import ConfigError, ShapeError
from mesimp_compress.export import export_onnx
from mesimp_compress.latency import (
    benchmark,
    dense_twin,
    flat_row,
    inputs_from_onnx,
    signature_of,
)

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    folder = tmp_path_factory.mktemp("latency")
    original = zoo.mlp()
    small = zoo.slice_mlp(original, zoo.KEEP1, zoo.KEEP2)
    x = torch.randn(2, 16)
    a = export_onnx(original, (x,), folder / "a.onnx", exporter="torchscript")
    b = export_onnx(small, (x,), folder / "b.onnx", exporter="torchscript")
    return {"original": a.path, "compressed": b.path}, (x,)


def test_benchmark_rows_cover_every_thread_count_and_batch(pair):
    models, inputs = pair
    events = []
    result = benchmark(
        models,
        inputs,
        batches=(1, 3),
        threads=(1, 2),
        warmup=1,
        rounds=3,
        block=2,
        sink=events.append,
    )
    assert [(r.threads, r.batch) for r in result.rows] == [(1, 1), (1, 3), (2, 1), (2, 3)]
    assert [e.kind for e in events].count("bench_row") == 4
    for row in result.rows:
        assert set(row.timings) == {"original", "compressed"}
        assert all(t.calls == 6 for t in row.timings.values())  # rounds x block, each call timed
        t = row.timings["compressed"]
        assert 0 < t.p10_ms <= t.median_ms <= t.p90_ms
        s = row.speedups["compressed"]
        assert s.value == pytest.approx(row.timings["original"].median_ms / t.median_ms)
        assert s.low <= s.high
        assert list(row.speedups) == ["compressed"]  # the baseline has none


def test_flat_rows_carry_median_p90_and_speedup_per_model(pair):
    models, inputs = pair
    result = benchmark(models, inputs, batches=(2,), warmup=0, rounds=1, block=1)
    data = result.to_dict()
    (row,) = data["rows"]
    assert data["models"] == ["original", "compressed"] and data["baseline"] == "original"
    assert data["settings"]["graph_optimization_level"] == "ORT_ENABLE_ALL"
    assert data["settings"]["spread"].startswith("p10..p90")
    for key in (
        "batch",
        "seq",
        "threads",
        "original_median_ms",
        "original_p90_ms",
        "compressed_median_ms",
        "compressed_p90_ms",
        "speedup",
        "speedup_low",
        "speedup_high",
        "compressed_speedup",
    ):
        assert key in row
    assert row["speedup"] == row["compressed_speedup"]
    assert row == flat_row(result.rows[0], "original")


def test_max_seconds_stops_rounds_early_but_keeps_three(pair):
    models, inputs = pair
    result = benchmark(models, inputs, batches=(1,), warmup=0, rounds=50, block=1, max_seconds=0.0)
    assert result.rows[0].timings["original"].calls == 3


def test_bad_settings_are_config_errors(pair):
    models, inputs = pair
    with pytest.raises(ConfigError, match="batch sizes"):
        benchmark(models, inputs, batches=(0,))
    with pytest.raises(ConfigError, match="thread counts"):
        benchmark(models, inputs, threads=())
    with pytest.raises(ConfigError, match="rounds"):
        benchmark(models, inputs, rounds=0)


def test_inputs_from_an_onnx_signature_size_batch_and_sequence(tmp_path):
    torch.manual_seed(0)
    path = export_onnx(
        zoo.Tagger(),
        (torch.randint(0, 50, (2, 7)),),
        tmp_path / "tagger.onnx",
        exporter="torchscript",
    ).path
    inputs, axes, names = inputs_from_onnx(path, batch=3, seq=11)
    assert names == ["ids"] and axes == [{0: "batch", 1: "seq"}]
    assert inputs[0].shape == (3, 11) and inputs[0].dtype == torch.int64
    assert int(inputs[0].min()) == int(inputs[0].max()) == 1  # a valid id everywhere
    assert signature_of(path) == [("ids", 7, ["batch", "seq"])]
    result = benchmark(
        {"tagger": path},
        inputs,
        batches=(2,),
        seq=5,
        warmup=0,
        rounds=1,
        block=1,
        axes=axes,
        input_names=names,
    )
    assert result.rows[0].seq == 5 and result.rows[0].speedups == {}
    as_given = benchmark({"tagger": path}, inputs, batches=(2,), warmup=0, rounds=1, block=1,
                         axes=axes, input_names=names)
    assert as_given.rows[0].seq == as_given.settings["seq"] == 11  # the length it timed (None)


class _Packed(nn.Module):
    """Features and their lengths, packed into an LSTM (two layers: torch exports a packed
    one-layer LSTM with neither exporter)."""

    def __init__(self) -> None:
        super().__init__()
        self.lstm = nn.LSTM(3, 4, num_layers=2, batch_first=True)

    def forward(self, x, lengths):
        packed = nn.utils.rnn.pack_padded_sequence(x, lengths, batch_first=True,
                                                   enforce_sorted=False)
        return self.lstm(packed)[1][0][-1]


def test_time_major_axes_are_read_by_name_and_lengths_follow_the_sequence(tmp_path):
    time_major = export_onnx(
        zoo.Tagger(), (torch.randint(0, 50, (7, 2)),), tmp_path / "tm.onnx",
        dynamic_axes=[{0: "seq", 1: "batch"}],
    ).path
    inputs, axes, _ = inputs_from_onnx(time_major, batch=3, seq=11)
    assert axes == [{0: "seq", 1: "batch"}] and inputs[0].shape == (11, 3)
    packed = export_onnx(
        _Packed(), (torch.randn(2, 6, 3), torch.tensor([6, 4])), tmp_path / "packed.onnx",
        dynamic_axes=[{0: "batch", 1: "seq"}, {0: "batch"}],
    ).path
    inputs, axes, names = inputs_from_onnx(packed, batch=3, seq=9)
    assert names == ["x", "lengths"] and inputs[0].shape == (3, 9, 3)
    assert inputs[1].tolist() == [9, 9, 9]  # every step runs, as real lengths would


def test_an_input_axis_that_is_neither_batch_nor_sequence_is_refused(tmp_path):
    model = zoo.mlp()
    r = export_onnx(
        model,
        (torch.randn(2, 3, 16),),
        tmp_path / "odd.onnx",
        exporter="torchscript",
        dynamic_axes=[{0: "batch", 2: "features"}],
    )
    with pytest.raises(ShapeError, match="neither a batch nor a sequence axis: give its size "
                                         "\\(--size features=N\\)"):
        inputs_from_onnx(r.path)
    inputs, axes, _ = inputs_from_onnx(r.path, batch=3, sizes={"features": 16})
    assert inputs[0].shape == (3, 3, 16) and axes == [{0: "batch"}]  # timed at that size


def test_bench_sizes_other_axes_by_name(tmp_path):
    """Files of a model over images of several sizes were refused by mesimp bench."""
    from mesimp_compress.cli.main import app
    from typer.testing import CliRunner

    paths = [export_onnx(nn.Conv2d(3, 4, 3), (torch.randn(2, 3, 8, 8),), tmp_path / f"{n}.onnx",
                         dynamic_axes=[{0: "batch", 2: "input0_dim2", 3: "input0_dim3"}]).path
             for n in ("a", "b")]
    args = ["bench", *map(str, paths), "--batch", "2", "--threads", "1", "--rounds", "1",
            "--warmup", "0", "--json"]
    refused = CliRunner().invoke(app, args)
    assert refused.exit_code == 2 and "--size input0_dim2=N" in refused.stderr
    timed = CliRunner().invoke(app, [*args, "--size", "input0_dim2=8", "--size", "input0_dim3=6"])
    assert timed.exit_code == 0, timed.output


class _HookedLinear(nn.Linear):
    """A Linear subclass with extra work in forward, as a careless surgery might leave."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x * torch.ones_like(x))


def test_dense_twin_rebuilds_every_layer_as_a_plain_module_with_the_same_function():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 3, 3, padding=1),
        nn.BatchNorm2d(3),
        nn.ReLU(),
        nn.Flatten(),
        _HookedLinear(3 * 4 * 4, 5),
        nn.LayerNorm(5),
    ).eval()
    model[1].running_mean.uniform_(-1, 1)
    calls = []
    model[4].register_forward_hook(lambda *args: calls.append(1))
    twin = dense_twin(model)
    assert [type(m) for m in twin] == [
        nn.Conv2d,
        nn.BatchNorm2d,
        nn.ReLU,
        nn.Flatten,
        nn.Linear,
        nn.LayerNorm,
    ]
    x = torch.randn(2, 1, 4, 4)
    with torch.no_grad():
        assert torch.equal(twin(x), model(x))
    assert len(calls) == 1  # only the original's hook ran
    assert torch.equal(twin[1].running_mean, model[1].running_mean)
    assert twin[4] is not model[4] and twin[4].weight.data_ptr() != model[4].weight.data_ptr()


def test_dense_twin_keeps_a_float64_model_in_float64():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.BatchNorm1d(5), nn.Linear(5, 2)).double().eval()
    model[1].running_var.uniform_(0.5, 2.0)
    twin = dense_twin(model)
    assert {p.dtype for p in twin.state_dict().values() if p.is_floating_point()} == {
        torch.float64
    }
    x = torch.randn(3, 6, dtype=torch.float64)
    with torch.no_grad():
        assert torch.equal(twin(x), model(x))


def test_dense_twin_of_a_bidirectional_lstm_tagger():
    torch.manual_seed(0)
    model = zoo.Tagger().eval()
    twin = dense_twin(model)
    assert type(twin.lstm) is nn.LSTM and twin.lstm.num_layers == 2 and twin.lstm.bidirectional
    ids = torch.randint(0, 50, (3, 6))
    with torch.no_grad():
        assert torch.equal(twin(ids), model(ids))


def test_dense_twin_leaves_a_parametrized_layer_as_it_is():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 2)).eval()
    torch.nn.utils.parametrizations.weight_norm(model[0])
    twin = dense_twin(model)
    assert torch.nn.utils.parametrize.is_parametrized(twin[0]) and type(twin[2]) is nn.Linear
    x = torch.randn(3, 4)
    with torch.no_grad():
        assert torch.equal(twin(x), model(x))
