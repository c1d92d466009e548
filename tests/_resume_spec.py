"""Model and data specs for the resume tests (used as `tests/_resume_spec.py:name`)."""

from __future__ import annotations

import os
import time

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset


def model() -> nn.Module:
    torch.manual_seed(3)
    return nn.Sequential(nn.Linear(20, 64), nn.ReLU(), nn.Dropout(0.1), nn.Linear(64, 48),
                         nn.ReLU(), nn.Linear(48, 3))


class Slow:
    """A DataLoader that sleeps per batch (MESIMP_TEST_DELAY seconds), so a test can kill it."""

    def __init__(self, loader: DataLoader) -> None:
        self.loader = loader

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        delay = float(os.environ.get("MESIMP_TEST_DELAY", "0"))
        for batch in self.loader:
            time.sleep(delay)
            yield batch


def data():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(600, 20, generator=g)
    y = (x[:, :3].sum(1) > 0).long() + (x[:, 3] > 1).long()
    train = DataLoader(TensorDataset(x[:480], y[:480]), batch_size=16, shuffle=True,
                       generator=torch.Generator().manual_seed(1))
    return Slow(train), DataLoader(TensorDataset(x[480:], y[480:]), batch_size=40)


def nan_data():
    train, eval_data = data()
    x, y = next(iter(train.loader))
    bad = x.clone()
    bad[0, 0] = float("nan")
    return [(x, y)] * 20 + [(bad, y)] + [(x, y)] * 5, eval_data
