"""Fixed train/eval splits and seeded DataLoaders shared by the built-in data sets."""

from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import DataLoader, TensorDataset

from ..errors import ConfigError

SPLIT_SEED = 0
"""Seed of every built-in split. It is not the loaders' seed: the eval examples stay the same
whichever seed a run shuffles its training batches with."""


def check_batch_size(batch_size: int) -> int:
    """``batch_size`` if it is a positive int; ConfigError otherwise."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ConfigError(f"batch_size must be a positive int, got {batch_size!r}")
    return batch_size


def stratified_split(labels: np.ndarray, eval_fraction: float) -> tuple[np.ndarray, np.ndarray]:
    """(train indices, eval indices): ``round(eval_fraction * n_c)`` examples of each class c
    go to eval, drawn with :data:`SPLIT_SEED`; both index arrays are sorted."""
    rng = np.random.default_rng(SPLIT_SEED)
    train: list[np.ndarray] = []
    evaluation: list[np.ndarray] = []
    for label in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == label))
        n_eval = int(round(eval_fraction * len(members)))
        evaluation.append(members[:n_eval])
        train.append(members[n_eval:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(evaluation))


def tensor_loaders(
    train: tuple[torch.Tensor, torch.Tensor],
    evaluation: tuple[torch.Tensor, torch.Tensor],
    batch_size: int,
    seed: int,
) -> tuple[DataLoader, DataLoader]:
    """(train, eval) DataLoaders of (inputs, targets): train shuffled by a generator seeded with
    ``seed`` (so every epoch's order is reproducible), eval in a fixed order."""
    check_batch_size(batch_size)
    generator = torch.Generator().manual_seed(seed)
    train_loader = DataLoader(TensorDataset(*train), batch_size=batch_size, shuffle=True,
                              generator=generator)
    eval_loader = DataLoader(TensorDataset(*evaluation), batch_size=batch_size, shuffle=False)
    return train_loader, eval_loader
