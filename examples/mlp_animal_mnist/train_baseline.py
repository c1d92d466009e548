"""Train the dense baseline MLP on Animal-MNIST and save its state_dict.

    python examples/mlp_animal_mnist/train_baseline.py [--epochs 8] [--seed 0]
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from mesimp_compress.datasets import animal_mnist

HERE = Path(__file__).resolve().parent
DEFAULT_OUT = HERE / "baseline.pt"
sys.path.insert(0, str(HERE.parent))
from dense_baseline import accuracy, main, sibling, train_dense  # noqa: E402

__all__ = ["accuracy", "train"]


def train(out_path: str | Path = DEFAULT_OUT, epochs: int = 8, seed: int = 0,
          batch_size: int = 64, lr: float = 1e-3, log=None) -> dict[str, float]:
    """Train densely with Adam, save the state_dict to ``out_path``, return the metrics."""
    torch.manual_seed(seed)
    model = sibling(HERE, "model").build()
    train_data, eval_data = animal_mnist(batch_size=batch_size, seed=seed)
    return train_dense(model, train_data, eval_data, out_path, epochs=epochs, lr=lr,
                       log=log)


if __name__ == "__main__":
    main(__doc__, train, DEFAULT_OUT, 8)
