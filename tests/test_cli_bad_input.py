"""Bad input through `mesimp compress`: exit code 2, one line naming the problem, no traceback,
and nothing written where the output folder would be."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from pathlib import Path

import _tiny
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from mesimp_compress.cli.main import app
from typer.testing import CliRunner

from mesimp_compress.config import CompressConfig

torch.set_num_threads(1)
runner = CliRunner()

FIXTURES = Path(__file__).resolve().parent / "fixtures"
FAST = ["--epochs", "1", "--recovery-epochs", "0", "--window", "0.5", "--threads", "1",
        "--batches", "1,4"]


def write_inputs(folder: Path) -> None:
    """The bad files the cases point at."""
    folder.mkdir(parents=True, exist_ok=True)
    torch.save(_tiny.cnn().state_dict(), folder / "other.pt")
    state = _tiny.mlp().state_dict()
    state["0.weight"] = torch.zeros(31, _tiny.IN_FEATURES)
    torch.save(state, folder / "shapes.pt")
    (folder / "garbage.pt").write_bytes(os.urandom(256))
    torch.save(_tiny.mlp(), folder / "pickled.pt")
    (folder / "malformed.toml").write_text("k = = 3\n[unclosed\n")
    (folder / "unknown.toml").write_text("k = 8\nspeed = 'fast'\n")
    (folder / "wrong_type.toml").write_text('cycles = "two"\n')
    (folder / "wrong_list.toml").write_text("exclude = 7\n")
    (folder / "markup.toml").write_text('"[/x]" = 1\n')  # Rich markup in a message
    (folder / "zero_width.toml").write_text("[compress]\nmin_width = 0\nprune_rate = 1.0\n")


def invoke(argv: list[str]):
    return runner.invoke(app, argv)


def assert_one_line_error(result, keyword: str, code: int = 2) -> None:
    assert result.exit_code == code, (result.exit_code, result.output)
    assert "Traceback" not in result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert keyword.lower() in lines[0].lower(), (keyword, lines[0])


def assert_nothing_written(run_dir: Path) -> None:
    """The output folder (or a staging folder, or a checkpoint) never appeared."""
    assert not run_dir.exists() or list(run_dir.iterdir()) == []


T = _tiny.spec
# (id, model, data, extra args, keyword expected in the message)
CASES = [
    ("model-file-missing", "{in}/nope.py:build", T("mlp_data"), [], "not found"),
    ("model-fn-missing", T("missing_fn"), T("mlp_data"), [], "no attribute 'missing_fn'"),
    ("model-spec-no-colon", str(_tiny.HERE), T("mlp_data"), [], "no ':'"),
    ("model-import-raises", f"{FIXTURES}/raises_on_import.py:build", T("mlp_data"), [],
     "raised ModuleNotFoundError"),
    ("model-factory-raises", T("raises"), T("mlp_data"), [], "factory exploded"),
    ("model-not-a-module", T("not_a_module"), T("mlp_data"), [], "expected a torch.nn.Module"),
    ("model-factory-exits", T("exits"), T("mlp_data"), [],
     "exits() raised SystemExit (sys.exit(3) was called)"),
    ("data-fn-exits", T("mlp"), T("exiting_data"), [],
     "exiting_data() raised SystemExit (sys.exit('no data today') was called)"),
    ("loss-exits-later", T("mlp"), T("mlp_data"), ["--loss", T("exiting_loss")],
     "the loss failed on train batch 4 (epoch 1): SystemExit (sys.exit(0) was called)"),
    ("model-package-missing", "no_such_pkg_xyz.models:build", T("mlp_data"), [], "not found"),
    ("weights-missing", T("mlp"), T("mlp_data"), ["--weights", "{in}/missing.pt"],
     "does not exist"),
    ("weights-other-model", T("mlp"), T("mlp_data"), ["--weights", "{in}/other.pt"],
     "does not fit the model"),
    ("weights-wrong-shape", T("mlp"), T("mlp_data"), ["--weights", "{in}/shapes.pt"],
     "shape mismatches"),
    ("weights-garbage", T("mlp"), T("mlp_data"), ["--weights", "{in}/garbage.pt"],
     "cannot read weights"),
    ("weights-pickled-module", T("mlp"), T("mlp_data"), ["--weights", "{in}/pickled.pt"],
     "trust-pickle"),
    ("weights-is-a-folder", T("mlp"), T("mlp_data"), ["--weights", "{in}"], "not a file"),
    ("data-fn-missing", T("mlp"), T("nope_data"), [], "no attribute 'nope_data'"),
    ("data-fn-raises", T("mlp"), T("raising_data"), [], "offline"),
    ("data-unknown-builtin", T("mlp"), "no-such-data", [], "unknown built-in data set"),
    ("data-wrong-shape", T("mlp"), T("wrong_shape_data"), [], "failed on the first train batch"),
    ("data-float-targets", T("mlp"), T("float_targets_data"), [], "integers"),
    ("data-int-inputs", T("mlp"), T("int_inputs_data"), [], "failed on the first train batch"),
    ("data-empty", T("mlp"), T("empty_data"), [], "no batches"),
    ("data-not-pairs", T("mlp"), T("not_pairs_data"), [], "(inputs, targets) pairs"),
    ("data-one-part", T("mlp"), T("one_part_data"), [], "must return (train, eval), got a"),
    ("data-one-shot", T("mlp"), T("generator_data"), [], "re-iterable"),
    ("toml-malformed", T("mlp"), T("mlp_data"), ["--config", "{in}/malformed.toml"],
     "malformed TOML"),
    ("toml-unknown-key", T("mlp"), T("mlp_data"), ["--config", "{in}/unknown.toml"],
     "unknown key 'speed'"),
    ("toml-wrong-type", T("mlp"), T("mlp_data"), ["--config", "{in}/wrong_type.toml"],
     "cycles must be an integer"),
    ("toml-wrong-list", T("mlp"), T("mlp_data"), ["--config", "{in}/wrong_list.toml"],
     "exclude must be a list"),
    ("toml-key-looks-like-markup", T("mlp"), T("mlp_data"), ["--config", "{in}/markup.toml"],
     "unknown key '[/x]'"),
    ("toml-missing", T("mlp"), T("mlp_data"), ["--config", "{in}/nope.toml"],
     "config file not found"),
    ("k-zero", T("mlp"), T("mlp_data"), ["--k", "0"], "k must be >= 1"),
    ("k-negative", T("mlp"), T("mlp_data"), ["--k=-1"], "k must be >= 1"),
    ("k-fraction-above-one", T("mlp"), T("mlp_data"), ["--k", "1.5"], "(0, 1]"),
    ("k-at-least-every-width", T("mlp"), T("mlp_data"), ["--k", "100"], "nothing would be pruned"),
    ("k-text", T("mlp"), T("mlp_data"), ["--k", "abc"], "'abc'"),
    ("min-width-zero", T("mlp"), T("mlp_data"), ["--min-width", "0"], "min_width"),
    ("min-width-above-every-width", T("mlp"), T("mlp_data"), ["--min-width", "100"],
     "min_width=100 and round_to=1 keep every unit of every prunable layer"),
    ("round-to-above-every-width", T("mlp"), T("mlp_data"), ["--round-to", "1000"],
     "round_to=1000 keep every unit"),
    ("prune-rate-above-one", T("mlp"), T("mlp_data"), ["--prune-rate", "1.5"], "prune_rate"),
    ("prune-rate-negative", T("mlp"), T("mlp_data"), ["--prune-rate=-0.1"], "prune_rate"),
    ("recipe-empties-a-layer", T("mlp"), T("mlp_data"), ["--config", "{in}/zero_width.toml"],
     "min_width"),
    ("prune-rate-not-a-number", T("mlp"), T("mlp_data"), ["--prune-rate", "lots"],
     "--prune-rate"),
    ("window-zero", T("mlp"), T("mlp_data"), ["--window", "0"], "window"),
    ("compensate-unknown", T("mlp"), T("mlp_data"), ["--compensate", "sometimes"],
     "compensate must be one of"),
    ("distill-layers-match-nothing", T("mlp"), T("mlp_data"), ["--distill-layers", "fc9"],
     "no module matches 'fc9'"),
    ("distill-layers-pruned-layer", T("mlp"), T("mlp_data"), ["--distill-layers", "0"],
     "'0' is pruned itself"),
    ("distill-layers-after-a-pruned-layer", T("mlp"), T("mlp_data"),
     ["--distill-layers", "1"], "'1' loses units with the layers before it (its output "
     "(32, 32) becomes (32, 31) when they shrink)"),
    ("mode-unknown", T("mlp"), T("mlp_data"), ["--mode", "sideways"], "mode must be one of"),
    ("device-invalid", T("mlp"), T("mlp_data"), ["--device", "warp:9"], "device"),
    ("device-meta", T("mlp"), T("mlp_data"), ["--device", "meta"], "holds no data"),
    ("nproc-with-sparse-update", T("mlp"), T("mlp_data"), ["--nproc", "2", "--sparse-update"],
     "sparse_update cannot be combined with distributed training"),
    ("batches-zero", T("mlp"), T("mlp_data"), ["--batches", "0,4"], "batches"),
    ("threads-absurd", T("mlp"), T("mlp_data"), ["--threads", "1000000000"], "threads"),
    ("seed-too-large", T("mlp"), T("mlp_data"), ["--seed", "99999999999"], "seed"),
    ("loss-fn-missing", T("mlp"), T("mlp_data"), ["--loss", T("nope_loss")], "nope_loss"),
    ("unknown-option", T("mlp"), T("mlp_data"), ["--speed", "9"], "No such option"),
    ("nothing-prunable", T("only_head"), T("mlp_data"), [], "no layer of this model can be pruned"),
    ("include-matches-nothing", T("mlp"), T("mlp_data"), ["--include", "encoder.*"],
     "--include"),
    ("epochs-zero", T("mlp"), T("mlp_data"), ["--epochs", "0"], "nothing would be pruned"),
    ("model-on-meta", T("meta_mlp"), T("mlp_data"), [], "'0.weight' is on the meta device"),
    ("model-inf-weight", T("nan_mlp"), T("mlp_data"), [], "'2.weight' holds NaN or infinite"),
    ("data-fails-while-read", T("mlp"), T("failing_data"), [],
     "train data (epoch 1) failed while reading batch 4: ValueError: record 3 is corrupt"),
    ("data-nan-inputs", T("mlp"), T("nan_inputs_data"), [], "input 0 holds NaN values"),
    ("data-empty-first-batch", T("mlp"), T("empty_first_batch_data"), [],
     "the first train batch has no examples"),
    ("out-is-dot", T("mlp"), T("mlp_data"), ["--out", "."], "not '.'"),
    ("out-name-too-long", T("mlp"), T("mlp_data"), ["--out", "{in}/" + "o" * 240],
     "the output folder name is too long"),
]


@pytest.mark.parametrize("model, data, extra, keyword", [c[1:] for c in CASES],
                         ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_exit_2_and_writes_nothing(tmp_path, model, data, extra, keyword):
    folder = tmp_path / "in"
    write_inputs(folder)
    run_dir = tmp_path / "run"
    fill = {"in": str(folder)}
    argv = ["compress", model.format(**fill), "--data", data, "--out", str(run_dir / "out"),
            *FAST, *(a.format(**fill) for a in extra)]
    assert_one_line_error(invoke(argv), keyword)
    assert_nothing_written(run_dir)


def test_an_existing_output_folder_is_refused_and_left_alone(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    result = invoke(["compress", T("mlp"), "--data", T("mlp_data"), "--out", str(out), *FAST])
    assert_one_line_error(result, "not empty")
    assert [p.name for p in tmp_path.iterdir()] == ["out"]
    assert [p.name for p in out.iterdir()] == ["notes.txt"]
    assert (out / "notes.txt").read_text() == "mine"


def test_an_output_path_that_is_a_file_is_refused(tmp_path):
    out = tmp_path / "out"
    out.write_text("a file")
    result = invoke(["compress", T("mlp"), "--data", T("mlp_data"), "--out", str(out), *FAST])
    assert_one_line_error(result, "not a directory")
    assert out.read_text() == "a file" and [p.name for p in tmp_path.iterdir()] == ["out"]


def test_an_output_path_under_a_file_is_refused_before_training(tmp_path):
    (tmp_path / "afile").write_text("a file")
    out = tmp_path / "afile" / "sub" / "out"
    result = invoke(["compress", T("mlp"), "--data", T("mlp_data"), "--out", str(out), *FAST])
    assert_one_line_error(result, "OutputError: cannot create the folder")
    assert "epoch" not in result.output.lower()  # refused before any training
    assert [p.name for p in tmp_path.iterdir()] == ["afile"]


@pytest.mark.slow
def test_an_export_failure_leaves_no_output_folder(tmp_path):
    run_dir = tmp_path / "run"
    result = invoke(["compress", T("no_export"), "--data", T("mlp_data"),
                     "--out", str(run_dir / "out"), *FAST])
    assert_one_line_error(result, "ONNX export failed")
    assert list(tmp_path.iterdir()) == []  # no staging left, nor the folder made for it


@pytest.mark.slow
def test_a_parity_failure_of_the_compressed_model_publishes_a_failed_report_and_exits_2(
        tmp_path):
    out = tmp_path / "out"
    result = invoke(["compress", T("shifted_once_pruned"), "--data", T("mlp_data"), "--out",
                     str(out), *FAST])
    assert_one_line_error(result, "differs from PyTorch")
    assert "report.json" in result.stderr
    report = json.loads((out / "report.json").read_text())
    assert report["status"] == "failed" and "differs" in report["error"]
    assert report["parity_checks"]["original"]["passed"] is True
    assert report["parity_checks"]["compressed"]["passed"] is False
    assert not [p for p in tmp_path.iterdir() if ".partial-" in p.name]  # no staging left


@pytest.mark.slow
def test_an_original_that_fails_parity_is_refused_before_fine_tuning(tmp_path):
    out = tmp_path / "out"
    result = invoke(["compress", T("shifted"), "--data", T("mlp_data"), "--out", str(out), *FAST])
    assert_one_line_error(result, "ParityError: before fine-tuning, original: onnxruntime output "
                                  "'output' differs from PyTorch by up to 1 ")
    assert "nothing was trained" in result.stderr
    assert list(tmp_path.iterdir()) == []  # no folder, no staging, no checkpoint


@pytest.mark.slow  # a fresh interpreter importing torch: seconds each
@pytest.mark.parametrize("argv, keyword", [
    (["compress", "/no/such/file.py:build", "--data", "digits", "--out", "{out}"], "not found"),
    (["compress", T("mlp"), "--data", T("mlp_data"), "--out", "{out}", "--window", "x"],
     "--window"),
], ids=["missing-file", "bad-float"])
def test_the_installed_command_prints_one_line(tmp_path, argv, keyword):
    argv = [a.format(out=tmp_path / "out") for a in argv]
    done = subprocess.run([sys.executable, "-m", "mesimp_compress.cli", *argv],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and keyword in lines[0] and "Traceback" not in done.stderr
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------- property
NUMBERS = st.one_of(st.integers(-10**12, 10**12), st.floats(allow_nan=True),
                    st.text(max_size=8))
TOML_VALUES = st.one_of(
    st.integers(-10**20, 10**20).map(str),
    st.floats(allow_nan=False, allow_infinity=False).map(repr),
    st.booleans().map(lambda b: str(b).lower()),
    st.text(max_size=8).map(json.dumps),
    st.lists(st.integers(-3, 3), max_size=3).map(str),
)
TOML_KEYS = st.one_of(st.sampled_from(CompressConfig.keys()), st.text(min_size=1, max_size=6))
RECIPES = st.one_of(
    st.text(max_size=40),
    st.dictionaries(TOML_KEYS, TOML_VALUES, max_size=4).map(
        lambda d: "".join(f"{json.dumps(k)} = {v}\n" for k, v in d.items())),
)


@settings(max_examples=25, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(k=NUMBERS, prune_rate=NUMBERS, window=NUMBERS, recipe=RECIPES)
def test_garbage_settings_never_show_a_traceback(tmp_path_factory, k, prune_rate, window, recipe):
    root = tmp_path_factory.mktemp("garbage", numbered=True)
    (root / "recipe.toml").write_text(recipe, encoding="utf-8")
    run_dir = root / uuid.uuid4().hex
    # the data is empty: a run whose settings all happen to be valid still stops at once
    argv = ["compress", T("mlp"), "--data", T("empty_data"), "--out", str(run_dir / "out"),
            "--config", str(root / "recipe.toml"), f"--k={k}", f"--prune-rate={prune_rate}",
            f"--window={window}"]
    result = invoke(argv)
    torch.set_num_threads(1)  # a recipe may have set threads before the data was refused
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert_nothing_written(run_dir)
