"""Image classification sets: Animal-MNIST (28x28, 10 classes) and scikit-learn's 8x8 digits."""

from __future__ import annotations

import gzip
import pickle
from functools import lru_cache

import numpy as np
import torch
from torch.utils.data import DataLoader

from ..errors import DataError
from ._batching import stratified_split, tensor_loaders
from ._locate import data_file, package_dir

ANIMAL_MNIST_EVAL_FRACTION = 0.2
DIGITS_EVAL_FRACTION = 0.2


@lru_cache(maxsize=1)
def _animal_mnist_arrays() -> tuple[np.ndarray, np.ndarray]:
    folder = package_dir("animal_mnist", "animal-mnist") / "data" / "Animal_MNIST"
    arrays = []
    for name in ("animal_data_version_3.gz", "animal_label_version_3.gz"):
        # The package's own loader unpickles the same files; the package itself is never
        # imported (its __init__ pulls TensorFlow).
        with gzip.open(data_file(folder / name, "animal-mnist"), "rb") as handle:
            arrays.append(np.asarray(pickle.load(handle)))  # noqa: S301 - installed data files
    images, labels = arrays
    if images.shape[1:] != (28, 28) or len(images) != len(labels):
        raise DataError(f"animal-mnist: expected N 28x28 images with N labels, got images "
                        f"{images.shape} and labels {labels.shape}")
    # 284 images occur twice (same label): keep the first copy, so no eval image is in train.
    _, first = np.unique(images.reshape(len(images), -1), axis=0, return_index=True)
    keep = np.sort(first)
    images, labels = images[keep], labels[keep]
    images.setflags(write=False)
    labels.setflags(write=False)
    return images, labels


Pair = tuple[torch.Tensor, torch.Tensor]


def _animal_mnist_tensors() -> tuple[Pair, Pair]:
    images, labels = _animal_mnist_arrays()
    train_idx, eval_idx = stratified_split(labels, ANIMAL_MNIST_EVAL_FRACTION)
    pixels = images.astype(np.float32) / 255.0
    mean, std = float(pixels[train_idx].mean()), float(pixels[train_idx].std())
    x = torch.from_numpy((pixels - mean) / std)
    y = torch.from_numpy(labels.astype(np.int64))
    return (x[train_idx], y[train_idx]), (x[eval_idx], y[eval_idx])


def animal_mnist(batch_size: int = 64, seed: int = 0) -> tuple[DataLoader, DataLoader]:
    """Animal-MNIST as flat vectors: (train, eval) batches of (float32 (B, 784), int64 (B,))."""
    (x_tr, y_tr), (x_ev, y_ev) = _animal_mnist_tensors()
    return tensor_loaders((x_tr.reshape(len(x_tr), -1), y_tr), (x_ev.reshape(len(x_ev), -1), y_ev),
                          batch_size, seed)


def animal_mnist_images(batch_size: int = 64, seed: int = 0) -> tuple[DataLoader, DataLoader]:
    """Animal-MNIST as images: (train, eval) batches of (float32 (B, 1, 28, 28), int64 (B,))."""
    (x_tr, y_tr), (x_ev, y_ev) = _animal_mnist_tensors()
    return tensor_loaders((x_tr.unsqueeze(1), y_tr), (x_ev.unsqueeze(1), y_ev), batch_size, seed)


def digits(batch_size: int = 64, seed: int = 0) -> tuple[DataLoader, DataLoader]:
    """scikit-learn's 8x8 digits: (train, eval) batches of (float32 (B, 64) in [0, 1],
    int64 (B,))."""
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise DataError("the 'digits' data set needs scikit-learn; install it with: "
                        "pip install scikit-learn") from None
    bunch = load_digits()
    x = torch.from_numpy(np.asarray(bunch.data, dtype=np.float32) / 16.0)
    labels = np.asarray(bunch.target, dtype=np.int64)
    y = torch.from_numpy(labels)
    train_idx, eval_idx = stratified_split(labels, DIGITS_EVAL_FRACTION)
    return tensor_loaders((x[train_idx], y[train_idx]), (x[eval_idx], y[eval_idx]),
                          batch_size, seed)
