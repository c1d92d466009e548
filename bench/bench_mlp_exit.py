"""Exit check of issue 3: meSimp on the dense MLP 784-500-500-10 trained on Animal-MNIST.

Fine-tunes the baseline with meProp plus the meSimp schedule through
``mesimp_compress.api.compress`` (no export) and prints per-layer widths, eval accuracy before
and after, and the fraction of weights updated per meProp step, measured two ways in the
optimizer's step hooks and cross-checked against k and the widths:

- "grad rows": weights in rows of a non-zero ``.grad`` (what meProp computes: k rows of each
  hidden layer, every bias, the dense output layer), over all parameters of the model as it
  is at that step;
- "moved": weights whose value changed in the step (with dense Adam, rows not selected still
  move by their momentum; with ``--sparse-update`` only the selected rows move).

    .venv/bin/python bench/bench_mlp_exit.py [--seeds 0] [--k 140] [--threads 1] [--KEY VALUE ...]
    .venv/bin/python bench/bench_mlp_exit.py --levers       # one change at a time, seed 0
    .venv/bin/python bench/bench_mlp_exit.py --whole-windows  # train set cut to whole windows

Any CompressConfig key may be passed as ``--key value`` (e.g. ``--distill 0 --lr 3e-4``).
Baselines: seed 0 is ``examples/mlp_animal_mnist/baseline.pt`` (trained if missing); other
seeds are trained the same way into ``runs/bench_mlp/baseline_seed{seed}.pt``.
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import sys
import time
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
from torch.optim.optimizer import (
    register_optimizer_step_post_hook,
    register_optimizer_step_pre_hook,
)
from torch.utils.data import DataLoader, TensorDataset

from mesimp_compress.api import compress
from mesimp_compress.config import CompressConfig
from mesimp_compress.datasets import animal_mnist

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "examples" / "mlp_animal_mnist"
CACHE = ROOT / "runs" / "bench_mlp"

# The configuration this bench recommends (explicit, so it does not drift with config.py).
BEST: dict[str, Any] = dict(k=0.25, prune_rate=0.1, window=0.125, epochs=2, cycles=1,
                            recovery_epochs=2, distill=0.5, temperature=2.0, compensate="linear",
                            lr=1e-3, optimizer="adam", normal_backprop="dense")


def example_module(name: str) -> ModuleType:
    """Load ``examples/mlp_animal_mnist/<name>.py`` (example folders are not packages)."""
    path = EXAMPLE / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"mlp_animal_mnist_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def baseline_path(seed: int) -> Path:
    """The dense baseline for ``seed``; trained (8 epochs, dense Adam) if it is missing."""
    path = EXAMPLE / "baseline.pt" if seed == 0 else CACHE / f"baseline_seed{seed}.pt"
    if not path.exists():
        print(f"training the dense baseline, seed {seed} -> {path.relative_to(ROOT)}", flush=True)
        example_module("train_baseline").train(path, seed=seed)
    return path


WHOLE_WINDOWS = {"on": False}


def data(seed: int, batch_size: int = 64) -> tuple[DataLoader, DataLoader]:
    """Animal-MNIST (train, eval) for ``seed``; with ``--whole-windows`` the train set is cut to
    a multiple of 8 batches (7,680 examples), so no epoch ends in a short 2-batch window."""
    train, evaluation = animal_mnist(batch_size=batch_size, seed=seed)
    if not WHOLE_WINDOWS["on"]:
        return train, evaluation
    x, y = train.dataset.tensors
    n = len(x) // (8 * batch_size) * 8 * batch_size
    order = torch.Generator().manual_seed(seed)
    return DataLoader(TensorDataset(x[:n], y[:n]), batch_size=batch_size, shuffle=True,
                      generator=order), evaluation


def load_baseline(seed: int) -> torch.nn.Module:
    """A fresh 784-500-500-10 MLP with the weights of the seed's baseline."""
    model = example_module("model").build()
    model.load_state_dict(torch.load(baseline_path(seed), weights_only=True))
    return model


