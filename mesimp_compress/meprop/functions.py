"""Top-k selection of units from output gradients, shared by every meProp layer kind."""

from __future__ import annotations

from collections.abc import Callable

import torch

from . import rowgrad
from .settings import MePropSettings

_SYNC: dict[str, object] = {"on": False, "group": None}


def sync_selection(on: bool, group: object = None) -> None:
    """Under data parallelism, make unified top-k pick the units of the *global* batch: the
    per-unit scores are summed over the ranks of ``group`` before the top-k, so every rank
    selects the same k units, exactly as one process with the whole batch would. It costs one
    all-reduce of ``width`` floats per layer per backward (per time step for an LSTM). Every
    rank must then run the same backward passes in the same order (as under DDP)."""
    _SYNC["on"], _SYNC["group"] = bool(on), group


def selection_synced() -> bool:
    """Whether :func:`sync_selection` is on."""
    return bool(_SYNC["on"])


def unified_units(score: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the k largest entries of ``score`` (one per unit), unsorted."""
    if _SYNC["on"]:
        import torch.distributed as dist

        if dist.is_initialized():
            score = score.contiguous()
            dist.all_reduce(score, group=_SYNC["group"])
    return score.topk(k, sorted=False).indices


def per_example_units(
    score: torch.Tensor, k: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Each example's own top-k of ``score`` (examples x units).

    Returns ``(mask, counts, units)``: the 0/1 mask (same dtype as ``score``), how many
    examples selected each unit (int64), and the units selected by any example (sorted).
    """
    picks = score.topk(k, dim=1, sorted=False).indices
    mask = torch.zeros_like(score).scatter_(1, picks, 1.0)
    counts = torch.zeros(score.shape[1], dtype=torch.int64, device=score.device)
    counts.index_add_(0, picks.reshape(-1), torch.ones_like(picks).reshape(-1))
    units = counts.nonzero().squeeze(1)
    return mask, counts, units


def empty_batch_grads(ctx, x: torch.Tensor) -> tuple:
    """Gradients of a meProp layer for a batch without examples: zeros, as plain autograd
    gives (a row-sparse optimizer gets no rows); nothing is recorded."""
    needs = ctx.needs_input_grad
    weight_param, bias_param = ctx.params
    grad_x = torch.zeros_like(x) if needs[0] else None
    grad_w = rowgrad.no_rows(weight_param, ctx) if needs[1] else None
    grad_b = torch.zeros_like(bias_param) if needs[2] else None
    return grad_x, grad_w, grad_b


def record_hook(settings: MePropSettings, key: str, examples: int, width: int) -> Callable:
    """A gradient hook that records 'every unit selected by every example' once per backward."""
    tracker = settings.tracker

    def record() -> None:
        if examples:  # an empty batch records nothing, as meProp's own backward
            tracker.record_selected(key, None, examples, width)

    return once_per_backward(record)


def once_per_backward(record: Callable[[], None]) -> Callable[[torch.Tensor], None]:
    """A gradient hook that calls ``record`` once per backward pass, however many of the
    tensors it is registered on get a gradient in that pass (a graph kept with
    ``retain_graph`` and run twice records twice, as meProp's own backward does)."""
    seen = [None]

    def hook(grad: torch.Tensor) -> None:
        task = torch._C._current_graph_task_id()
        if task != seen[0]:
            seen[0] = task
            record()

    return hook
