"""ActivityTracker: windows, totals, surgery selection, persistence, all-reduce."""

from __future__ import annotations

import multiprocessing

import pytest
import torch

from mesimp_compress.activity import ActivityTracker
from mesimp_compress.errors import ConfigError, ShapeError


def _tracker() -> ActivityTracker:
    tracker = ActivityTracker()
    tracker.record("fc", torch.tensor([3, 0, 1, 2]), 3)
    tracker.record_selected("fc", torch.tensor([1, 3]), 5, 4)
    tracker.record_selected("rnn.l0", None, 2, 3)
    return tracker


def test_record_accumulates_window_and_total():
    tracker = _tracker()
    assert tracker.keys() == ["fc", "rnn.l0"]
    assert torch.equal(tracker.window_hits("fc"), torch.tensor([3, 5, 1, 7]))
    assert tracker.window_examples("fc") == 8
    assert torch.equal(tracker.window_hits("rnn.l0"), torch.tensor([2, 2, 2]))
    assert tracker.window_hits("fc").dtype == torch.int64
    tracker.reset_window()
    assert torch.equal(tracker.window_hits("fc"), torch.zeros(4, dtype=torch.int64))
    assert tracker.window_examples("fc") == 0
    tracker.record("fc", torch.tensor([1, 1, 0, 0]), 1)
    assert torch.equal(tracker.window_hits("fc"), torch.tensor([1, 1, 0, 0]))
    assert torch.equal(tracker.total_hits("fc"), torch.tensor([4, 6, 1, 7]))
    assert tracker.total_examples("fc") == 9
    tracker.reset()
    assert tracker.keys() == []


def test_reads_are_copies():
    tracker = _tracker()
    tracker.window_hits("fc").zero_()
    tracker.total_hits("fc").zero_()
    assert int(tracker.window_hits("fc").sum()) == 16


def test_memory_does_not_grow_with_steps():
    tracker = ActivityTracker()
    for step in range(500):
        tracker.record_selected("fc", torch.tensor([step % 7, 7]), 2, 8)
        if step % 100 == 99:
            tracker.reset_window()
    state = tracker.state_dict()
    assert state["total_hits"]["fc"].shape == (8,)
    assert int(tracker.total_hits("fc")[7]) == 1000
    assert tracker.total_examples("fc") == 1000


def test_select_keeps_counters_of_kept_units():
    tracker = _tracker()
    tracker.reset_window()
    tracker.record("fc", torch.tensor([1, 2, 3, 4]), 4)
    tracker.select("fc", [1, 3])
    assert torch.equal(tracker.window_hits("fc"), torch.tensor([2, 4]))
    assert torch.equal(tracker.total_hits("fc"), torch.tensor([7, 11]))
    tracker.record("fc", torch.tensor([1, 0]), 1)  # the layer now has 2 units
    with pytest.raises(ShapeError, match="fc"):
        tracker.record("fc", torch.tensor([1, 0, 0]), 1)
    with pytest.raises(ShapeError, match=r"\[0, 2\)"):
        tracker.select("fc", [0, 2])
    tracker.select("unknown", [0])  # nothing recorded: nothing to select


def test_errors():
    tracker = _tracker()
    with pytest.raises(ConfigError, match="nope"):
        tracker.window_hits("nope")
    with pytest.raises(ShapeError):
        tracker.record("fc", torch.ones(2, 2, dtype=torch.int64), 2)
    with pytest.raises(ConfigError):
        tracker.load_state_dict({"total_hits": {}})


def test_state_dict_round_trip():
    tracker = _tracker()
    tracker.reset_window()
    tracker.record("fc", torch.tensor([0, 1, 0, 1]), 1)
    state = tracker.state_dict()
    assert all(isinstance(v, torch.Tensor) for v in state["total_hits"].values())
    assert state["window_examples"] == {"fc": 1, "rnn.l0": 0}
    other = ActivityTracker()
    other.load_state_dict(state)
    for key in tracker.keys():
        assert torch.equal(other.window_hits(key), tracker.window_hits(key))
        assert torch.equal(other.total_hits(key), tracker.total_hits(key))
        assert other.window_examples(key) == tracker.window_examples(key)
        assert other.total_examples(key) == tracker.total_examples(key)
    state["total_hits"]["fc"][0] = 99  # the loaded tracker holds its own copies
    assert int(other.total_hits("fc")[0]) == 3


def test_all_reduce_is_a_no_op_without_distributed():
    tracker = _tracker()
    tracker.all_reduce()
    assert torch.equal(tracker.window_hits("fc"), torch.tensor([3, 5, 1, 7]))


def _rank(rank: int, path: str, queue) -> None:
    import torch.distributed as dist

    store = dist.FileStore(path, 2)
    dist.init_process_group("gloo", store=store, rank=rank, world_size=2)
    tracker = ActivityTracker()
    tracker.record("fc", torch.tensor([rank, 1, 2 * rank]), 3 + rank)
    tracker.record_selected("rnn.l0", torch.tensor([rank]), 4, 2)
    tracker.all_reduce()
    queue.put((rank, tracker.window_hits("fc").tolist(), tracker.window_examples("fc"),
               tracker.window_hits("rnn.l0").tolist(), tracker.window_examples("rnn.l0")))
    dist.destroy_process_group()


def test_all_reduce_sums_windows_over_ranks(tmp_path):
    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_rank, args=(r, str(tmp_path / "store"), queue))
             for r in range(2)]
    for p in procs:
        p.start()
    results = sorted(queue.get(timeout=60) for _ in procs)
    for p in procs:
        p.join(timeout=30)
    for _, hits, examples, rnn_hits, rnn_examples in results:
        assert hits == [1, 2, 2]
        assert examples == 7
        assert rnn_hits == [4, 4]
        assert rnn_examples == 8
