"""meSimp against the peer: Torch-Pruning's L2 magnitude pruning at the same widths and budget.

For each seed: compress the Animal-MNIST MLP baseline with meSimp (``bench_mlp_exit.run``,
the bench's recommended config unless overridden), then prune a fresh copy of the same
baseline to exactly the widths meSimp reached with Torch-Pruning's dependency graph and
``MagnitudeImportance(p=2)`` (scored over the whole group: a unit's output row, its bias and
the next layer's input column), and fine-tune it with the same budget: as many epochs as
the meSimp run had in all, the same optimizer, learning rate, batch size and data order,
dense backprop and cross-entropy; with ``--peer-distill`` also the same distillation from
the original.
Prints both eval accuracies side by side.

    .venv/bin/python bench/bench_peer.py [--seeds 0,1,2] [--threads 1] [--peer-distill]
        [--whole-windows] [--KEY VALUE ...]

If Torch-Pruning is missing or its pruner fails or misses the widths, the hidden layers are
pruned by the L2 norm of their output rows with our own plan/surgery API instead (said in
the output).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_mlp_exit import (  # noqa: E402
    BEST,
    WHOLE_WINDOWS,
    data,
    load_baseline,
    mean_sd,
    parse_overrides,
    run,
)

from mesimp_compress import tasks  # noqa: E402
from mesimp_compress.config import CompressConfig  # noqa: E402
from mesimp_compress.training import evaluate  # noqa: E402


def prune_torch_pruning(model: nn.Sequential, widths: list[int]) -> nn.Sequential:
    """Prune the hidden Linear layers to exactly ``widths`` with Torch-Pruning: its dependency
    graph and ``MagnitudeImportance(p=2)`` over each unit's group (MetaPruner's ratios can miss
    a width by one through float rounding, so the counts are chosen here)."""
    import torch_pruning as tp

    linears = [m for m in model if isinstance(m, nn.Linear)]
    example = torch.zeros(2, linears[0].in_features)
    graph = tp.DependencyGraph().build_dependency(model, example_inputs=example)
    importance = tp.importance.MagnitudeImportance(p=2)
    for layer, width in zip(linears[:-1], widths, strict=False):
        every = list(range(layer.out_features))
        scores = importance(graph.get_pruning_group(layer, tp.prune_linear_out_channels, every))
        remove = torch.argsort(scores)[: layer.out_features - width].tolist()
        if remove:
            graph.get_pruning_group(layer, tp.prune_linear_out_channels, remove).prune()
    got = [m.out_features for m in model if isinstance(m, nn.Linear)][:-1]
    if got != widths:
        raise RuntimeError(f"Torch-Pruning reached widths {got}, not {widths}")
    return model


def prune_own(model: nn.Sequential, widths: list[int]) -> nn.Sequential:
    """Fallback: keep the rows of largest L2 norm with our plan/surgery API."""
    from mesimp_compress.graph import find_groups
    from mesimp_compress.plan import make_plan
    from mesimp_compress.surgery import apply_plan

    structure = find_groups(model, (torch.zeros(2, 784),))
    modules = dict(model.named_modules())
    kept = {}
    for key, width in zip(sorted(structure.groups), widths, strict=False):
        norms = modules[structure.groups[key].module].weight.detach().norm(dim=1)
        kept[key] = sorted(torch.topk(norms, width).indices.tolist())
    apply_plan(model, make_plan(structure, kept))
    return model


def prune_peer(seed: int, widths: list[int]) -> tuple[nn.Sequential, str]:
    """The seed's baseline pruned to ``widths``: Torch-Pruning when it works, else our L2 rows."""
    try:
        return prune_torch_pruning(load_baseline(seed), widths), "Torch-Pruning"
    except Exception as exc:  # noqa: BLE001 - any failure of the peer means the fallback
        print(f"Torch-Pruning failed ({type(exc).__name__}: {exc}); using our own L2 row pruning")
        return prune_own(load_baseline(seed), widths), "own L2 rows"


