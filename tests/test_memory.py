"""Long runs do not accumulate: tracker counters and checkpoints stay the same size per window."""

from __future__ import annotations

import torch
from torch import nn

import mesimp_compress as mc
from mesimp_compress.checkpoint import Checkpointer


def _data(n_batches: int):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n_batches * 8, 12, generator=g)
    y = (x[:, 0] > 0).long()
    train = [(x[i:i + 8], y[i:i + 8]) for i in range(0, len(x), 8)]
    return train, train[:4]


def _elements(obj) -> int:
    if isinstance(obj, torch.Tensor):
        return obj.numel()
    if isinstance(obj, dict):
        return sum(_elements(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(_elements(v) for v in obj)
    return 0


def test_checkpoint_and_tracker_do_not_grow_with_steps(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 32), nn.ReLU(), nn.Linear(32, 2))
    train, evaluation = _data(100)
    sizes: list[tuple[int, int, int]] = []
    checkpoints = Checkpointer(tmp_path / "ck")

    def sink(event):
        if event.kind == "checkpoint":
            state = checkpoints.load()
            sizes.append((event.data["window"], _elements(state["tracker"]),
                          _elements({k: v for k, v in state.items() if k != "history"})))

    # min_width keeps the widths fixed after the first prunes, so later windows are alike
    cfg = mc.CompressConfig(k=4, epochs=1, cycles=1, recovery_epochs=1, window=0.05,
                            prune_rate=0.01, min_width=30, distill=0.0)
    mc.compress(model, train, evaluation, config=cfg, checkpoint_dir=checkpoints.directory,
                sink=sink)
    assert len(sizes) >= 50  # 100 batches x 3 epochs / 5-batch windows
    late = sizes[len(sizes) // 4:]
    assert len({tracker for _, tracker, _ in late}) == 1
    assert len({total for _, _, total in late}) == 1  # tensors in a checkpoint: constant
