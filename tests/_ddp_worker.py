"""Run under torchrun by test_distributed.py: compress a small model, save plan and weights.

    python -m torch.distributed.run --nproc-per-node 2 tests/_ddp_worker.py KIND OUT BATCH
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import mesimp_compress as mc


class Tagger(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(30, 12)
        self.lstm = nn.LSTM(12, 40, batch_first=True, bidirectional=True)
        self.head = nn.Linear(80, 4)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(self.lstm(self.embed(tokens))[0])


def build(kind: str) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    if kind == "mlp":
        model = nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(),
                              nn.Linear(64, 3))
        x = torch.randn(512, 16, generator=g)
        y = (x[:, :4].sum(1) > 0).long() + (x[:, 4] > 0.5).long()
    else:
        model = Tagger()
        x = torch.randint(0, 30, (256, 10), generator=g)
        y = x % 4
    return model, x, y


def main() -> None:
    kind, out, batch = sys.argv[1], Path(sys.argv[2]), int(sys.argv[3])
    step = sys.argv[4] if len(sys.argv) > 4 else "whole"  # or "stop" then "resume"
    model, x, y = build(kind)
    n = len(x) * 3 // 4
    train = DataLoader(TensorDataset(x[:n], y[:n]), batch_size=batch, shuffle=False)
    evaluation = DataLoader(TensorDataset(x[n:], y[n:]), batch_size=64)
    cfg = mc.CompressConfig(k=10, epochs=1, cycles=1, recovery_epochs=1, window=0.25, lr=1e-3,
                            distill=0.0, threads=1, compensate=True)  # means all-reduced too
    if step == "stop":  # every rank stops after window 1 was checkpointed, as Ctrl-C would

        def stop(event: mc.Event) -> None:
            if event.kind == "window" and event.data["window"] == 2:
                raise KeyboardInterrupt

        try:
            mc.compress(model, train, evaluation, config=cfg, checkpoint_dir=out / "ckpt",
                        sink=stop)
        except KeyboardInterrupt:
            _check_left_clean()
            return
        raise SystemExit("the run was not interrupted")
    result = mc.compress(model, train, evaluation, config=cfg, checkpoint_dir=out / "ckpt",
                         resume=step == "resume")
    rank = int(__import__("os").environ.get("RANK", "0"))
    out.mkdir(parents=True, exist_ok=True)
    torch.save({"kept": result.plan.kept, "widths": result.widths,
                "state": result.model.state_dict(), "metric": result.metric_after},
               out / f"rank{rank}.pt")


def _check_left_clean() -> None:
    """A run that failed left the process group, and dropped its DDP wrapper first (a
    wrapper freed late may tear down gloo's threads at exit and abort the process)."""
    import gc

    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    if dist.is_initialized():
        raise SystemExit("the failed run did not leave the process group")
    gc.collect()
    if any(isinstance(o, DistributedDataParallel) for o in gc.get_objects()):
        raise SystemExit("a DDP wrapper outlived the failed run")


if __name__ == "__main__":
    main()
