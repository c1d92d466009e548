"""Distributed fine-tuning: torchrun workers, sharded batches, DDP rebuilt after each prune.

Run ``mesimp compress ... --nproc N`` (it re-launches itself under ``torch.distributed.run``)
or start the CLI under ``torchrun`` yourself (several nodes: ``--nnodes``/``--rdzv-endpoint``).
Each worker sees every ``world``-th batch of the training data (a global batch is ``world``
local batches), the activity counters and the compensation means are all-reduced before every
pruning decision so every rank makes the same plan and the same surgery, and only rank 0
writes files. Collectives time out after ``MESIMP_DIST_TIMEOUT`` seconds (default 600), so a
failed rank stops the others instead of hanging them; torchrun also stops the group.
"""

from __future__ import annotations

import datetime
import os
import sys
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .errors import ConfigError

TIMEOUT_ENV = "MESIMP_DIST_TIMEOUT"


@dataclass(frozen=True)
class World:
    """This process's place in the job: ``rank`` of ``size``; ``owned`` if we started the group."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0
    owned: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1


def setup(device: str) -> tuple[World, str]:
    """Join the torchrun job described by the environment (if any); return it and the device
    this rank uses (``cuda`` becomes ``cuda:LOCAL_RANK``)."""
    import torch.distributed as dist

    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size <= 1 and not (dist.is_available() and dist.is_initialized()):
        return World(), device
    if not dist.is_available():
        raise ConfigError("WORLD_SIZE > 1 but this torch build has no torch.distributed")
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    cuda = device.startswith("cuda")
    if cuda and device == "cuda":
        device = f"cuda:{local_rank}"
    owned = False
    if not dist.is_initialized():
        timeout = datetime.timedelta(seconds=float(os.environ.get(TIMEOUT_ENV, "600")))
        if cuda:
            torch.cuda.set_device(torch.device(device))
        dist.init_process_group(backend="nccl" if cuda else "gloo", timeout=timeout)
        owned = True
    return World(dist.get_rank(), dist.get_world_size(), local_rank, owned), device


def teardown(world: World, *, together: bool = False) -> None:
    """Leave the process group if :func:`setup` created it; a second call does nothing.

    ``together`` (the normal end of training) waits for every rank first, so no rank tears
    down while another still talks to it. A failing rank leaves at once, so the others'
    pending collectives fail fast instead of waiting for a barrier they never reach."""
    import torch.distributed as dist

    if world.owned and dist.is_initialized():
        if together:
            dist.barrier()
        dist.destroy_process_group()


class Shard:
    """Every ``size``-th batch of ``data`` starting at ``rank``; all ranks get the same count
    (the last ``len(data) % size`` batches are dropped)."""

    def __init__(self, data: Iterable[Any], rank: int, size: int) -> None:
        self.data, self.rank, self.size = data, rank, size

    def __len__(self) -> int:
        return _count(self.data) // self.size

    def __iter__(self) -> Iterator[Any]:
        limit = len(self) * self.size
        for i, batch in enumerate(self.data):
            if i >= limit:
                return
            if i % self.size == self.rank:
                yield batch


def _count(data: Iterable[Any]) -> int:
    try:
        return len(data)  # type: ignore[arg-type]
    except TypeError:
        return sum(1 for _ in data)


def wrap(model: nn.Module, world: World, device: torch.device) -> nn.Module:
    """``model`` itself, or a DistributedDataParallel around it (rebuilt after each surgery,
    since DDP sizes its gradient buckets at construction)."""
    if not world.distributed:
        return model
    from torch.nn.parallel import DistributedDataParallel

    ids = [device.index] if device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=ids)


def all_reduce_means(sums: Mapping[str, torch.Tensor], counts: dict[str, int]) -> None:
    """Sum activation-mean accumulators over ranks, in place (every rank holds the same keys)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or not sums:
        return
    keys = sorted(sums)
    device = torch.device("cpu")
    if dist.get_backend() == "nccl":
        device = torch.device("cuda", torch.cuda.current_device())
    flat = torch.cat(
        [sums[k].reshape(-1).to(torch.float64) for k in keys]
        + [torch.tensor([float(counts[k]) for k in keys], dtype=torch.float64)]
    )
    flat = flat.to(device)
    dist.all_reduce(flat)
    flat = flat.cpu()
    offset = 0
    for key in keys:
        n = sums[key].numel()
        sums[key].copy_(flat[offset : offset + n].reshape(sums[key].shape))  # type: ignore[index]
        offset += n
    for i, key in enumerate(keys):
        counts[key] = int(round(float(flat[offset + i])))


def launch_command(nproc: int, argv: Sequence[str]) -> list[str]:
    """The torchrun command that runs ``mesimp`` with ``argv`` on ``nproc`` local workers."""
    if nproc < 1:
        raise ConfigError(f"--nproc must be >= 1, got {nproc}")
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc-per-node",
        str(nproc),
        "--standalone",
        "-m",
        "mesimp_compress.cli",
        *argv,
    ]
