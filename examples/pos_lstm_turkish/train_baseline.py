"""Train the dense baseline BiLSTM tagger on Turkish UPOS and save its state_dict.

    python examples/pos_lstm_turkish/train_baseline.py [--epochs 5] [--seed 0]
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from mesimp_compress.datasets import turkish_upos

HERE = Path(__file__).resolve().parent
DEFAULT_OUT = HERE / "baseline.pt"
sys.path.insert(0, str(HERE.parent))
from dense_baseline import accuracy, main, sibling, train_dense  # noqa: E402

__all__ = ["accuracy", "train"]


def train(out_path: str | Path = DEFAULT_OUT, epochs: int = 5, seed: int = 0,
          batch_size: int = 32, lr: float = 2e-3, log=None) -> dict[str, float]:
    """Train densely with Adam (gradient norm clipped at 5), save the state_dict, return
    the metrics."""
    torch.manual_seed(seed)
    model = sibling(HERE, "model").build()
    train_data, eval_data = turkish_upos(batch_size=batch_size, seed=seed)
    return train_dense(model, train_data, eval_data, out_path, epochs=epochs, lr=lr,
                       clip=5.0, log=log)


if __name__ == "__main__":
    main(__doc__, train, DEFAULT_OUT, 5)