def fine_tune(model: nn.Module, teacher: nn.Module | None, cfg: CompressConfig, epochs: int,
              seed: int) -> float:
    """Dense fine-tuning with the meSimp run's optimizer, lr, batch and data order; returns
    the eval accuracy (%)."""
    torch.manual_seed(seed)
    train, evaluation = data(seed)
    params = list(model.parameters())
    if cfg.optimizer == "sgd":
        optimizer = torch.optim.SGD(params, lr=cfg.lr, momentum=0.9, weight_decay=cfg.weight_decay)
    elif cfg.optimizer == "adamw":
        optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    else:
        optimizer = torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    for _ in range(epochs):
        model.train()
        for x, y in train:
            out = model(x)
            loss = tasks.cross_entropy(out, y)
            if teacher is not None:
                with torch.no_grad():
                    reference = teacher(x)
                loss = loss + cfg.distill * tasks.distillation(out, reference, y, cfg.temperature)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    return 100 * evaluate(model, evaluation, tasks.accuracy, torch.device("cpu"))


def compare(seed: int, threads: int, peer_distill: bool,
            overrides: dict[str, Any]) -> dict[str, Any]:
    """meSimp on the seed's baseline, then the peer at the same widths and budget."""
    ours = run(seed, threads, **overrides)
    cfg = CompressConfig(**{**BEST, **overrides})
    widths = list(ours["widths"].values())
    start = time.perf_counter()
    model, how = prune_peer(seed, widths)
    pruned = 100 * evaluate(model, data(seed)[1], tasks.accuracy,
                            torch.device("cpu"))
    teacher = load_baseline(seed).eval() if peer_distill and cfg.distill > 0 else None
    peer = fine_tune(model, teacher, cfg, ours["epochs"], seed)
    return {**ours, "peer": peer, "peer_pruned": pruned, "peer_how": how,
            "peer_seconds": time.perf_counter() - start}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0],
        epilog="Any CompressConfig key may follow as --key value (e.g. --epochs 1 "
        "--compensate mean); it overrides the library default for every run.",
    )
    parser.add_argument("--seeds", default="0,1,2", help="comma-separated seeds")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--peer-distill", action="store_true",
                        help="fine-tune the peer with the same distillation as meSimp")
    parser.add_argument("--whole-windows", action="store_true",
                        help="cut the train set to whole 1/8-epoch windows (both methods)")
    args, extra = parser.parse_known_args()
    overrides = parse_overrides(extra)
    torch.set_num_threads(args.threads)
    WHOLE_WINDOWS["on"] = args.whole_windows
    print(f"config: {({**BEST, **overrides})}; peer loss: cross-entropy"
          f"{' + the same distillation' if args.peer_distill else ''}")
    print("| seed | widths | baseline | meSimp | peer pruned (no fine-tuning) | peer fine-tuned "
          "| meSimp - peer | epochs | peer pruner |")
    print("| ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |")
    rows = []
    for seed in (int(s) for s in args.seeds.split(",") if s.strip()):
        r = compare(seed, args.threads, args.peer_distill, overrides)
        rows.append(r)
        print(f"| {seed} | {'/'.join(map(str, r['widths'].values()))} | {r['before']:.2f} | "
              f"{r['after']:.2f} | {r['peer_pruned']:.2f} | {r['peer']:.2f} | "
              f"{r['after'] - r['peer']:+.2f} | {r['epochs']} | {r['peer_how']} |", flush=True)
    if len(rows) > 1:
        print(f"| mean ± sd | | {mean_sd([r['before'] for r in rows])} | "
              f"{mean_sd([r['after'] for r in rows])} | "
              f"{mean_sd([r['peer_pruned'] for r in rows])} | "
              f"{mean_sd([r['peer'] for r in rows])} | "
              f"{mean_sd([r['after'] - r['peer'] for r in rows])} | | |")
        wins = sum(r["after"] > r["peer"] for r in rows)
        print(f"\nmeSimp ahead in {wins} of {len(rows)} seeds; mean difference "
              f"{statistics.mean(r['after'] - r['peer'] for r in rows):+.2f} points")


if __name__ == "__main__":
    sys.exit(main())
