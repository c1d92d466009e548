"""meProp vs dense backprop: backward-only time and whole training steps, A/B interleaved.

MLP 784-500-500-10 (unified, k=25 = 5%) at batch 64 and batch 1, and an LSTM tagger
(hidden 500, length 20, batch 32). Every variant runs one rep in turn (order rotated), so
drift and neighbours' load hit all variants alike; each cell is the median over reps.
The meProp timings include its ActivityTracker. The meProp Linear runs its compiled backward
when it is built (`mesimp build-native`); the "Python backward" rows run the Python one.
Prints a Markdown table.

    .venv/bin/python bench/bench_meprop.py [--threads 1] [--reps 300] [--lstm-reps 20]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from mesimp_compress.activity import ActivityTracker
from mesimp_compress.meprop import apply_meprop, native
from mesimp_compress.optim import RowSparseAdam


def interleaved(variants: dict[str, Callable[[], float]], reps: int, warmup: int,
                block: int) -> dict[str, float]:
    """Median seconds per variant over ``reps`` calls each, run A/B interleaved in blocks.

    Each variant runs ``block`` consecutive calls in turn (order rotated every round), as
    consecutive training steps would; each callable returns the seconds of its timed part.
    """
    names = list(variants)
    times: dict[str, list[float]] = {n: [] for n in names}
    for name in names:
        for _ in range(warmup):
            variants[name]()
    rounds = -(-reps // block)
    for rnd in range(rounds):
        shift = rnd % len(names)
        for name in names[shift:] + names[:shift]:
            times[name].extend(variants[name]() for _ in range(block))
    return {n: statistics.median(t) for n, t in times.items()}


def mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(784, 500), nn.ReLU(), nn.Linear(500, 500), nn.ReLU(),
                         nn.Linear(500, 10))


class Tagger(nn.Module):
    def __init__(self, vocab: int = 1000, emb: int = 100, hidden: int = 500, tags: int = 17):
        super().__init__()
        self.emb = nn.Embedding(vocab, emb)
        self.lstm = nn.LSTM(emb, hidden, batch_first=True)
        self.out = nn.Linear(hidden, tags)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.out(self.lstm(self.emb(tokens))[0])


class Runner:
    """One model + optimizer; times a backward pass or a whole step on fixed batches."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer,
                 batches: list[tuple[torch.Tensor, torch.Tensor]], python: bool = False) -> None:
        self.model, self.optimizer, self.batches, self.i = model, optimizer, batches, 0
        self.python = python  # the Python meProp backward even where the compiled one is built

    def _batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        self.i = (self.i + 1) % len(self.batches)
        return self.batches[self.i]

    def _loss(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if self.python:
            with native.disabled():
                out = self.model(x)
        else:
            out = self.model(x)
        return F.cross_entropy(out.reshape(-1, out.shape[-1]), y.reshape(-1))

    def backward(self) -> float:
        self.optimizer.zero_grad(set_to_none=True)
        loss = self._loss(*self._batch())
        start = time.perf_counter()
        loss.backward()
        took = time.perf_counter() - start
        self.optimizer.zero_grad(set_to_none=True)
        return took

    def step(self) -> float:
        x, y = self._batch()
        start = time.perf_counter()
        self.optimizer.zero_grad(set_to_none=True)
        self._loss(x, y).backward()
        self.optimizer.step()
        return time.perf_counter() - start


class _Free(torch.autograd.Function):
    """A Linear whose backward costs nothing: passes a zero input gradient, no weight gradient."""

    @staticmethod
    def forward(ctx, x, weight, bias):  # noqa: D102
        ctx.needs_x = x.requires_grad
        ctx.shape = x.shape
        return F.linear(x, weight, bias)

    @staticmethod
    def backward(ctx, dy):  # noqa: D102
        return (dy.new_zeros(ctx.shape) if ctx.needs_x else None), None, None


class FreeLinear(nn.Linear):
    """The ceiling of any sparsified backprop: the same graph, the hidden layers' backward free."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        return _Free.apply(x, self.weight, self.bias)


DENSE, FUSED = "dense + Adam", "dense + fused Adam"
MEP_ADAM, MEP_ROWS = "meProp + Adam", "meProp + RowSparseAdam"
MEP_PY = "meProp (Python backward) + RowSparseAdam"


class LayerRunner:
    """The hidden layers of the MLP alone: times their backward for a fixed upstream gradient."""

    def __init__(self, layers: list[nn.Module], optimizer: torch.optim.Optimizer | None,
                 batch: int) -> None:
        self.layers, self.optimizer = layers, optimizer
        self.inputs = [torch.randn(batch, 784), torch.randn(batch, 500, requires_grad=True)]
        self.grads = [torch.randn(batch, 500) for _ in layers]

    def backward(self) -> float:
        took = 0.0
        for layer, x, dy in zip(self.layers, self.inputs, self.grads, strict=True):
            y = layer(x)
            start = time.perf_counter()
            y.backward(dy)
            took += time.perf_counter() - start
        for layer in self.layers:
            layer.zero_grad(set_to_none=True)
        self.inputs[1].grad = None
        if self.optimizer is not None:
            self.optimizer.zero_grad(set_to_none=True)
        return took


def runners(make: Callable[[], nn.Module], k: int, batches, lr: float = 1e-3,
            python: bool = True):
    """The variants, all starting from the same weights; meProp ones with a tracker (the
    Python-backward one, if ``python``, only where the compiled backward is built: else
    it is MEP_ROWS)."""
    base = make()
    names = (DENSE, FUSED, MEP_ADAM, MEP_ROWS) + ((MEP_PY,) if python and native.module() else ())
    models = {name: copy.deepcopy(base) for name in names}
    for name in names[2:]:
        apply_meprop(models[name], k, tracker=ActivityTracker())
    optimizers = {
        DENSE: torch.optim.Adam(models[DENSE].parameters(), lr),
        FUSED: torch.optim.Adam(models[FUSED].parameters(), lr, fused=True),
        MEP_ADAM: torch.optim.Adam(models[MEP_ADAM].parameters(), lr),
    }
    for name in names[3:]:
        optimizers[name] = RowSparseAdam(models[name].parameters(), lr)
    return {name: Runner(models[name], optimizers[name], batches, python=name == MEP_PY)
            for name in models}


def measure(label: str, run: dict[str, Runner], reps: int, warmup: int,
            block: int) -> list[tuple]:
    """Rows of the table for one setting: backward-only, then whole steps."""
    back = interleaved({n: r.backward for n, r in run.items() if n != FUSED}, reps, warmup,
                       block)
    step = interleaved({n: r.step for n, r in run.items()}, reps, warmup, block)
    rows = [
        (label, "backward (meProp fills .grad)", back[DENSE], back[MEP_ADAM]),
        (label, "backward (meProp row grads)", back[DENSE], back[MEP_ROWS]),
        (label, "step: dense Adam vs meProp + Adam", step[DENSE], step[MEP_ADAM]),
        (label, "step: dense Adam vs meProp + RowSparseAdam", step[DENSE], step[MEP_ROWS]),
        (label, "step: dense fused Adam vs meProp + RowSparseAdam", step[FUSED], step[MEP_ROWS]),
    ]
    if MEP_PY in run:
        rows.insert(2, (label, "backward (row grads), Python backward", back[DENSE],
                        back[MEP_PY]))
        rows.append((label, "step: dense fused Adam vs meProp (Python backward) + "
                            "RowSparseAdam", step[FUSED], step[MEP_PY]))
    return rows


def mlp_rows(batch: int, reps: int) -> list[tuple]:
    batches = [(torch.randn(batch, 784), torch.randint(0, 10, (batch,))) for _ in range(8)]
    label = f"MLP 784-500-500-10, batch {batch}"
    run = runners(mlp, 25, batches)
    dense = run[DENSE].model
    hidden = run[MEP_ROWS].model
    layers = {
        "dense": LayerRunner([dense[0], dense[2]], None, batch),
        "meProp": LayerRunner([hidden[0], hidden[2]], run[MEP_ROWS].optimizer, batch),
    }
    only = interleaved({n: r.backward for n, r in layers.items()}, reps, max(10, reps // 10),
                       10)
    free = copy.deepcopy(dense)
    for i in (0, 2):
        free[i].__class__ = FreeLinear
    ceiling = Runner(free, torch.optim.Adam(free.parameters()), batches)
    bound = interleaved({"dense": run[DENSE].backward, "free": ceiling.backward}, reps,
                        max(10, reps // 10), 10)
    rows = measure(label, run, reps, max(10, reps // 10), 10)
    rows.insert(2, (label, "ceiling: backward with the hidden layers' backward free",
                    bound["dense"], bound["free"]))
    rows.insert(2, (label, "backward of the two hidden layers only (row grads)",
                    only["dense"], only["meProp"]))
    return rows


def lstm_rows(reps: int) -> list[tuple]:
    batches = [(torch.randint(0, 1000, (32, 20)), torch.randint(0, 17, (32, 20)))
               for _ in range(4)]
    return measure("LSTM tagger (emb 100, hidden 500), length 20, batch 32",
                   runners(Tagger, 25, batches, python=False), reps, 2, 2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--reps", type=int, default=300)
    parser.add_argument("--lstm-reps", type=int, default=20)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    rows = mlp_rows(64, args.reps) + mlp_rows(1, args.reps) + lstm_rows(args.lstm_reps)
    built = "built" if native.module() else "not built: the Python backward throughout"
    print(f"torch {torch.__version__}, {args.threads} thread(s), k=25, unified; medians of "
          f"{args.reps} (MLP) / {args.lstm_reps} (LSTM) interleaved reps; compiled meProp "
          f"Linear backward {built}")
    print()
    print("| model | measured | dense (ms) | meProp (ms) | speedup |")
    print("| --- | --- | ---: | ---: | ---: |")
    for label, what, dense, mep in rows:
        print(f"| {label} | {what} | {dense * 1e3:.3f} | {mep * 1e3:.3f} | {dense / mep:.2f}x |")


if __name__ == "__main__":
    main()
