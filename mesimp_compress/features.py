"""Layer distillation (beyond the paper): match chosen layers' outputs to the original's.

Distilling only the final output gives a pruned model one target per example. Layers whose
output keeps its width through the pruning (a transformer block, the layer that reads a
pruned FFN, a residual stream) can also be matched to the same layer of the original
model: many targets per example, and each block learns to reproduce its own output, which
makes recovery after a prune faster. The loss per layer is the relative squared error
``||s - t||² / ||t||²`` over the batch; the layers' losses are averaged.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from .errors import ConfigError


def matched_layers(model: nn.Module, patterns: Sequence[str]) -> list[str]:
    """Names of the modules of ``model`` matching any of ``patterns`` (fnmatch), in order.

    Raises ConfigError when a pattern matches nothing."""
    names = [name for name, _ in model.named_modules() if name]
    chosen: list[str] = []
    for pattern in patterns:
        hits = [n for n in names if fnmatch.fnmatchcase(n, pattern)]
        if not hits:
            raise ConfigError(f"distill_layers: no module matches {pattern!r}")
        chosen += [n for n in hits if n not in chosen]
    return chosen


@contextmanager
def captured(model: nn.Module | None,
             names: Sequence[str]) -> Iterator[dict[str, torch.Tensor]]:
    """Within the block, the outputs of the modules ``names`` of ``model`` by name (the
    first tensor of a tuple output), from its last forward pass. No names: nothing hooked."""
    outputs: dict[str, torch.Tensor] = {}
    if model is None or not names:
        yield outputs
        return
    modules = dict(model.named_modules())

    def hook(name: str):
        def keep(module: nn.Module, args: tuple, output: object) -> None:
            if isinstance(output, (tuple, list)) and output:
                output = output[0]
            if isinstance(output, torch.Tensor):
                outputs[name] = output

        return keep

    handles = [modules[name].register_forward_hook(hook(name)) for name in names]
    try:
        yield outputs
    finally:
        for handle in handles:
            handle.remove()


def layer_loss(student: dict[str, torch.Tensor], teacher: dict[str, torch.Tensor],
               names: Sequence[str]) -> torch.Tensor:
    """Mean over ``names`` of ``||s - t||² / ||t||²``; ConfigError when a layer did not run
    or its output no longer has the original's shape (its own units were pruned)."""
    losses = []
    for name in names:
        if name not in student or name not in teacher:
            raise ConfigError(f"distill_layers: '{name}' gave no tensor output in this step")
        s, t = student[name], teacher[name].detach()
        if s.shape != t.shape:
            raise ConfigError(
                f"distill_layers: '{name}' outputs {tuple(s.shape)}, the original "
                f"{tuple(t.shape)}; match layers whose output keeps its width"
            )
        t = t.to(s.dtype)
        losses.append((s - t).pow(2).sum() / t.pow(2).sum().clamp(min=1e-12))
    return torch.stack(losses).mean()


def check_kept_widths(model: nn.Module, shrunk: nn.Module, inputs: tuple[Any, ...],
                      names: Sequence[str]) -> None:
    """ConfigError naming the first of ``names`` whose output ``shrunk`` (``model`` with a
    unit less in every prunable layer) gives in another shape: a layer after a pruned one
    (its activation, dropout) loses units too, found before training, not at the first
    prune (whose checkpoint could not be resumed with other settings)."""
    shapes = []
    for net in (model, shrunk):
        with torch.no_grad(), captured(net, names) as outputs:
            net(*inputs)
        shapes.append({name: tuple(out.shape) for name, out in outputs.items()})
    for name in names:
        before, after = shapes[0].get(name), shapes[1].get(name)
        if before != after:
            raise ConfigError(
                f"distill_layers: '{name}' loses units with the layers before it (its output "
                f"{before} becomes {after} when they shrink); match layers whose output "
                "keeps its width"
            )
