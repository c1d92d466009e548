"""The optimizer carries on: per-parameter state is index-selected to the kept entries.

Surgery replaces ``.data`` of the very same Parameter objects, so ``param_groups`` stay
valid; only the state needs remapping. Every state tensor with the parameter's old shape
(Adam/AdamW moments, SGD momentum, Adagrad sums, ...) is sliced like the parameter; scalars
(``step``) are kept. State of any other shape cannot be remapped and is refused before
anything is changed.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch
from torch import nn

from ..errors import ConfigError


def check_optimizer_state(optimizer: torch.optim.Optimizer, params: Iterable[nn.Parameter]) -> None:
    """Raise ConfigError if the state of any of ``params`` cannot be remapped."""
    row_grad = getattr(optimizer, "row_grad", None)  # a row-sparse optimizer's pending rows
    for param in params:
        if row_grad is not None and row_grad(param) is not None:
            raise ConfigError(
                f"{type(optimizer).__name__} holds row gradients of a parameter of shape "
                f"{tuple(param.shape)} that surgery would re-index: call optimizer.step() or "
                "optimizer.zero_grad() before apply_plan"
            )
        state = optimizer.state.get(param)
        if not state:
            continue
        for name, value in state.items():
            if isinstance(value, torch.Tensor):
                if value.dim() == 0 or value.shape == param.shape:
                    continue
                found = tuple(value.shape)
            elif value is None or isinstance(value, (int, float, bool, str)):
                continue
            else:
                found = type(value).__name__
            raise ConfigError(
                f"{type(optimizer).__name__} state '{name}' of a parameter of shape "
                f"{tuple(param.shape)} is {found}: expected the parameter's shape or a scalar, "
                "so it cannot follow the surgery"
            )


def remap_optimizer_state(
    optimizer: torch.optim.Optimizer,
    param: nn.Parameter,
    old_shape: torch.Size,
    index: Mapping[int, torch.Tensor],
) -> None:
    """Slice the state of ``param`` (shape ``old_shape`` before surgery) to ``index`` per dim."""
    state = optimizer.state.get(param)
    if not state:
        return
    for name, value in list(state.items()):
        if isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape == old_shape:
            state[name] = select(value, index)


def select(tensor: torch.Tensor, index: Mapping[int, torch.Tensor]) -> torch.Tensor:
    """``tensor`` restricted to ``index[dim]`` along each given dim."""
    out = tensor
    for dim in sorted(index):
        out = out.index_select(dim, index[dim].to(out.device))
    return out.contiguous()
