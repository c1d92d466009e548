"""Two CPU workers (gloo) under torchrun: one plan and the same weights on every rank."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mesimp_compress.distributed import Shard, launch_command

WORKER = Path(__file__).resolve().parent / "_ddp_worker.py"


def _run(kind: str, out: Path, batch: int, nproc: int, step: str = "whole") -> None:
    env = {**os.environ, "MESIMP_DIST_TIMEOUT": "120", "OMP_NUM_THREADS": "1"}
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc-per-node",
        str(nproc),
        "--standalone",
        str(WORKER),
        kind,
        str(out),
        str(batch),
        step,
    ]
    if nproc == 1:
        command = [sys.executable, str(WORKER), kind, str(out), str(batch), step]
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["mlp", "lstm"])
def test_two_ranks_agree_and_match_one_process(tmp_path, kind):
    _run(kind, tmp_path / "ddp", batch=16, nproc=2)
    ranks = [torch.load(tmp_path / "ddp" / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    assert ranks[0]["kept"] == ranks[1]["kept"]
    for name, tensor in ranks[0]["state"].items():
        assert torch.equal(tensor, ranks[1]["state"][name]), name
    assert ranks[0]["metric"] == ranks[1]["metric"]

    _run(kind, tmp_path / "one", batch=32, nproc=1)  # the same global batch in one process
    single = torch.load(tmp_path / "one" / "rank0.pt", weights_only=True)
    for key, width in single["widths"].items():
        # top-k runs on the all-reduced scores of the global batch, so the plan is the
        # single-process one up to float rounding of the sums (a near-tie may flip one unit)
        assert abs(ranks[0]["widths"][key] - width) <= 1, (key, width, ranks[0]["widths"])


@pytest.mark.slow
def test_two_ranks_resume_to_the_uninterrupted_result(tmp_path):
    """The checkpoint holds pruned widths: the resumed ranks rebuild the model under a fresh
    DDP wrapper (the full-size model's wrapper once made backward fail on shapes)."""
    _run("mlp", tmp_path / "whole", batch=16, nproc=2)
    _run("mlp", tmp_path / "cut", batch=16, nproc=2, step="stop")
    assert (tmp_path / "cut" / "ckpt").is_dir()
    _run("mlp", tmp_path / "cut", batch=16, nproc=2, step="resume")
    whole, cut = (torch.load(tmp_path / d / "rank0.pt", weights_only=True)
                  for d in ("whole", "cut"))
    assert whole["kept"] == cut["kept"] and whole["metric"] == cut["metric"]
    for name, tensor in whole["state"].items():
        assert torch.equal(tensor, cut["state"][name]), name


def test_shard_splits_batches_evenly_and_drops_the_remainder():
    data = list(range(11))
    shards = [list(Shard(data, r, 3)) for r in range(3)]
    assert shards == [[0, 3, 6], [1, 4, 7], [2, 5, 8]]
    assert all(len(Shard(data, r, 3)) == 3 for r in range(3))
    assert len(Shard(iter(range(7)), 0, 2)) == 3  # no len(): counted


def test_launch_command_reruns_the_cli_under_torchrun():
    cmd = launch_command(4, ["compress", "m.py:f", "--data", "d.py:g", "--out", "o"])
    assert cmd[1:4] == ["-m", "torch.distributed.run", "--nproc-per-node"]
    assert cmd[4] == "4" and cmd[-7:] == [
        "mesimp_compress.cli",
        "compress",
        "m.py:f",
        "--data",
        "d.py:g",
        "--out",
        "o",
    ]


def _reduce_worker(rank: int, store: str, out: str) -> None:
    import torch.distributed as dist

    from mesimp_compress.distributed import all_reduce_means
    from mesimp_compress.meprop.functions import sync_selection, unified_units

    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    sums = {"a": torch.full((3,), float(rank + 1)), "b": torch.tensor([rank * 10.0])}
    counts = {"a": 2 + rank, "b": 1}
    all_reduce_means(sums, counts)
    score = torch.tensor([5.0, 0.0, 1.0, 0.0]) if rank == 0 else torch.tensor([0.0, 4.0, 1.0, 3.0])
    alone = sorted(unified_units(score.clone(), 2).tolist())
    sync_selection(True)
    together = sorted(unified_units(score.clone(), 2).tolist())
    sync_selection(False)
    torch.save({"sums": sums, "counts": counts, "alone": alone, "together": together},
               f"{out}/rank{rank}.pt")
    dist.destroy_process_group()


def test_means_and_topk_scores_are_summed_over_ranks(tmp_path):
    import torch.multiprocessing as mp

    mp.spawn(_reduce_worker, args=(str(tmp_path / "store"), str(tmp_path)), nprocs=2)
    got = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    for g in got:
        assert torch.equal(g["sums"]["a"], torch.full((3,), 3.0))
        assert torch.equal(g["sums"]["b"], torch.tensor([10.0]))
        assert g["counts"] == {"a": 5, "b": 2}
        assert g["together"] == [0, 1]  # summed scores: 5, 4, 2, 3
    assert got[0]["alone"] == [0, 2] and got[1]["alone"] == [1, 3]


def test_a_failed_launch_shows_the_workers_error_line_once():
    """Each rank printed the error, torchrun its banner and a ChildFailedError traceback:
    46 lines for one user error."""
    from mesimp_compress.cli.compress_cmd import _workers_stderr

    error = "error: DataError: the loss failed on train batch 3 (epoch 1): ValueError: bad"
    text = "\n".join([
        "*****************************************",
        "Setting OMP_NUM_THREADS environment variable for each process to be 1 in default",
        "*****************************************",
        error, error,
        "Traceback (most recent call last):",
        "torch.distributed.elastic.multiprocessing.errors.ChildFailedError:",
    ])
    assert _workers_stderr(1, text) == error + "\n"
    crash = "\n".join(["Traceback (most recent call last):", "RuntimeError: a bug"])
    assert _workers_stderr(1, crash) == crash + "\n"  # no line of ours: what they printed
    assert _workers_stderr(0, text.replace(error, "a warning")) == (
        "a warning\na warning\nTraceback (most recent call last):\n"
        "torch.distributed.elastic.multiprocessing.errors.ChildFailedError:\n")
