"""Slicing and indexing: a fixed part of the units is refused; whole or other-axis slices pass."""

from __future__ import annotations

import copy
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mesimp_compress.graph import find_groups
from mesimp_compress.plan import make_plan
from mesimp_compress.surgery import apply_plan, zero_removed

torch.set_num_threads(1)

Op = Callable[[torch.Tensor], torch.Tensor]


class Sliced(nn.Module):
    """``out(op(relu(fc(x))))``: fc has 6 units; with ``positions`` x gets a length-4 axis."""

    def __init__(self, op: Op, out_in: int, positions: bool = False) -> None:
        super().__init__()
        self.fc = nn.Linear(3, 6)
        self.out = nn.Linear(out_in, 2)
        self.op = op
        self.positions = positions

    def forward(self, x):
        if self.positions:
            x = x.unsqueeze(1).expand(-1, 4, -1)
        return self.out(self.op(F.relu(self.fc(x))))


class SliceThenLinear(nn.Module):
    """``relu(fc(x))[:, 3:13] -> fc2``: fc2 reads 10 of fc's 16 units."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(6, 16)
        self.fc2 = nn.Linear(10, 10)
        self.out = nn.Linear(10, 3)

    def forward(self, x):
        return self.out(F.relu(self.fc2(F.relu(self.fc(x))[:, 3:13])))


def test_a_slice_dropping_the_first_unit_leaves_the_layer_alone() -> None:
    structure = find_groups(Sliced(lambda h: h[:, 1:], 5), torch.randn(4, 3))
    assert structure.groups == {}
    reason = structure.reason("fc")
    assert reason is not None and "op 'getitem' takes a fixed slice" in reason


def test_a_middle_slice_leaves_the_producer_alone_and_the_reader_prunable() -> None:
    structure = find_groups(SliceThenLinear(), torch.randn(4, 6))
    assert set(structure.groups) == {"fc2"}
    assert "op 'getitem' takes a fixed slice" in structure.reason("fc")
    fc2 = structure.groups["fc2"]
    assert fc2.width == 10
    assert {(m.module, m.role, m.size) for m in fc2.members} == {
        ("fc2", "out", 10),
        ("out", "in", 10),
    }


@pytest.mark.parametrize(
    ("op", "out_in", "positions", "name"),
    [
        (lambda h: h[:, :-1], 5, False, "getitem"),
        (lambda h: h[..., :4], 4, False, "getitem"),
        (lambda h: h[:, ::2], 3, False, "getitem"),
        (lambda h: h[:, None, -5:][:, 0], 5, False, "getitem"),
        (lambda h: h[:, :, 1:].mean(1), 5, True, "getitem"),
        (lambda h: h[:, torch.tensor([5, 4, 3, 2, 1, 0])], 6, False, "getitem"),
        (lambda h: h.narrow(-1, 1, 4), 4, False, "narrow"),
        (lambda h: h.index_select(1, torch.tensor([0, 2, 4])), 3, False, "index_select"),
        (lambda h: h.split([2, 4], dim=1)[1], 4, False, "split"),
        (lambda h: torch.cat(h.chunk(2, dim=1)[::-1], dim=1), 6, False, "chunk"),
        (lambda h: torch.stack(h.unbind(1), dim=1), 6, False, "unbind"),
        (lambda h: torch.cat([h, h + 1.0], dim=1)[:, :6], 6, False, "getitem"),
        (lambda h: h.view(-1, 2, 3)[:, 0], 3, False, "getitem"),
        (lambda h: h.roll(1, dims=1), 6, False, "roll"),
    ],
    ids=[
        "stop-1", "ellipsis", "step", "newaxis-negative", "positions-then-units", "index",
        "narrow", "index_select", "split", "chunk", "unbind", "cat-then-slice", "one-head",
        "roll",
    ],
)  # fmt: skip
def test_fixed_parts_of_the_units_are_refused(
    op: Op, out_in: int, positions: bool, name: str
) -> None:
    structure = find_groups(Sliced(op, out_in, positions), torch.randn(4, 3))
    assert "fc" not in structure.groups
    reason = structure.reason("fc")
    assert reason is not None and f"op '{name}' takes a fixed slice, index" in reason


@pytest.mark.parametrize(
    ("op", "positions", "flipped"),
    [
        (lambda h: h[:, :], False, False),
        (lambda h: h[:, 0:6], False, False),
        (lambda h: h[:, ::1], False, False),
        (lambda h: h[..., -6:100], False, False),
        (lambda h: h[None, :, None][0, ..., 0, :], False, False),
        (lambda h: h[1:], False, False),
        (lambda h: h[::2], False, False),
        (lambda h: h[:, -1], True, False),
        (lambda h: h[..., 1:, :].mean(1), True, False),
        (lambda h: h.narrow(1, 0, 2).sum(1), True, False),
        (lambda h: sum(h.chunk(2, dim=1)).sum(1), True, False),
        (lambda h: h.flip(1), False, True),
    ],
    ids=[
        "all", "zero-to-width", "step-1", "clamped", "newaxis", "batch", "batch-step",
        "last-position", "positions", "narrow-positions", "chunk-positions", "flip-units",
    ],
)  # fmt: skip
def test_whole_width_and_other_axis_slices_are_followed(
    op: Op, positions: bool, flipped: bool
) -> None:
    torch.manual_seed(0)
    model = Sliced(op, 6, positions).eval()
    x = torch.randn(4, 3)
    structure = find_groups(model, x)
    assert set(structure.groups) == {"fc"}
    (read,) = [m for m in structure.groups["fc"].members if m.module == "out"]
    order = range(5, -1, -1) if flipped else range(6)
    assert read.positions == tuple((u,) for u in order)
    plan = make_plan(structure, {"fc": [1, 3, 5]})  # unit 0 goes: a slice [:, 1:] would differ
    masked = copy.deepcopy(model)
    zero_removed(masked, plan)
    apply_plan(model, plan)
    assert (model.fc.out_features, model.out.in_features) == (3, 3)
    with torch.no_grad():
        assert torch.allclose(model(x), masked(x), atol=1e-6)
