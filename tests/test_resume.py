"""Interruption and resume through the real CLI: kill -9 mid-run, --resume, same result."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from mesimp_compress.checkpoint import Checkpointer, default_dir

HERE = Path(__file__).resolve().parent
SPEC = HERE / "_resume_spec.py"
FLAGS = ["--k", "8", "--epochs", "1", "--cycles", "2", "--recovery-epochs", "1",
         "--window", "0.25", "--batches", "1", "--threads", "1", "--quiet"]


def _command(out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "mesimp_compress.cli", "compress", f"{SPEC}:model",
            "--data", f"{SPEC}:data", "--out", str(out), *FLAGS, *extra]


def _run(out: Path, *extra: str, delay: float = 0.0) -> subprocess.CompletedProcess:
    env = {**os.environ, "MESIMP_TEST_DELAY": str(delay)}
    return subprocess.run(_command(out, *extra), capture_output=True, text=True, env=env,
                          timeout=300)


def _result(out: Path) -> tuple[dict, dict]:
    report = json.loads((out / "report.json").read_text())
    return json.loads((out / "plan.json").read_text()), report


@pytest.mark.slow
def test_kill_9_then_resume_reaches_the_uninterrupted_plan_and_metrics(tmp_path):
    whole = tmp_path / "whole"
    done = _run(whole)
    assert done.returncode == 0, done.stderr
    plan, report = _result(whole)
    assert not default_dir(whole).exists()  # removed after success

    out = tmp_path / "cut"
    proc = _start_and_wait_for_window(out, 4)
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    window = Checkpointer(default_dir(out)).load()["window"]
    assert window >= 4 and not out.exists()

    resumed = _run(out, "--resume")
    assert resumed.returncode == 0, resumed.stderr
    plan2, report2 = _result(out)
    assert plan2 == plan
    for key in ("torch_before", "torch_after", "ort_before", "ort_after"):
        assert report2["metrics"][key] == report["metrics"][key]
    history = [(h["window"], h["loss"], h["widths"]) for h in report["extra"]["history"]]
    assert [(h["window"], h["loss"], h["widths"]) for h in report2["extra"]["history"]] == history
    assert not default_dir(out).exists()


def test_resume_without_a_checkpoint_is_a_one_line_error(tmp_path):
    result = _run(tmp_path / "none", "--resume")
    assert result.returncode == 2
    assert "no checkpoint to resume from" in result.stderr
    assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_resume_with_other_settings_is_refused(tmp_path):
    out = tmp_path / "run"
    Checkpointer(default_dir(out)).save({"config": {"k": 99}})
    result = _run(out, "--resume")
    assert result.returncode == 2 and "other settings" in result.stderr
    assert not out.exists()


def test_nan_in_a_batch_names_it_and_keeps_the_last_good_checkpoint(tmp_path):
    out = tmp_path / "nan"
    cmd = _command(out)
    cmd[cmd.index("--data") + 1] = f"{SPEC}:nan_data"
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2
    assert "train batch 21 (epoch 1): input 0 holds NaN values" in result.stderr
    assert not out.exists()
    state = Checkpointer(default_dir(out)).load()
    assert state["window"] >= 1  # windows before the NaN were saved
    assert all(torch.isfinite(v).all() for v in state["model"].values())


def _start_and_wait_for_window(out: Path, window: int) -> subprocess.Popen:
    env = {**os.environ, "MESIMP_TEST_DELAY": "0.02"}
    proc = subprocess.Popen(_command(out), env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    checkpoints = Checkpointer(default_dir(out))
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            if checkpoints.exists() and checkpoints.load()["window"] >= window:
                return proc
        except Exception:  # noqa: BLE001, S110 - being replaced right now: read it again
            pass
        time.sleep(0.05)
    raise AssertionError("the run ended before it could be interrupted")


@pytest.mark.slow
def test_ctrl_c_stops_cleanly_keeps_the_checkpoint_and_says_how_to_resume(tmp_path):
    out = tmp_path / "ctrl-c"
    proc = _start_and_wait_for_window(out, 2)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130
    assert "--resume" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert not out.exists() and Checkpointer(default_dir(out)).load()["window"] >= 2
