"""find_groups' last check: a width written down as numbers leaves its layer alone."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mesimp_compress.graph import find_groups
from mesimp_compress.plan import make_plan
from mesimp_compress.surgery import apply_plan, zero_removed

torch.set_num_threads(1)


class LeNet(nn.Module):
    """The classic: conv features flattened with a literal size."""

    def __init__(self, flatten: str) -> None:
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(1, 6, 3), nn.Conv2d(6, 16, 3)
        self.fc1, self.fc2 = nn.Linear(16 * 4 * 4, 32), nn.Linear(32, 10)
        self.flatten = flatten

    def forward(self, x):
        h = F.max_pool2d(F.relu(self.conv2(F.relu(self.conv1(x)))), 2)
        h = h.view(-1, 16 * 4 * 4) if self.flatten == "literal" else h.flatten(1)
        return self.fc2(F.relu(self.fc1(h)))


class Heads(nn.Module):
    """A projection split into 3 heads of 4 by literal sizes, then merged back."""

    def __init__(self, split: str) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(6, 12), nn.Linear(12, 5)
        self.split = split

    def forward(self, x):
        h = self.a(x)
        if self.split == "view":
            h = h.view(x.shape[0], 3, 4).transpose(1, 2).reshape(x.shape[0], 12)
        else:
            h = h.unflatten(-1, (3, 4)).flatten(1)
        return self.b(F.relu(h))


def test_a_literal_flatten_size_leaves_the_conv_alone_and_the_rest_prunable():
    model = LeNet("literal").eval()
    x = torch.randn(4, 1, 12, 12)
    structure = find_groups(model, x)
    assert set(structure.groups) == {"conv1", "fc1"}
    reason = structure.reason("conv2")
    assert "fails once 'conv2' loses units" in reason and "[-1, 256]" in reason
    plan = make_plan(structure, {"conv1": [0, 2, 5], "fc1": list(range(0, 32, 2))})
    masked = copy.deepcopy(model)
    zero_removed(masked, plan)
    apply_plan(model, plan)
    with torch.no_grad():
        torch.testing.assert_close(model(x), masked(x), atol=1e-6, rtol=0)


def test_flatten_without_a_literal_keeps_the_conv_prunable():
    structure = find_groups(LeNet("flatten").eval(), torch.randn(4, 1, 12, 12))
    assert set(structure.groups) == {"conv1", "conv2", "fc1"}


class MaskedScores(nn.Module):
    """Class scores and, beside them, the input with its padding masked to -inf."""

    def __init__(self) -> None:
        super().__init__()
        self.h, self.o = nn.Linear(8, 16), nn.Linear(16, 3)

    def forward(self, x, mask):
        return self.o(F.relu(self.h(x))), x.masked_fill(~mask, float("-inf"))


def test_an_output_masked_to_minus_inf_does_not_look_moved():
    """-inf minus -inf is NaN: 'output 1 moved by nan' left every layer alone."""
    torch.manual_seed(0)
    mask = torch.rand(4, 8) > 0.3
    structure = find_groups(MaskedScores().eval(), (torch.randn(4, 8), mask))
    assert set(structure.groups) == {"h"}


@pytest.mark.parametrize("split", ["view", "unflatten"])
def test_literal_head_sizes_leave_the_projection_alone(split):
    structure = find_groups(Heads(split).eval(), torch.randn(2, 6))
    assert set(structure.groups) == set()
    assert "fails once 'a' loses units" in structure.reason("a")


def test_a_parametrized_consumer_leaves_its_producer_alone_with_the_reason():
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(),
                          nn.Linear(8, 3), nn.ReLU(), nn.Linear(3, 2)).eval()
    torch.nn.utils.parametrizations.weight_norm(model[2])
    structure = find_groups(model, torch.randn(4, 6))
    assert "0" not in structure.groups and "4" in structure.groups
    assert "module '2' cannot be edited: its weights are parametrized" in structure.reason("0")


class Mixed(nn.Module):
    """Two branches whose units are interleaved by position after they are joined."""

    def __init__(self, join: str) -> None:
        super().__init__()
        self.b1, self.b2 = nn.Conv2d(3, 8, 1), nn.Conv2d(3, 8, 3, padding=1)
        self.o, self.fc = nn.Conv2d(16, 4, 1), nn.Linear(4, 2)
        self.join = join

    def forward(self, x):
        a, b = F.relu(self.b1(x)), F.relu(self.b2(x))
        if self.join == "shuffle":  # ShuffleNetV2's channel shuffle, sizes read at run time
            h = torch.cat([a, b], 1)
            n, c, hh, ww = h.shape
            h = h.view(n, 2, c // 2, hh, ww).transpose(1, 2).reshape(n, c, hh, ww)
        elif self.join == "stack":  # interleaved: a0 b0 a1 b1 ...
            h = torch.stack([a, b], 2).flatten(1, 2)
        else:
            h = torch.cat([a, b], 1)
        return self.fc(F.relu(self.o(h)).mean((2, 3)))


@pytest.mark.parametrize("join", ["shuffle", "stack"])
def test_branches_interleaved_by_position_are_left_alone(join):
    structure = find_groups(Mixed(join).eval(), torch.randn(2, 3, 6, 6))
    assert set(structure.groups) == {"o"}
    for branch in ("b1", "b2"):
        assert f"'{branch}'" in structure.reason(branch)


def test_concatenated_branches_stay_prunable_with_different_units_each():
    model, x = Mixed("cat").eval(), torch.randn(2, 3, 6, 6)
    structure = find_groups(model, x)
    assert set(structure.groups) == {"b1", "b2", "o"}
    plan = make_plan(structure, {"b1": [4, 5, 6, 7], "b2": [0, 1, 2], "o": [1, 3]})
    masked = copy.deepcopy(model)
    zero_removed(masked, plan)
    apply_plan(model, plan)
    with torch.no_grad():
        torch.testing.assert_close(model(x), masked(x), atol=1e-6, rtol=0)


class Padded(nn.Module):
    def __init__(self, pad: tuple[int, int], mode: str) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(5, 8), nn.Linear(8 + sum(pad), 2)
        self.pad, self.mode = pad, mode

    def forward(self, x):
        return self.b(F.pad(torch.relu(self.a(x)).unsqueeze(1), self.pad, self.mode).squeeze(1))


@pytest.mark.parametrize("mode", ["reflect", "replicate", "circular"])
@pytest.mark.parametrize("pad", [(1, 0), (0, 1), (2, 1)])
def test_a_copying_pad_along_the_units_leaves_the_layer_alone(pad, mode):
    structure = find_groups(Padded(pad, mode).eval(), torch.randn(3, 5))
    assert structure.groups == {}
    assert "op 'pad' takes a fixed slice" in structure.reason("a")


def test_a_zero_pad_along_the_units_and_a_reflect_pad_of_the_pixels_are_followed():
    structure = find_groups(Padded((1, 2), "constant").eval(), torch.randn(3, 5))
    assert set(structure.groups) == {"a"}
    conv = nn.Sequential(nn.Conv2d(3, 6, 3), nn.ReLU(), nn.ReflectionPad2d(1), nn.Conv2d(6, 2, 3))
    assert set(find_groups(conv.eval(), torch.randn(2, 3, 8, 8)).groups) == {"0"}


class Siamese(nn.Module):
    """Two branches batched together along dim 0, then split: their widths must stay equal."""

    def __init__(self, join: str, width: int = 3) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(4, width), nn.Linear(4, width)
        self.ca, self.cb = nn.Linear(width, 2), nn.Linear(width, 2)
        self.join = join

    def forward(self, x):
        a, b = self.a(x), self.b(x)
        if self.join == "cat":
            a, b = torch.cat([a, b], 0).chunk(2, 0)
        elif self.join == "stack":
            a, b = torch.stack([a, b]).unbind(0)
        else:
            b = b.view_as(a)
        return self.ca(a) + self.cb(b)


@pytest.mark.parametrize("width", [2, 3, 8])
@pytest.mark.parametrize("join", ["cat", "stack", "view_as"])
def test_branches_whose_widths_the_model_ties_are_left_alone(join, width):
    structure = find_groups(Siamese(join, width).eval(), torch.randn(5, 4))
    assert structure.groups == {}
    assert "loses units" in structure.reason("a") and "loses units" in structure.reason("b")


def test_many_groups_of_one_width_are_still_prunable_when_independent():
    model = nn.Sequential(*[m for _ in range(5) for m in (nn.Linear(3, 3), nn.ReLU())],
                          nn.Linear(3, 2)).eval()  # five width-3 groups: counts collide
    structure = find_groups(model, torch.randn(4, 3))
    assert set(structure.groups) == {"0", "2", "4", "6", "8"}


class AuxHead(nn.Module):
    """An Inception-style auxiliary head that reads fc1 in training only."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2, self.out = nn.Linear(12, 32), nn.Linear(32, 24), nn.Linear(24, 4)
        self.aux = nn.Linear(32, 4)
        self.drop = nn.Dropout(0.5)  # train-mode values differ by shape: only shapes compared

    def forward(self, x):
        h = torch.relu(self.fc1(x))
        out = self.out(self.drop(torch.relu(self.fc2(h))))
        return (out, self.aux(h)) if self.training else out


