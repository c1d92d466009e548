"""Example inputs of a model: a tuple of tensors, their dynamic axes, and resizing them.

A model is called as ``model(*inputs)``. Each input's dynamic axes are a map ``{dim: name}``;
the names ``"batch"`` and ``"seq"`` are shared across inputs, so token ids and their attention
mask get one batch and one sequence axis. By default dim 0 of every input is the batch and
dim 1 of a 2-D integer input (token ids, masks) the sequence; with ``batch_dim=1`` (time-major
inputs) dim 1 is the batch, dim 0 of 2-D token ids the sequence, and a 1-D input (lengths)
keeps its batch at dim 0. Inputs for another batch size or
sequence length are made by repeating or slicing the given ones, so integer ids stay valid.
"""

from __future__ import annotations

import inspect
import math
import os
from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from .errors import ConfigError, ShapeError

BATCH = "batch"
SEQ = "seq"

Axes = Mapping[int, str]


def as_inputs(inputs: Any) -> tuple[torch.Tensor, ...]:
    """``inputs`` as a non-empty tuple of tensors; ShapeError otherwise."""
    if isinstance(inputs, torch.Tensor):
        inputs = (inputs,)
    if not isinstance(inputs, (tuple, list)) or not inputs:
        raise ShapeError(
            f"example inputs must be a tensor or a tuple of tensors, got {inputs!r:.80}"
        )
    bad = [i for i, x in enumerate(inputs) if not isinstance(x, torch.Tensor)]
    if bad:
        raise ShapeError(
            f"example input {bad[0]} is a {type(inputs[bad[0]]).__name__}, not a tensor: an "
            "ONNX file takes tensors only (leave an optional argument out of the batch, so "
            "forward uses its default, or pass a tensor)"
        )
    return tuple(inputs)


def on_device_of(model: nn.Module, inputs: Sequence[torch.Tensor]) -> tuple[torch.Tensor, ...]:
    """``inputs`` moved to the device of the model's first parameter (if it has one)."""
    device = next((p.device for p in model.parameters()), None)
    if device is None:
        return tuple(inputs)
    return tuple(x.to(device) for x in inputs)


def batch_axis(x: torch.Tensor, batch_dim: int = 0) -> int:
    """The dim of input ``x`` that indexes examples: ``batch_dim``, or 0 for a 1-D input."""
    return batch_dim if x.dim() > batch_dim else 0


def default_dynamic_axes(
    inputs: Sequence[torch.Tensor], batch_dim: int = 0, *, whole: bool = True
) -> list[dict[int, str]]:
    """Dim ``batch_dim`` of every input is the batch (dim 0 of a 1-D one); the other dim of a
    2-D integer input is the sequence, and so is that of a 2-D bool input as long as such
    token ids (its padding mask). With ``whole``, an input whose batch dim differs from the
    size most inputs share there (the first input's on a tie) has none: it is given whole
    with every batch (a per-class bias, a graph's edge list)."""
    def ids(x: Any) -> bool:
        return (isinstance(x, torch.Tensor) and x.dim() == 2
                and not x.dtype.is_floating_point and x.dtype != torch.bool)

    seq_dim = 1 - batch_dim
    lengths = {x.shape[seq_dim] for x in inputs if ids(x)}
    axes = []
    for x in inputs:
        if not isinstance(x, torch.Tensor):  # None, a number: no axes (export names it)
            axes.append({})
            continue
        entry: dict[int, str] = {batch_axis(x, batch_dim): BATCH} if x.dim() >= 1 else {}
        if ids(x) or (x.dim() == 2 and x.dtype == torch.bool and x.shape[seq_dim] in lengths):
            entry[seq_dim] = SEQ
        axes.append(entry)
    batched = [(x, a) for x, a in zip(inputs, axes, strict=True) if BATCH in a.values()]
    if whole and batched:
        counts = Counter(_size_of(x, a, BATCH) for x, a in batched)
        top = max(counts.values())
        common = next(n for n in (_size_of(x, a, BATCH) for x, a in batched) if counts[n] == top)
        for x, a in batched:
            if _size_of(x, a, BATCH) != common:
                del a[next(d for d, name in a.items() if name == BATCH)]
    return axes


def _size_of(x: torch.Tensor, axes: Axes, name: str) -> int:
    return int(x.shape[next(d for d, n in axes.items() if n == name)])


