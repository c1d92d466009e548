import json
import subprocess
import sys
import textwrap

import _onnx_zoo as zoo
import numpy as np
import pytest
import torch
from mesimp_compress.cli.main import app
from typer.testing import CliRunner

from mesimp_compress.export import export_onnx
from mesimp_compress.verify import make_session, run_onnx

torch.set_num_threads(1)
runner = CliRunner()


@pytest.fixture
def factory(tmp_path):
    path = tmp_path / "net.py"
    path.write_text(
        textwrap.dedent("""
        import torch
        from torch import nn

        def build():
            torch.manual_seed(0)
            return nn.Sequential(nn.Linear(8, 6), nn.ReLU(), nn.Linear(6, 3))
        """)
    )
    return path


def test_export_writes_a_checked_file_and_reports_parity_as_json(factory, tmp_path):
    out = tmp_path / "net.onnx"
    result = runner.invoke(
        app,
        [
            "export",
            f"{factory}:build",
            "--input-shape",
            "2,8",
            "--out",
            str(out),
            "--exporter",
            "torchscript",
            "--json",
        ],
    )
    assert result.exit_code == 0, result.output
    payload = json.loads(result.stdout)
    assert payload["export"]["exporter"] == "torchscript"
    assert payload["export"]["dynamic_axes"] == {"input": {"0": "batch"}}
    assert payload["parity"]["passed"] is True and payload["parity"]["batches"] == 3
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 6), torch.nn.ReLU(), torch.nn.Linear(6, 3))
    x = torch.randn(4, 8)
    (got,) = run_onnx(make_session(out), (x,))
    assert np.allclose(got, model(x).detach().numpy(), atol=1e-5)


def test_export_loads_weights_and_prints_a_table(factory, tmp_path):
    weights = tmp_path / "w.pt"
    small = torch.nn.Sequential(torch.nn.Linear(8, 6), torch.nn.ReLU(), torch.nn.Linear(6, 3))
    state = {k: torch.full_like(v, 0.5) for k, v in small.state_dict().items()}
    torch.save(state, weights)
    out = tmp_path / "w.onnx"
    result = runner.invoke(
        app,
        [
            "export",
            f"{factory}:build",
            "--input-shape",
            "float32:3,8",
            "--weights",
            str(weights),
            "--out",
            str(out),
            "--exporter",
            "dynamo",
        ],
    )
    assert result.exit_code == 0, result.output
    assert (
        "exporter" in result.stdout
        and "dynamo" in result.stdout
        and "parity output" in result.stdout
    )
    (got,) = run_onnx(make_session(out), (torch.ones(1, 8),))
    assert np.allclose(got, 0.5 * (0.5 * 8 + 0.5) * 6 + 0.5)  # every weight and bias 0.5


@pytest.mark.parametrize(
    "args, message",
    [
        (["--out", "{tmp}/a.onnx"], "either --input-shape or --data"),
        (["--input-shape", "2,x", "--out", "{tmp}/a.onnx"], "integer dims"),
        (["--input-shape", "complex:2,8", "--out", "{tmp}/a.onnx"], "unknown dtype 'complex'"),
        (["--input-shape", "2,8", "--axes", "batch", "--out", "{tmp}/a.onnx"], "dim=name pairs"),
        (["--input-shape", "2,7", "--out", "{tmp}/a.onnx"], "failed on the example inputs"),
        (["--input-shape", "2,8", "--axes", "5=x", "--out", "{tmp}/a.onnx"],
         "dynamic axis 5 (x) of input 0 does not exist"),
        (["--input-shape", "2,8", "--opset", "99", "--out", "{tmp}/a.onnx"],
         "opset must be an integer <="),
        (["--input-shape", "2,8", "--out", "{tmp}/file.txt/a.onnx"], "a parent of it is a file"),
        (["--input-shape", "2,8", "--atol", "-1", "--out", "{tmp}/a.onnx"],
         "tolerances must be atol > 0"),
        (["--input-shape", "2,8", "--atol", "nan", "--out", "{tmp}/a.onnx"],
         "tolerances must be atol > 0"),
        (["--input-shape", "99999999999999999999999,8", "--out", "{tmp}/a.onnx"],
         "too much for the"),
    ],
)
def test_export_user_errors_are_one_line_and_exit_2(factory, tmp_path, args, message):
    (tmp_path / "file.txt").write_text("a file")
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    result = runner.invoke(app, ["export", f"{factory}:build", *args, "--json"])
    assert result.exit_code == 2
    assert message in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert result.stdout == ""  # --json: nothing but JSON on stdout, and none on failure
    left = [p.name for p in tmp_path.iterdir() if "onnx" in p.name or "partial" in p.name]
    assert left == []  # no file, no staging


