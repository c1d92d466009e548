"""`mesimp compress` and `mesimp inspect` through the CLI on a tiny spec file."""

from __future__ import annotations

import json

import _tiny
import pytest
import torch
from mesimp_compress.cli.main import app
from typer.testing import CliRunner

from mesimp_compress.surgery import load_compressed

torch.set_num_threads(1)
runner = CliRunner()

RECIPE = """\
[compress]
k = 4
epochs = 1
cycles = 1
recovery-epochs = 0
window = 0.25
lr = 0.01
seed = 7
batches = [1, 4]
"""


@pytest.fixture(scope="module")
def compressed(tmp_path_factory):
    """One CLI run: a recipe, flags overriding two of its keys, --json."""
    root = tmp_path_factory.mktemp("cli")
    recipe = root / "recipe.toml"
    recipe.write_text(RECIPE)
    out = root / "out"
    result = runner.invoke(app, [
        "compress", _tiny.spec("mlp"), "--data", _tiny.spec("mlp_data"), "--out", str(out),
        "--config", str(recipe), "--k", "8", "--seed", "3", "--threads", "1", "--json",
    ])
    return result, out


@pytest.mark.slow
def test_compress_writes_the_folder_and_prints_json(compressed) -> None:
    result, out = compressed
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report == json.loads((out / "report.json").read_text())
    assert report["status"] == "ok"
    assert {p.name for p in out.iterdir()} >= {"model.onnx", "original.onnx", "plan.json",
                                               "weights.pt", "report.json", "plots"}
    assert report["extra"]["factory"] == _tiny.spec("mlp")
    widths = report["widths"]
    assert widths["0"]["before"] == 32 and 1 <= widths["0"]["after"] < 32
    fresh = load_compressed(_tiny.mlp(), out)
    assert fresh[0].out_features == widths["0"]["after"]
    assert fresh[2].out_features == widths["2"]["after"]


@pytest.mark.slow
def test_flags_override_the_recipe(compressed) -> None:
    result, _ = compressed
    config = json.loads(result.stdout)["config"]
    assert (config["k"], config["seed"], config["threads"]) == (8, 3, 1)  # flags
    assert (config["epochs"], config["recovery_epochs"], config["window"]) == (1, 0, 0.25)
    assert (config["lr"], config["batches"]) == (0.01, [1, 4])  # recipe
    history = json.loads(result.stdout)["extra"]["history"]
    assert len(history) == 8  # 8 batches, windows of 2, one pruning + one normal epoch


@pytest.mark.slow
def test_inspect_prints_the_saved_report(compressed) -> None:
    _, out = compressed
    shown = runner.invoke(app, ["inspect", str(out)])
    assert shown.exit_code == 0, shown.output
    report = json.loads((out / "report.json").read_text())
    assert "status" in shown.stdout and "ok" in shown.stdout
    assert "widths" in shown.stdout and "left alone" in shown.stdout
    assert f"{report['widths']['0']['after']}" in shown.stdout
    as_json = runner.invoke(app, ["inspect", str(out / "report.json"), "--json"])
    assert as_json.exit_code == 0 and json.loads(as_json.stdout) == report


def test_inspect_shows_a_failed_report_with_its_rollbacks(tmp_path) -> None:
    report = {
        "format": "mesimp-report", "version": 1, "status": "failed",
        "error": "compressed: onnxruntime output 'output' [bold]differs[/bold]", "layers": [],
        "metrics": {"torch_before": 0.9, "torch_after": 0.8}, "skipped": [],
        "extra": {"rollbacks": [{"window": 3, "keys": ["fc1"], "metric": 0.5,
                                 "threshold": 0.85}]},
    }
    (tmp_path / "report.json").write_text(json.dumps(report))
    shown = runner.invoke(app, ["inspect", str(tmp_path)])
    assert shown.exit_code == 0, shown.output
    for word in ("failed", "[bold]differs[/bold]", "rollbacks", "fc1", "0.8500", "0.9000"):
        assert word in shown.stdout  # a report's strings are shown as written, not as markup


@pytest.mark.parametrize("content, word", [
    (None, "no report.json"),
    ("{not json", "cannot read"),
    ('{"format": "something-else"}', "not a mesimp report"),
    ('{"format": "mesimp-report", "version": 1, "layers": [{"name": "x"}]}', "malformed"),
    ('{"format": "mesimp-report", "version": 99}', "version 99"),
    ('{"format": "mesimp-report", "version": 1, "extra": ' + "[" * 100_000 + "]" * 100_000 + "}",
     "RecursionError"),
])
def test_inspect_refuses_a_missing_or_garbled_report(tmp_path, content, word) -> None:
    if content is not None:
        (tmp_path / "report.json").write_text(content)
    shown = runner.invoke(app, ["inspect", str(tmp_path)])
    assert shown.exit_code == 2
    assert word in shown.stderr and len(shown.stderr.strip().splitlines()) == 1
    assert "Traceback" not in shown.output