def observed_axes(
    example: Sequence[torch.Tensor], others: Sequence[Sequence[Any]], batch_dim: int = 0
) -> list[dict[int, str]] | None:
    """The default dynamic axes of ``example``, plus every other axis whose size differs in
    ``others`` (the inputs of other batches): the length of float sequences padded per batch
    (audio, time series, features before an LSTM), an image size that varies. The sequence
    dim (1; 0 of time-major inputs) becomes the shared ``"seq"`` axis where its size equals
    the token ids' in every batch; any other such axis gets a name of its own. None when
    nothing varies beyond the defaults of batch-first inputs."""
    axes = default_dynamic_axes(example, batch_dim, whole=False)
    batches = [example, *(o for o in others if len(o) == len(example))]

    def sizes(i: int, d: int) -> list[int | None]:
        return [b[i].shape[d] if isinstance(b[i], torch.Tensor) and b[i].dim() == example[i].dim()
                else None for b in batches]

    seq_dim = 1 - batch_dim
    seq = [i for i, a in enumerate(axes) if a.get(seq_dim) == SEQ]
    added = batch_dim != 0
    # an input given whole with every batch has no batch axis (resizing it with the batch
    # broke the export): where the batch size varies, it is the input whose size stays; else
    # the one whose size differs from what most inputs share
    batched = [(i, d) for i, a in enumerate(axes) for d, name in a.items() if name == BATCH]
    varying = [(i, d) for i, d in batched if len(set(sizes(i, d))) > 1]
    reference = sizes(*varying[0]) if varying else None
    pruned = default_dynamic_axes(example, batch_dim)
    for i, d in batched:
        if (sizes(i, d) != reference) if reference is not None else d not in pruned[i]:
            del axes[i][d]
            added = True
    for i, x in enumerate(example):
        if not isinstance(x, torch.Tensor):
            continue
        for d in range(x.dim()):
            mine = sizes(i, d)
            if d in axes[i] or len({n for n in mine if n is not None}) < 2:
                continue
            shared = d == seq_dim and all(sizes(j, seq_dim) == mine for j in seq)
            axes[i][d] = SEQ if shared else f"input{i}_dim{d}"
            if shared:
                seq.append(i)
            added = True
    return axes if added else None


def resize_inputs(
    inputs: Sequence[torch.Tensor],
    batch: int,
    *,
    seq: int | None = None,
    axes: Sequence[Axes] | None = None,
) -> tuple[torch.Tensor, ...]:
    """The inputs with every ``"batch"`` axis resized to ``batch`` (and every ``"seq"`` axis to
    ``seq``) by repeating or slicing the given rows, so integer ids stay valid."""
    inputs = as_inputs(inputs)
    axes = list(axes) if axes is not None else default_dynamic_axes(inputs)
    if len(axes) != len(inputs):
        raise ConfigError(f"dynamic axes given for {len(axes)} inputs, but there are {len(inputs)}")
    sizes = {BATCH: batch, SEQ: seq}
    _check_room(inputs, axes, sizes)
    out = []
    for x, entry in zip(inputs, axes, strict=True):
        for dim, name in entry.items():
            size = sizes.get(name)
            if size is not None:
                x = _resize_dim(x, dim, size)
        out.append(x.contiguous())
    return tuple(out)


def check_room(inputs: Any, axes: Sequence[Axes] | None, batch: int | None,
               seq: int | None = None) -> None:
    """The memory check of :func:`resize_inputs` alone: a size that cannot be timed is
    refused before any fine-tuning, not after it."""
    inputs = as_inputs(inputs)
    axes = list(axes) if axes is not None else default_dynamic_axes(inputs)
    if len(axes) == len(inputs):
        _check_room(inputs, axes, {BATCH: batch, SEQ: seq})


def _check_room(inputs: Sequence[Any], axes: Sequence[Axes], sizes: dict[str, int | None]) -> None:
    """ConfigError when the resized inputs alone would take over a quarter of the memory
    available now (a model's activations take several times more): an absurd --batch was
    killed by the kernel instead."""
    need = 0
    for x, entry in zip(inputs, axes, strict=True):
        if isinstance(x, torch.Tensor):
            shape = [sizes.get(entry.get(d, ""), None) or n for d, n in enumerate(x.shape)]
            need += math.prod(shape) * x.element_size()
    check_bytes(need, ", ".join(f"{name} {size}" for name, size in sizes.items()
                                if size is not None))


def check_bytes(need: int, told: str) -> None:
    """ConfigError when inputs of ``need`` bytes (described by ``told``: "batch 64") would
    take over a quarter of the memory available now."""
    free = _available_memory()
    if free is None:  # not known on this platform: nothing to check
        return
    if need > free / 4:
        raise ConfigError(
            f"inputs at {told} would take {need / 2**30:.1f} GiB, too much for the "
            f"{free / 2**30:.1f} GiB of memory free here: choose a smaller size"
        )


def _available_memory() -> int | None:
    """Bytes of memory available for new allocations (Linux's MemAvailable, which counts the
    page cache it can drop; else the free pages), None where neither is known."""
    try:
        with open("/proc/meminfo", encoding="ascii") as info:
            for line in info:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, ValueError, OSError):
        return None


def _resize_dim(x: torch.Tensor, dim: int, size: int) -> torch.Tensor:
    if size < 1:
        raise ConfigError(f"a batch or sequence size must be >= 1, got {size}")
    have = x.shape[dim]
    if have == 0:
        raise ShapeError(f"cannot resize an empty axis {dim} of an input of shape {tuple(x.shape)}")
    if size > have:
        reps = [1] * x.dim()
        reps[dim] = -(-size // have)
        x = x.repeat(*reps)
    return x.narrow(dim, 0, size)


def forward_order(model: Any) -> list[str]:
    """The names of ``model.forward``'s positional parameters, in order ([] where the
    signature does not say)."""
    try:
        params = inspect.signature(model.forward).parameters.values()
    except (TypeError, ValueError, AttributeError):
        return []
    return [p.name for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]


def input_names_of(model: nn.Module, count: int) -> list[str]:
    """Names of the first ``count`` positional parameters of ``model.forward`` (``input_i``
    where the signature does not say)."""
    params = forward_order(model)
    names = params[:count] if len(params) >= count else []
    return names or [f"input_{i}" for i in range(count)]


__all__ = [
    "BATCH",
    "SEQ",
    "Axes",
    "as_inputs",
    "default_dynamic_axes",
    "input_names_of",
    "on_device_of",
    "resize_inputs",
]
