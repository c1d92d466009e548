"""CUDA check for a machine with a GPU (not run by the test suite: CI has no GPU).

    .venv/bin/python bench/cuda_check.py

Compresses a small MLP and a BiLSTM tagger (the models of tests/_ddp_worker.py) once on the
CPU and once with ``device="cuda"``, and prints, per model, the widths, the metric and the
largest weight difference; exits non-zero when a plan's widths differ by more than one unit
or the GPU run fails. Then the meProp layers alone: gradients on CUDA against CPU.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from _ddp_worker import build  # noqa: E402

import mesimp_compress as mc  # noqa: E402
from mesimp_compress.meprop import MePropLinear, MePropLSTM  # noqa: E402


def compress(kind: str, device: str) -> mc.CompressResult:
    model, x, y = build(kind)
    n = len(x) * 3 // 4
    train = DataLoader(TensorDataset(x[:n], y[:n]), batch_size=32)
    evaluation = DataLoader(TensorDataset(x[n:], y[n:]), batch_size=64)
    cfg = mc.CompressConfig(k=10, epochs=1, cycles=1, recovery_epochs=1, window=0.25,
                            distill=0.5, compensate=True, device=device)
    return mc.compress(model, train, evaluation, config=cfg)


def meprop_grads(device: str) -> list[torch.Tensor]:
    torch.manual_seed(0)
    layer = torch.nn.Linear(64, 128).to(device)
    lstm = torch.nn.LSTM(16, 32, bidirectional=True, batch_first=True).to(device)
    MePropLinear.wrap(layer, 8)
    MePropLSTM.wrap(lstm, 4)
    x = torch.randn(8, 64, device=device)
    s = torch.randn(4, 7, 16, device=device)
    (layer(x).pow(2).sum() + lstm(s)[0].pow(2).sum()).backward()
    return [p.grad.cpu() for p in (*layer.parameters(), *lstm.parameters())]


def main() -> int:
    if not torch.cuda.is_available():
        print("no CUDA device: nothing to check")
        return 2
    failed = False
    for kind in ("mlp", "lstm"):
        cpu, gpu = compress(kind, "cpu"), compress(kind, "cuda")
        diff = max((a.cpu() - b.cpu()).abs().max().item()
                   for a, b in zip(cpu.model.state_dict().values(),
                                   gpu.model.state_dict().values(), strict=True)
                   if a.shape == b.shape)
        close = all(abs(cpu.widths[k] - gpu.widths[k]) <= 1 for k in cpu.widths)
        failed |= not close
        print(f"{kind}: widths cpu {cpu.widths} cuda {gpu.widths}; metric cpu "
              f"{cpu.metric_after:.4f} cuda {gpu.metric_after:.4f}; max weight diff {diff:.3g}")
    grads = zip(meprop_grads("cpu"), meprop_grads("cuda"), strict=True)
    worst = max((a - b).abs().max().item() for a, b in grads)
    failed |= worst > 1e-4
    print(f"meProp Linear + BiLSTM gradients, CUDA vs CPU: max abs diff {worst:.3g}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