class UpdateCounter:
    """Counts, per optimizer step in meProp phases, the weights with a gradient and those moved."""

    def __init__(self, names: list[str], normal_backprop: str, k: int) -> None:
        self.names = names
        self.normal_backprop = normal_backprop
        self.k = k
        self.meprop = False
        self.steps = 0
        self.grad_rows = 0.0  # sum over steps of (weights in rows with a non-zero grad) / total
        self.moved = 0.0
        self.rows: dict[str, float] = {}  # per weight matrix: sum of (rows with grad) / rows
        self.first: list[float] = []  # grad-row fractions of the steps at the original widths
        self._widths0: list[int] = []
        self.gap = 0.0  # largest |measured - derived from k and the step's widths|
        self._before: list[torch.Tensor] = []
        self._handles: list[Any] = []

    def sink(self, event: Any) -> None:
        """Follow the phases: meProp runs in pruning cycles (and normal ones if configured)."""
        if event.kind == "phase":
            self.meprop = event.data["phase"] == "prune" or self.normal_backprop == "meprop"

    def __enter__(self) -> UpdateCounter:
        self._handles = [register_optimizer_step_pre_hook(self._pre),
                         register_optimizer_step_post_hook(self._post)]
        return self

    def __exit__(self, *exc: Any) -> None:
        for handle in self._handles:
            handle.remove()

    def _params(self, optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
        return [p for group in optimizer.param_groups for p in group["params"]]

    def _pre(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        if not self.meprop:
            return
        params = self._params(optimizer)
        total = sum(p.numel() for p in params)
        with_grad = 0
        for name, p in zip(self.names, params, strict=False):
            grad = _grad(optimizer, p)
            if grad is None:
                continue
            if p.dim() == 2:
                live = grad.abs().sum(1) != 0
                with_grad += int(live.sum()) * p.shape[1]
                self.rows[name] = self.rows.get(name, 0.0) + float(live.float().mean())
            else:
                with_grad += int((grad != 0).sum())
        self.grad_rows += with_grad / total
        widths = [p.shape[0] for p in params if p.dim() == 2][:-1]
        self.gap = max(self.gap, abs(with_grad / total - derived_fraction(widths, self.k)))
        if self.steps == 0 or (self.first and widths == self._widths0):
            self._widths0 = widths
            self.first.append(with_grad / total)
        self._before = [p.detach().clone() for p in params]

    def _post(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        if not self.meprop:
            return
        params = self._params(optimizer)
        total = sum(p.numel() for p in params)
        moved = sum(int((p.detach() != b).sum()) for p, b in zip(params, self._before, strict=True))
        self.moved += moved / total
        self._before = []
        self.steps += 1

    def summary(self) -> dict[str, Any]:
        n = max(self.steps, 1)
        return {"meprop_steps": self.steps, "grad_rows": self.grad_rows / n,
                "moved": self.moved / n,
                "first": statistics.mean(self.first) if self.first else float("nan"),
                "first_steps": len(self.first), "gap": self.gap,
                "rows": {name: v / n for name, v in self.rows.items()}}


def _grad(optimizer: torch.optim.Optimizer, param: torch.Tensor) -> torch.Tensor | None:
    """``param``'s gradient, including row gradients a row-sparse optimizer holds pending."""
    grad = param.grad
    row_grad = getattr(optimizer, "row_grad", None)
    pending = row_grad(param) if row_grad is not None else None
    if pending is None:
        return grad
    rows, values = pending
    full = torch.zeros_like(param) if grad is None else grad.clone()
    full.index_add_(0, rows, values)
    return full


def derived_fraction(widths: list[int], k: int, inputs: int = 784, classes: int = 10) -> float:
    """Fraction of all parameters getting a gradient in one unified meProp step at ``widths``."""
    sizes = [inputs, *widths, classes]
    total = sum(sizes[i + 1] * sizes[i] + sizes[i + 1] for i in range(len(sizes) - 1))
    grad = sum(min(k, sizes[i + 1]) * sizes[i] + sizes[i + 1] for i in range(len(widths)))
    grad += classes * sizes[-2] + classes
    return grad / total


def run(seed: int = 0, threads: int | None = 1, **overrides: Any) -> dict[str, Any]:
    """One compression of the seed's baseline; returns widths, accuracies, update fractions."""
    cfg = CompressConfig(**{**BEST, **overrides, "seed": seed, "threads": threads})
    model = load_baseline(seed)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    train, evaluation = data(seed)
    k = cfg.k if isinstance(cfg.k, int) else round(cfg.k * 500)
    start = time.perf_counter()
    with UpdateCounter(names, cfg.normal_backprop, k) as counter:
        result = compress(model, train, evaluation, config=cfg, sink=counter.sink)
    seconds = time.perf_counter() - start
    widths = result.widths
    return {"seed": seed, "widths": widths, "before": 100 * result.metric_before,
            "after": 100 * result.metric_after, "seconds": seconds,
            "epochs": cfg.cycles * 2 * cfg.epochs + cfg.recovery_epochs,
            "derived": derived_fraction(list(widths.values()), k),
            "derived_full": derived_fraction([500] * len(widths), k),
            **counter.summary()}


def mean_sd(values: list[float]) -> str:
    if len(values) < 2:
        return f"{values[0]:.2f}"
    return f"{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f}"


def print_runs(runs: list[dict[str, Any]]) -> None:
    print("| seed | widths | cut | acc before | acc after | drop | weights with grad / step "
          "(measured) | moved / step | meProp steps | s |")
    print("| ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for r in runs:
        w = list(r["widths"].values())
        print(f"| {r['seed']} | {'/'.join(map(str, w))} | {1000 / sum(w):.2f}x | "
              f"{r['before']:.2f} | "
              f"{r['after']:.2f} | {r['after'] - r['before']:+.2f} | {100 * r['grad_rows']:.1f}% | "
              f"{100 * r['moved']:.1f}% | {r['meprop_steps']} | {r['seconds']:.0f} |")
    if len(runs) > 1:
        print(f"| mean ± sd | | | {mean_sd([r['before'] for r in runs])} | "
              f"{mean_sd([r['after'] for r in runs])} | "
              f"{mean_sd([r['after'] - r['before'] for r in runs])} | | | | |")
    r = runs[-1]
    rows = ", ".join(f"{n} {100 * v:.1f}%" for n, v in r["rows"].items())
    print(f"\nrows with a gradient per meProp step (measured, mean over the pruning cycle): {rows}")
    print(f"weights with a gradient / all weights, per meProp step: measured "
          f"{100 * r['first']:.1f}% over the {r['first_steps']} steps at 500/500 (derived from k: "
          f"{100 * r['derived_full']:.1f}%), {100 * r['derived']:.1f}% derived at the final "
          f"widths, "
          f"{100 * r['grad_rows']:.1f}% measured mean over the pruning cycle (widths fall from 500 "
          f"to ~k); largest |measured - derived| over all steps {100 * r['gap']:.2f} points")


LEVERS: list[tuple[str, dict[str, Any]]] = [
    ("defaults of this bench", {}),
    ("k=100", {"k": 100}),
    ("k=160", {"k": 160}),
    ("prune_rate=0.05", {"prune_rate": 0.05}),
    ("prune_rate=0.3", {"prune_rate": 0.3}),
    ("window=0.5", {"window": 0.5}),
    ("epochs=1", {"epochs": 1}),
    ("epochs=3", {"epochs": 3}),
    ("cycles=2", {"cycles": 2}),
    ("recovery_epochs=0", {"recovery_epochs": 0}),
    ("recovery_epochs=4", {"recovery_epochs": 4}),
    ("distill=0", {"distill": 0.0}),
    ("distill=1, T=4", {"distill": 1.0, "temperature": 4.0}),
    ("compensate=off", {"compensate": "off"}),
    ("compensate=mean", {"compensate": "mean"}),
    ("lr=3e-4", {"lr": 3e-4}),
    ("optimizer=sgd, lr=0.01", {"optimizer": "sgd", "lr": 0.01}),
    ("normal_backprop=meprop", {"normal_backprop": "meprop"}),
]


def levers(seed: int, threads: int, only: list[str] | None, base: dict[str, Any]) -> None:
    print("| lever | acc before | acc after | drop | widths | epochs | s |")
    print("| --- | ---: | ---: | ---: | --- | ---: | ---: |")
    for name, change in LEVERS:
        if only and name not in only:
            continue
        r = run(seed, threads, **{**base, **change})
        w = "/".join(map(str, r["widths"].values()))
        print(f"| {name} | {r['before']:.2f} | {r['after']:.2f} | "
              f"{r['after'] - r['before']:+.2f} | "
              f"{w} | {r['epochs']} | {r['seconds']:.0f} |", flush=True)


def parse_overrides(extra: list[str]) -> dict[str, Any]:
    """``--key value`` pairs for CompressConfig (values parsed as int, float, bool or text)."""
    out: dict[str, Any] = {}
    it = iter(extra)
    for flag in it:
        if not flag.startswith("--"):
            raise SystemExit(f"unexpected argument {flag!r}")
        key = flag[2:].replace("-", "_")
        if key not in CompressConfig.keys():
            valid = ", ".join(CompressConfig.keys())
            raise SystemExit(f"unknown config key {key!r}; valid: {valid}")
        text = next(it, None)
        if text is None:
            raise SystemExit(f"{flag} needs a value")
        out[key] = _value(text)
    return out


def _value(text: str) -> Any:
    if text.lower() in ("true", "false"):
        return text.lower() == "true"
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0],
        epilog="Any CompressConfig key may follow as --key value (e.g. --epochs 1 "
        "--compensate mean); it overrides the library default for every run.",
    )
    parser.add_argument("--seeds", default="0", help="comma-separated seeds")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--levers", action="store_true", help="one change at a time (first seed)")
    parser.add_argument("--only", default="", help="with --levers: comma-separated lever names")
    parser.add_argument("--whole-windows", action="store_true",
                        help="cut the train set to whole 1/8-epoch windows (no 2-batch window)")
    args, extra = parser.parse_known_args()
    overrides = parse_overrides(extra)
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    torch.set_num_threads(args.threads)
    WHOLE_WINDOWS["on"] = args.whole_windows
    if args.levers:
        only = [s.strip() for s in args.only.split(",") if s.strip()] or None
        levers(seeds[0], args.threads, only, overrides)
        return
    print(f"config: {({**BEST, **overrides})}")
    print_runs([run(seed, args.threads, **overrides) for seed in seeds])


if __name__ == "__main__":
    sys.exit(main())
