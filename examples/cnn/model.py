"""A small Conv-BN-ReLU network for 28x28 grey images (Animal-MNIST as images).

Two conv blocks (1->32->64 channels, each Conv3x3-BN-ReLU-MaxPool2), then Flatten and a
hidden Linear of 128 units: the structure meSimp must follow from conv channels through
BatchNorm and Flatten into the columns of the first Linear.
"""

from __future__ import annotations

from torch import nn

CLASSES = 10


def build() -> nn.Module:
    """A freshly initialised CNN: (B, 1, 28, 28) images in, (B, 10) logits out."""
    return nn.Sequential(
        nn.Conv2d(1, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(64 * 7 * 7, 128), nn.ReLU(),
        nn.Linear(128, CLASSES),
    )