def test_export_refuses_to_overwrite_without_force(factory, tmp_path):
    out = tmp_path / "exists.onnx"
    out.write_text("keep me")
    result = runner.invoke(
        app, ["export", f"{factory}:build", "--input-shape", "2,8", "--out", str(out)]
    )
    assert result.exit_code == 2 and "--force" in result.stderr
    assert out.read_text() == "keep me"


@pytest.fixture(scope="module")
def onnx_pair(tmp_path_factory):
    folder = tmp_path_factory.mktemp("bench")
    original = zoo.mlp()
    small = zoo.slice_mlp(original, zoo.KEEP1, zoo.KEEP2)
    x = torch.randn(2, 16)
    a = export_onnx(original, (x,), folder / "orig.onnx", exporter="torchscript").path
    b = export_onnx(small, (x,), folder / "small.onnx", exporter="torchscript").path
    return a, b


def test_bench_json_gives_median_p90_and_speedup_per_batch(onnx_pair):
    a, b = onnx_pair
    result = runner.invoke(
        app,
        [
            "bench",
            str(a),
            str(b),
            "--batch",
            "1,4",
            "--threads",
            "1",
            "--rounds",
            "2",
            "--block",
            "2",
            "--warmup",
            "1",
            "--json",
        ],
    )
    assert result.exit_code == 0, result.output
    payload = json.loads(result.stdout)
    assert payload["models"] == ["orig", "small"]
    assert [(r["batch"], r["threads"]) for r in payload["rows"]] == [(1, 1), (4, 1)]
    for row in payload["rows"]:
        assert row["orig_median_ms"] > 0 and row["small_p90_ms"] >= row["small_median_ms"]
        assert row["speedup"] == pytest.approx(row["orig_median_ms"] / row["small_median_ms"])
    assert payload["machine"]["bench_threads"] == [1]
    assert payload["versions"]["onnxruntime"]


def test_bench_table_has_a_row_per_thread_count_and_batch(onnx_pair):
    a, b = onnx_pair
    result = runner.invoke(
        app,
        [
            "bench",
            str(a),
            str(b),
            "--batch",
            "2",
            "--threads",
            "1,2",
            "--rounds",
            "1",
            "--block",
            "1",
            "--warmup",
            "0",
        ],
    )
    assert result.exit_code == 0, result.output
    assert "small speedup" in result.stdout
    assert result.stdout.count("x [") == 2


def test_bench_errors(onnx_pair, tmp_path):
    a, _ = onnx_pair
    missing = runner.invoke(app, ["bench", str(a), str(tmp_path / "none.onnx")])
    assert missing.exit_code == 2 and "does not exist" in missing.stderr
    alone = runner.invoke(app, ["bench", str(a)])
    assert alone.exit_code == 2 and "at least two" in alone.stderr
    other = export_onnx(
        zoo.Tagger(),
        (torch.randint(0, 50, (2, 5)),),
        tmp_path / "tagger.onnx",
        exporter="torchscript",
    ).path
    mismatch = runner.invoke(app, ["bench", str(a), str(other), "--rounds", "1"])
    assert mismatch.exit_code == 2 and "takes inputs" in mismatch.stderr
    long = runner.invoke(app, ["bench", str(other), str(other), "--seq", "9" * 20])
    assert long.exit_code == 2 and "too much for the" in long.stderr, long.output
    assert len(long.stderr.strip().splitlines()) == 1
    bad_batch = runner.invoke(app, ["bench", str(a), str(a), "--batch", "0"])
    assert bad_batch.exit_code == 2 and "positive ints" in bad_batch.stderr
    (tmp_path / "garbage.onnx").write_bytes(b"\x08\xff\xff not protobuf")
    (tmp_path / "empty.onnx").write_bytes(b"")
    for name in ("garbage.onnx", "empty.onnx"):
        bad = runner.invoke(app, ["bench", str(a), str(tmp_path / name)])
        assert bad.exit_code == 2 and f"{name} is not an ONNX model" in bad.stderr, bad.output
        assert len(bad.stderr.strip().splitlines()) == 1
    folder = runner.invoke(app, ["bench", str(a), str(tmp_path)])
    assert folder.exit_code == 2 and "is a folder" in folder.stderr
    for args, says in ((["--threads", "1000000"], "thread counts must be ints in [1, 1024]"),
                       (["--max-seconds", "-1"], "max_seconds must be a finite number"),
                       (["--max-seconds", "nan"], "max_seconds must be a finite number"),
                       (["--seq", "0"], "sequence length must be >= 1"),
                       (["--batch", "99999999999999999999"], "too much for the"),
                       (["--size", "nope=3"], "has no symbolic axis 'nope'")):
        refused = runner.invoke(app, ["bench", str(a), str(a), *args])
        assert refused.exit_code == 2 and says in refused.stderr, refused.output
        assert len(refused.stderr.strip().splitlines()) == 1  # nothing printed before it


