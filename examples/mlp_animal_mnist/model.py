"""The paper's MNIST-style MLP: 784-500-500-10 with ReLU, for flattened Animal-MNIST."""

from __future__ import annotations

from torch import nn

HIDDEN = 500
CLASSES = 10


def build() -> nn.Module:
    """A freshly initialised 784-500-500-10 MLP (logits out)."""
    return nn.Sequential(
        nn.Linear(28 * 28, HIDDEN), nn.ReLU(),
        nn.Linear(HIDDEN, HIDDEN), nn.ReLU(),
        nn.Linear(HIDDEN, CLASSES),
    )