def test_inspect_shows_the_int8_model_when_the_report_has_one(tmp_path) -> None:
    row = {"batch": 1, "threads": 1, "speedup": 2.0, "int8_speedup": 3.5}
    for name, ms in (("original", 0.4), ("compressed", 0.2), ("int8", 0.1142)):
        row |= {f"{name}_median_ms": ms, f"{name}_p90_ms": ms}
    report = {
        "format": "mesimp-report", "version": 1, "status": "ok", "layers": [],
        "metrics": {"torch_before": 0.9, "torch_after": 0.89, "ort_before": 0.9,
                    "ort_after": 0.89, "int8": 0.8765},
        "parity": {"output": {"original_max_abs": 1e-7, "compressed_max_abs": 2e-7,
                              "int8_max_abs": 0.0123}},
        "latency": {"rows": [row]}, "skipped": [],
    }
    (tmp_path / "report.json").write_text(json.dumps(report))
    shown = runner.invoke(app, ["inspect", str(tmp_path)], terminal_width=200)
    assert shown.exit_code == 0, shown.output
    for word in ("int8", "0.8765", "0.0123", "0.114", "3.50x"):
        assert word in shown.stdout


def test_ctrl_c_says_whether_there_is_a_checkpoint_to_resume(tmp_path, monkeypatch) -> None:
    import mesimp_compress.api as api
    from mesimp_compress.checkpoint import Checkpointer, default_dir

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(api, "compress", interrupted)
    out = tmp_path / "out"
    args = ["compress", _tiny.spec("mlp"), "--data", _tiny.spec("mlp_data"), "--out", str(out)]
    early = runner.invoke(app, args)
    assert early.exit_code == 130
    assert "before the first window finished: there is no checkpoint" in early.output
    Checkpointer(default_dir(out)).save({"window": 1})
    later = runner.invoke(app, args)
    assert later.exit_code == 130 and "rerun the same command with --resume" in later.output


def test_names_and_paths_that_look_like_markup_are_printed_as_written(tmp_path,
                                                                     monkeypatch) -> None:
    """Layer '[/]' stopped the run with a MarkupError after fine-tuning, '[cls]' vanished,
    and --out 'exp[lr=0.1]' was reported as 'wrote exp'."""
    monkeypatch.chdir(tmp_path)
    out = "exp[lr=0.1]"
    result = runner.invoke(app, [
        "compress", _tiny.spec("bracketed"), "--data", _tiny.spec("mlp_data"), "--out", out,
        "--k", "8", "--epochs", "1", "--recovery-epochs", "0", "--window", "0.5",
        "--threads", "1", "--batches", "1",
    ], terminal_width=200)
    assert result.exit_code == 0, result.output
    assert f"wrote {out}" in result.stdout
    shown = runner.invoke(app, ["inspect", str(out)], terminal_width=200)
    assert shown.exit_code == 0, shown.output
    for text in (result.stdout, shown.stdout):
        assert "layers.[/]" in text and "layers.[cls]" in text and out in text


def test_a_bad_flag_beside_a_recipe_is_blamed_on_the_flags(tmp_path) -> None:
    """'--batches 1,x' with --config was reported as an error of the recipe file."""
    recipe = tmp_path / "recipe.toml"
    recipe.write_text(RECIPE)
    args = ["compress", _tiny.spec("mlp"), "--data", _tiny.spec("mlp_data"),
            "--out", str(tmp_path / "out"), "--config", str(recipe)]
    flag = runner.invoke(app, [*args, "--batches", "1,x"])
    assert flag.exit_code == 2 and "flags: batches must be" in flag.stderr, flag.stderr
    recipe.write_text(RECIPE.replace("batches = [1, 4]", 'batches = [1, "x"]'))
    bad = runner.invoke(app, args)
    assert bad.exit_code == 2 and "recipe.toml: batches must be" in bad.stderr, bad.stderr


def test_a_ctrl_c_that_code_below_swallows_still_ends_the_run(tmp_path) -> None:
    # as an interrupt landing in a lazy import does: turned into another error, caught
    swallower = tmp_path / "swallow.py"
    swallower.write_text(
        "import os, signal\n"
        "import torch\n\n"
        "def metric(outputs, targets):\n"
        "    try:\n"
        "        os.kill(os.getpid(), signal.SIGINT)\n"
        "        sum(range(10 ** 5))  # the handler runs here\n"
        "    except BaseException:\n"
        "        pass\n"
        "    return (outputs.argmax(1) == targets).float().mean()\n")
    out = tmp_path / "out"
    result = runner.invoke(app, [
        "compress", _tiny.spec("mlp"), "--data", _tiny.spec("mlp_data"), "--out", str(out),
        "--metric", f"{swallower}:metric", "--epochs", "1", "--recovery-epochs", "0",
        "--threads", "1"])
    assert result.exit_code == 130, result.output
    assert "interrupted" in result.output and not out.exists()