def _positions_onnx(path) -> str:
    """x (batch, seq) + a table of 16 positions: onnxruntime refuses any other length."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    table = numpy_helper.from_array(np.ones((1, 16), dtype=np.float32), "pos")
    graph = helper.make_graph(
        [helper.make_node("Add", ["x", "pos"], ["y"])], "positions",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "seq"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 16])], [table])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    return str(path)


def test_bench_turns_inputs_it_cannot_size_into_one_line_errors(tmp_path):
    def export(model, x, name, **kwargs):
        return str(export_onnx(model, (x,), tmp_path / name, exporter="torchscript",
                               **kwargs).path)

    pos = _positions_onnx(tmp_path / "pos.onnx")
    refused = runner.invoke(app, ["bench", pos, pos, "--batch", "1", "--rounds", "1"])
    assert refused.exit_code == 2, refused.output
    assert refused.stderr.strip().splitlines()[-1].startswith(
        "error: ShapeError: onnxruntime cannot run 'pos' on synthesised inputs at batch 1, "
        "sequence length 128")
    assert "Traceback" not in refused.output
    ok = runner.invoke(app, ["bench", pos, pos, "--batch", "1", "--seq", "16", "--rounds", "1",
                             "--block", "1", "--warmup", "0", "--threads", "1", "--json"])
    assert ok.exit_code == 0, ok.output

    six = export(torch.nn.Linear(6, 2), torch.randn(2, 6), "six.onnx")
    seven = export(torch.nn.Linear(7, 2), torch.randn(2, 7), "seven.onnx")
    mismatch = runner.invoke(app, ["bench", six, seven, "--rounds", "1"])
    assert mismatch.exit_code == 2 and "seven.onnx takes inputs" in mismatch.stderr

    fixed = export(torch.nn.Linear(6, 2), torch.randn(4, 6), "fixed.onnx", dynamic_axes=[{}])
    resized = runner.invoke(app, ["bench", fixed, fixed, "--batch", "1,64", "--rounds", "1"])
    assert resized.exit_code == 2
    assert "fixed.onnx has no batch axis to resize" in resized.stderr
    assert resized.stderr.strip().endswith("--batch 4")


def test_export_takes_the_batch_of_time_major_inputs_at_dim_1(tmp_path):
    path = tmp_path / "tm.py"
    path.write_text(textwrap.dedent("""
        import torch
        from torch import nn

        class TimeMajor(nn.Module):
            def __init__(self):
                super().__init__()
                self.lstm = nn.LSTM(4, 6)
                self.out = nn.Linear(6, 3)

            def forward(self, x):
                return self.out(self.lstm(x)[0][-1])

        def build():
            torch.manual_seed(0)
            return TimeMajor()
        """))
    folder = tmp_path / "run"
    folder.mkdir()
    (folder / "report.json").write_text(json.dumps({"config": {"batch_dim": 1}}))
    from mesimp_compress.cli.export_cmd import _batch_dim

    assert (_batch_dim(None, folder), _batch_dim(0, folder), _batch_dim(None, None)) == (1, 0, 0)
    out = tmp_path / "tm.onnx"
    # in a process of its own: torch's exporter keeps state across exports of an LSTM in one
    # process (a later export of another LSTM then fixes its length), as a user's run does
    result = subprocess.run([sys.executable, "-m", "mesimp_compress.cli", "export",
                             f"{path}:build", "--input-shape", "5,2,4", "--batch-dim", "1",
                             "--out", str(out), "--json"], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    payload = json.loads(result.stdout)
    assert payload["export"]["dynamic_axes"]["x"] == {"1": "batch"}
    assert payload["parity"]["passed"] is True
    session = make_session(out)
    assert [d for d in session.get_inputs()[0].shape] == [5, "batch", 4]
    bad = runner.invoke(app, ["export", f"{path}:build", "--input-shape", "5,2,4",
                              "--batch-dim", "2", "--out", str(tmp_path / "x.onnx")])
    assert bad.exit_code == 2 and "--batch-dim must be 0 or 1, got 2" in bad.output