def test_a_layer_read_by_a_training_only_head_is_left_alone():
    structure = find_groups(AuxHead(), torch.randn(8, 12))
    assert set(structure.groups) == {"fc2"}
    assert "train-mode forward fails" in structure.reason("fc1")


class _DeepWithOneLiteral(nn.Module):
    """32 Linear(8, 8) layers; the output of layer 20 is reshaped by a literal width."""

    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(8, 8) for _ in range(32))
        self.out = nn.Linear(8, 2)

    def forward(self, x):
        for i, layer in enumerate(self.layers):
            x = torch.relu(layer(x))
            if i == 20:
                x = x.view(-1, 2, 4).flatten(1)
        return self.out(x)


def test_one_failing_group_among_many_is_found_by_halves(monkeypatch):
    from mesimp_compress.graph import shrink

    calls = []
    real = shrink._failure
    monkeypatch.setattr(shrink, "_failure", lambda *a: calls.append(a[3]) or real(*a))
    structure = find_groups(_DeepWithOneLiteral().eval(), torch.randn(4, 8))
    # 32 groups of width 8 (7 counts each round): 5 rounds, then all together
    assert set(structure.groups) == {f"layers.{i}" for i in range(32)} - {"layers.20"}
    assert "[-1, 2, 4]" in structure.reason("layers.20")
    assert len(calls) == 13  # 5 rounds, 7 halves, the survivors together (was 1 per group)


class _PairedBranches(nn.Module):
    """Eight branches; the forward fails only when branches 1 and 6 both lose units."""

    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.ModuleList(nn.Linear(8, 16) for _ in range(8))
        self.out = nn.ModuleList(nn.Linear(16, 4) for _ in range(8))

    def forward(self, x):
        hs = [torch.relu(layer(x)) for layer in self.inp]
        if hs[1].shape[-1] + hs[6].shape[-1] < 22:
            raise RuntimeError("branches 1 and 6 together need 22 units")
        return sum(o(h) for o, h in zip(self.out, hs, strict=True))


def test_two_groups_that_fail_only_together_are_both_left_alone_and_only_they():
    torch.manual_seed(0)
    structure = find_groups(_PairedBranches(), torch.randn(16, 8))
    assert set(structure.groups) == {f"inp.{i}" for i in (0, 2, 3, 4, 5, 7)}
    for key in ("inp.1", "inp.6"):
        assert "'inp.1', 'inp.6' lose units" in structure.reason(key)
