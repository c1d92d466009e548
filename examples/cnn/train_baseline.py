"""Train the dense baseline CNN on Animal-MNIST images and save its state_dict.

    python examples/cnn/train_baseline.py [--epochs 4] [--seed 0]
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import time
from pathlib import Path
from types import ModuleType

import torch

from mesimp_compress import tasks
from mesimp_compress.datasets import animal_mnist_images

HERE = Path(__file__).resolve().parent
DEFAULT_OUT = HERE / "baseline.pt"


def _sibling(name: str) -> ModuleType:
    """Load ``name``.py from this example's folder (examples are folders, not packages)."""
    spec = importlib.util.spec_from_file_location(f"{HERE.name}_{name}", HERE / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@torch.no_grad()
def accuracy(model: torch.nn.Module, data) -> float:
    """Accuracy (%) of ``model`` over all of ``data``."""
    model.eval()
    correct = counted = 0.0
    for x, y in data:
        c, n = tasks.accuracy(model(x), y)
        correct, counted = correct + c, counted + n
    return 100.0 * correct / counted


def train(out_path: str | Path = DEFAULT_OUT, epochs: int = 4, seed: int = 0,
          batch_size: int = 64, lr: float = 1e-3, log=None) -> dict[str, float]:
    """Train densely with Adam, save the state_dict to ``out_path``, return the metrics."""
    torch.manual_seed(seed)
    model = _sibling("model").build()
    train_data, eval_data = animal_mnist_images(batch_size=batch_size, seed=seed)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    start = time.perf_counter()
    for epoch in range(epochs):
        model.train()
        total = 0.0
        for x, y in train_data:
            loss = tasks.cross_entropy(model(x), y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            total += loss.item()
        if log is not None:
            log(f"epoch {epoch + 1}/{epochs}: train loss {total / len(train_data):.4f}, "
                f"eval accuracy {accuracy(model, eval_data):.2f}%")
    seconds = time.perf_counter() - start
    metrics = {"eval_accuracy": accuracy(model, eval_data),
               "train_accuracy": accuracy(model, train_data),
               "epochs": epochs, "seconds": seconds}
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    partial = out_path.with_name(out_path.name + ".partial")
    torch.save(model.state_dict(), partial)
    os.replace(partial, out_path)
    return metrics


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    metrics = train(args.out, epochs=args.epochs, seed=args.seed, log=print)
    print(f"eval accuracy {metrics['eval_accuracy']:.2f}% (train {metrics['train_accuracy']:.2f}%) "
          f"after {metrics['epochs']} epochs in {metrics['seconds']:.1f} s; saved {args.out}")


if __name__ == "__main__":
    main()
