"""The dense baseline trainer shared by the examples' `train_baseline.py` scripts.

Each example supplies its model factory and data; this file trains with Adam (optionally
clipping the gradient norm), reports accuracy on the real targets (padding ignored), and
saves the state_dict atomically (a temporary name, then a rename).
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from types import ModuleType
from typing import Any

import torch

from mesimp_compress import tasks


def sibling(folder: Path, name: str) -> ModuleType:
    """Load ``name``.py from an example's folder (examples are folders, not packages)."""
    spec = importlib.util.spec_from_file_location(f"{folder.name}_{name}", folder / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@torch.no_grad()
def accuracy(model: torch.nn.Module, data: Iterable[Any]) -> float:
    """Accuracy (%) of ``model`` over all of ``data`` (targets of -100 are padding)."""
    model.eval()
    correct = counted = 0.0
    for inputs, targets in data:
        c, n = tasks.accuracy(model(inputs), targets)
        correct, counted = correct + c, counted + n
    return 100.0 * correct / counted


def train_dense(model: torch.nn.Module, train_data: Iterable[Any], eval_data: Iterable[Any],
                out_path: str | Path, *, epochs: int, lr: float, clip: float | None = None,
                log: Callable[[str], Any] | None = None) -> dict[str, float]:
    """Train ``model`` densely with Adam, save its state_dict to ``out_path``, return metrics."""
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    start = time.perf_counter()
    for epoch in range(epochs):
        model.train()
        total = 0.0
        for inputs, targets in train_data:
            loss = tasks.cross_entropy(model(inputs), targets)
            optimizer.zero_grad()
            loss.backward()
            if clip is not None:
                torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
            optimizer.step()
            total += loss.item()
        if log is not None:
            log(f"epoch {epoch + 1}/{epochs}: train loss {total / len(train_data):.4f}, "
                f"eval accuracy {accuracy(model, eval_data):.2f}%")
    seconds = time.perf_counter() - start
    metrics = {"eval_accuracy": accuracy(model, eval_data),
               "train_accuracy": accuracy(model, train_data),
               "epochs": epochs, "seconds": seconds}
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_name(out.name + ".partial")
    torch.save(model.state_dict(), partial)
    os.replace(partial, out)
    return metrics


def main(doc: str, train: Callable[..., dict[str, float]], default_out: Path,
         default_epochs: int) -> None:
    """The command line of a `train_baseline.py`: --out, --epochs, --seed, --threads."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--out", type=Path, default=default_out)
    parser.add_argument("--epochs", type=int, default=default_epochs)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads (default: torch's); the baseline moves with it")
    args = parser.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    metrics = train(args.out, epochs=args.epochs, seed=args.seed, log=print)
    print(f"eval accuracy {metrics['eval_accuracy']:.2f}% (train {metrics['train_accuracy']:.2f}%) "
          f"after {metrics['epochs']} epochs in {metrics['seconds']:.1f} s; saved {args.out}")
