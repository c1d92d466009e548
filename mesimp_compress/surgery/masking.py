"""The masked twin of a plan: removed units zeroed where they are read, shapes unchanged.

``zero_removed(model, plan)`` zeroes, in every module that reads a removed unit, the
entries through which it reads it (a consumer's input columns; for an LSTM hidden unit also
its W_hh column and the next layer's W_ih columns). The masked model and the model rebuilt by
``apply_plan`` compute the same function: that is the function-preservation contract.
"""

from __future__ import annotations

import torch
from torch import nn

from ..plan import Plan
from .apply import _device, resolve


def zero_removed(model: nn.Module, plan: Plan) -> None:
    """Zero, in place, every weight entry through which a unit removed by ``plan`` is read."""
    targets = resolve(model, plan)
    with torch.no_grad():
        for target in targets.values():
            device = _device(target.module)
            for role, edit in target.edits.items():
                removed = torch.tensor(edit.removed, dtype=torch.long, device=device)
                for piece in target.pruner.reads(target.module, role, removed):
                    getattr(target.module, piece.tensor).index_fill_(piece.dim, piece.index, 0.0)
