"""Surgery: rebuilt models compute what the masked (zeroed) models compute, with real shapes."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from test_surgery_zoo import CASE_IDS, CASES, Case, random_kept, run
from torch import nn

from mesimp_compress.errors import PlanError, UnsupportedStructureError
from mesimp_compress.events import Event
from mesimp_compress.graph import find_groups
from mesimp_compress.plan import Edit, Plan, make_plan
from mesimp_compress.surgery import apply_plan, zero_removed

torch.set_num_threads(1)


def prune_both_ways(case: Case, seed: int = 0, fraction: float = 0.5):
    model = case.build()
    structure = find_groups(model, case.example(), allow_residual=case.allow_residual)
    plan = make_plan(structure, random_kept(structure, seed, fraction))
    masked = copy.deepcopy(model)
    zero_removed(masked, plan)
    apply_plan(model, plan)
    return model, masked, plan


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_rebuilt_model_equals_masked_model(case: Case) -> None:
    rebuilt, masked, plan = prune_both_ways(case)
    x = case.example(seed=7)
    assert torch.allclose(run(rebuilt, x), run(masked, x), atol=1e-5)
    original = case.build()
    assert not torch.allclose(run(original, x), run(masked, x), atol=1e-5)
    before = sum(p.numel() for p in original.parameters())
    assert sum(p.numel() for p in rebuilt.parameters()) < before


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_shapes_and_shape_attributes_follow_the_plan(case: Case) -> None:
    rebuilt, _, plan = prune_both_ways(case, seed=3)
    modules = dict(rebuilt.named_modules())
    for edit in plan.edits:
        module = modules[edit.module]
        for attr, width in edit.attrs.items():
            assert getattr(module, attr) == width, (edit.module, attr)
        if isinstance(module, nn.Linear):
            assert module.weight.shape == (module.out_features, module.in_features)
        elif isinstance(module, (nn.Conv1d, nn.Conv2d)):  # (out, in / groups, *kernel)
            assert module.weight.shape[:2] == (module.out_channels,
                                               module.in_channels // module.groups)
        elif isinstance(module, nn.BatchNorm2d):
            assert module.running_mean.shape == (module.num_features,)
        elif isinstance(module, nn.LSTM):
            H, dirs = module.hidden_size, 2 if module.bidirectional else 1
            assert module.weight_hh_l0.shape == (4 * H, H)
            assert module.weight_ih_l0.shape == (4 * H, module.input_size)
            if module.num_layers > 1:
                assert module.weight_ih_l1.shape == (4 * H, dirs * H)


def test_kept_rows_and_columns_are_the_planned_ones() -> None:
    model = nn.Sequential(nn.Linear(3, 5), nn.ReLU(), nn.Linear(5, 4), nn.ReLU(), nn.Linear(4, 2))
    original = copy.deepcopy(model)
    structure = find_groups(model, torch.randn(2, 3))
    apply_plan(model, make_plan(structure, {"0": [1, 4], "2": [0, 3]}))
    assert torch.equal(model[0].weight, original[0].weight[[1, 4]])
    assert torch.equal(model[0].bias, original[0].bias[[1, 4]])
    assert torch.equal(model[2].weight, original[2].weight[[0, 3]][:, [1, 4]])
    assert torch.equal(model[4].weight, original[4].weight[:, [0, 3]])


def test_lstm_gate_rows_move_with_their_unit() -> None:
    torch.manual_seed(0)
    lstm = nn.LSTM(3, 4, num_layers=2, bidirectional=True)
    original = copy.deepcopy(lstm)
    model = nn.Sequential()
    model.add_module("lstm", lstm)
    kept = [1, 3]
    plan = Plan(
        {},
        {},
        [
            Edit("lstm", "LSTM", role, 4, tuple(kept), "hidden_size")
            for role in ("hidden:l0", "hidden:l0_reverse", "hidden:l1", "hidden:l1_reverse")
        ],
    )
    apply_plan(model, plan)
    rows = [g * 4 + u for g in range(4) for u in kept]
    assert torch.equal(lstm.weight_ih_l0, original.weight_ih_l0[rows])
    assert torch.equal(lstm.weight_hh_l0_reverse, original.weight_hh_l0_reverse[rows][:, kept])
    assert torch.equal(lstm.bias_hh_l1, original.bias_hh_l1[rows])
    # layer 1 reads [forward half | reverse half] of layer 0
    assert torch.equal(lstm.weight_ih_l1, original.weight_ih_l1[rows][:, [1, 3, 5, 7]])


def test_lstm_hidden_roles_must_be_edited_together() -> None:
    model = nn.Sequential()
    model.add_module("lstm", nn.LSTM(3, 4, num_layers=2))
    plan = Plan({}, {}, [Edit("lstm", "LSTM", "hidden:l0", 4, (0, 1), "hidden_size")])
    with pytest.raises(PlanError, match="every layer and direction"):
        apply_plan(model, plan)
    assert model.lstm.hidden_size == 4 and model.lstm.weight_hh_l0.shape == (16, 4)


def test_parameters_keep_their_identity_and_grads_shrink() -> None:
    model = nn.Sequential(nn.Linear(3, 6), nn.ReLU(), nn.Linear(6, 2))
    weights = [model[0].weight, model[0].bias, model[2].weight]
    model(torch.randn(4, 3)).sum().backward()
    grad = model[2].weight.grad.clone()
    structure = find_groups(model, torch.randn(2, 3))
    apply_plan(model, make_plan(structure, {"0": [0, 2, 5]}))
    assert [model[0].weight, model[0].bias, model[2].weight] == weights
    assert all(
        a is b
        for a, b in zip(weights, [model[0].weight, model[0].bias, model[2].weight], strict=True)
    )
    assert torch.equal(model[2].weight.grad, grad[:, [0, 2, 5]])


def test_plan_that_does_not_fit_changes_nothing() -> None:
    model = nn.Sequential(nn.Linear(3, 6), nn.ReLU(), nn.Linear(6, 2))
    state = copy.deepcopy(model.state_dict())
    cases = [
        (Edit("9", "Linear", "out", 6, (0,), "out_features"), PlanError, "does not have"),
        (Edit("1", "Linear", "out", 6, (0,), "out_features"), PlanError, "no pruner"),
        (Edit("0", "Conv2d", "out", 6, (0,), "out_channels"), PlanError, "expects a Conv2d"),
        (Edit("0", "Linear", "out", 7, (0,), "out_features"), PlanError, "has size 6"),
        (Edit("0", "Linear", "features", 6, (0,), "x"), PlanError, "no dimension"),
    ]
    for edit, error, match in cases:
        good = Edit("2", "Linear", "in", 6, (0, 1), "in_features")
        with pytest.raises(error, match=match):
            apply_plan(model, Plan({}, {}, [good, edit]))
        assert model[2].in_features == 6
        for key, value in model.state_dict().items():
            assert torch.equal(value, state[key])


def test_unsupported_module_configuration_raises() -> None:
    model = nn.Sequential(nn.Conv2d(4, 4, 3, groups=2))
    plan = Plan({}, {}, [Edit("0", "Conv2d", "out", 4, (0, 1), "out_channels")])
    with pytest.raises(UnsupportedStructureError, match="grouped convolution"):
        apply_plan(model, plan)


def test_events_and_report() -> None:
    model = nn.Sequential(nn.Linear(3, 6), nn.ReLU(), nn.Linear(6, 2))
    events: list[Event] = []
    structure = find_groups(model, torch.randn(2, 3))
    report = apply_plan(model, make_plan(structure, {"0": [1, 2]}), sink=events.append)
    assert [(e.kind, e.data["module"], e.data["before"], e.data["after"]) for e in events] == [
        ("surgery", "0", 6, 2),
        ("surgery", "2", 6, 2),
    ]
    assert (report.params_before, report.params_after, report.edits) == (38, 14, 2)


def test_hf_config_follows_uniform_ffn_widths_and_notes_otherwise() -> None:
    case = CASES[CASE_IDS.index("bert")]
    model = case.build()
    structure = find_groups(model, case.example())
    keys = list(structure.groups)
    apply_plan(model, make_plan(structure, {k: list(range(0, 64, 2)) for k in keys}))
    assert model.config.intermediate_size == 32
    model = case.build()
    report = apply_plan(model, make_plan(structure, {keys[0]: list(range(10)), keys[1]: [1, 2]}))
    assert model.config.intermediate_size == 64
    assert any("intermediate_size cannot represent" in n for n in report.notes)
    assert model.encoder.layer[0].intermediate.dense.out_features == 10
    assert model.encoder.layer[1].output.dense.in_features == 2


class Net(nn.Module):
    """An MLP or a small CNN of random widths, for the property test."""

    def __init__(self, conv: bool, widths: list[int], batchnorm: bool) -> None:
        super().__init__()
        self.conv = conv
        if conv:
            self.c1 = nn.Conv2d(2, widths[0], 3, padding=1)
            self.bn = nn.BatchNorm2d(widths[0]) if batchnorm else nn.Identity()
            self.c2 = nn.Conv2d(widths[0], widths[1], 3, padding=1)
            self.fc = nn.Linear(widths[1] * 4, widths[2])
        else:
            self.c1 = nn.Linear(5, widths[0])
            self.bn = nn.BatchNorm1d(widths[0]) if batchnorm else nn.Identity()
            self.c2 = nn.Linear(widths[0], widths[1])
            self.fc = nn.Linear(widths[1], widths[2])
        self.out = nn.Linear(widths[2], 3)

    def forward(self, x):
        x = F.relu(self.bn(self.c1(x)))
        x = torch.tanh(self.c2(x))
        if self.conv:
            x = F.avg_pool2d(x, 2).flatten(1)
        return self.out(F.gelu(self.fc(x)))


@settings(max_examples=25, deadline=None)
@given(
    conv=st.booleans(),
    batchnorm=st.booleans(),
    widths=st.lists(st.integers(2, 7), min_size=3, max_size=3),
    seed=st.integers(0, 10_000),
    data=st.data(),
)
def test_property_random_shapes_and_plans_preserve_the_masked_function(
    conv, batchnorm, widths, seed, data
) -> None:
    torch.manual_seed(seed)
    model = Net(conv, widths, batchnorm).eval()
    if batchnorm:
        model.bn.running_mean.uniform_(-1, 1)
        model.bn.running_var.uniform_(0.5, 2)
    x = torch.randn(3, 2, 4, 4) if conv else torch.randn(3, 5)
    structure = find_groups(model, x)
    assert set(structure.groups) == {"c1", "c2", "fc"}
    kept = {}
    for key, group in structure.groups.items():
        units = data.draw(st.sets(st.integers(0, group.width - 1), min_size=1), label=key)
        kept[key] = sorted(units)
    plan = make_plan(structure, kept)
    masked = copy.deepcopy(model)
    zero_removed(masked, plan)
    apply_plan(model, plan)
    with torch.no_grad():
        assert torch.allclose(model(x), masked(x), atol=1e-5)
    assert model.fc.out_features == len(kept["fc"])
    assert model.out.in_features == len(kept["fc"])


class WrappedLinear(nn.Linear):
    """Stands in for a meProp wrapper: an nn.Linear subclass with its own forward."""

    def forward(self, x):
        return super().forward(x) * 1.0


class WrappedLSTM(nn.LSTM):
    """Stands in for a meProp LSTM wrapper."""


def test_wrapped_subclasses_survive_surgery_in_place() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(WrappedLinear(3, 6), nn.Tanh(), WrappedLSTM(6, 5, batch_first=True))
    head = nn.Linear(5, 2)

    class Full(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.body, self.head = model, head

        def forward(self, x):
            return self.head(self.body(x)[0])

    full = Full().eval()
    x = torch.randn(2, 4, 3)
    structure = find_groups(full, x)
    assert set(structure.groups) == {"body.0", "body.2.l0"}
    plan = make_plan(structure, {"body.0": [0, 2, 3], "body.2.l0": [1, 4]})
    masked = copy.deepcopy(full)
    zero_removed(masked, plan)
    layer, lstm, weight = model[0], model[2], model[2].weight_hh_l0
    apply_plan(full, plan)
    assert model[0] is layer and type(layer) is WrappedLinear
    assert model[2] is lstm and lstm.weight_hh_l0 is weight and weight.shape == (8, 2)
    assert (lstm.input_size, lstm.hidden_size, head.in_features) == (3, 2, 2)
    assert torch.allclose(full(x), masked(x), atol=1e-6)
