"""Plans: edits derived from groups, validation, JSON, composition."""

from __future__ import annotations

import json

import pytest
import torch
from test_surgery_zoo import CASE_IDS, CASES, run
from torch import nn

from mesimp_compress.errors import PlanError, UnsupportedStructureError
from mesimp_compress.graph import find_groups
from mesimp_compress.plan import Edit, Plan, make_plan
from mesimp_compress.surgery import apply_plan

torch.set_num_threads(1)


def structure_of(name: str):
    case = CASES[CASE_IDS.index(name)]
    return case, find_groups(case.build(), case.example(), allow_residual=case.allow_residual)


def test_linear_chain_plan_edits_rows_and_columns() -> None:
    _, structure = structure_of("sequential")
    plan = make_plan(structure, {"0": [7, 1, 4]})
    assert plan.kept == {"0": [1, 4, 7]} and plan.widths == {"0": 9}
    assert plan.new_widths() == {"0": 3}
    assert plan.removed() == {"0": [0, 2, 3, 5, 6, 8]}
    assert plan.edits == [
        Edit("0", "Linear", "out", 9, (1, 4, 7), "out_features"),
        Edit("2", "Linear", "in", 9, (1, 4, 7), "in_features"),
    ]
    assert plan.edits[1].attrs == {"in_features": 3}


def test_flatten_consumer_keeps_whole_channel_blocks() -> None:
    _, structure = structure_of("convnet")
    plan = make_plan(structure, {"conv2": [0, 3]})
    fc = next(e for e in plan.edits if e.module == "fc")
    assert fc.role == "in" and fc.size == 20
    assert fc.kept == (0, 1, 2, 3, 12, 13, 14, 15)


def test_concat_consumer_combines_edits_of_both_branches() -> None:
    _, structure = structure_of("branches")
    plan = make_plan(structure, {"a": [1, 2], "b": [0, 5]})
    head = next(e for e in plan.edits if e.module == "head")
    # a: 0..4, input x: 5..8 (always kept), b: 9..14
    assert head.kept == (1, 2, 5, 6, 7, 8, 9, 14)


def test_keys_not_given_keep_all_units_and_full_kept_sets_edit_nothing() -> None:
    _, structure = structure_of("sequential")
    assert make_plan(structure, {"2": range(7)}).is_empty()
    assert make_plan(structure, {}).edits == []


@pytest.mark.parametrize(
    ("kept", "error", "match"),
    [
        ({"nope": [0]}, PlanError, "unknown layer key 'nope'"),
        ({"4": [0]}, UnsupportedStructureError, "model output"),
        ({"0": [0, 9]}, PlanError, "out of range"),
        ({"0": [1, 1, 2]}, PlanError, "duplicate"),
        ({"0": []}, PlanError, "empty"),
        ({"0": [0.5]}, PlanError, "int index"),
        ({"0": torch.tensor([[1, 2]])}, PlanError, "int index"),
    ],
)
def test_make_plan_rejects_bad_requests(kept, error, match) -> None:
    _, structure = structure_of("sequential")
    with pytest.raises(error, match=match):
        make_plan(structure, kept)


def test_tied_lstm_keys_need_equal_counts() -> None:
    _, structure = structure_of("tagger")
    with pytest.raises(PlanError, match="equal unit counts"):
        make_plan(structure, {"lstm.l0": [0, 1, 2]})
    keys = structure.tied_sets()[0]
    plan = make_plan(structure, {k: [0, 2, 4] for k in keys})
    roles = {e.role for e in plan.edits if e.module == "lstm"}
    assert roles == {"hidden:l0", "hidden:l0_reverse", "hidden:l1", "hidden:l1_reverse"}


def test_json_round_trip_and_format() -> None:
    _, structure = structure_of("convnet")
    plan = make_plan(structure, {"conv1": [0, 2, 5], "fc": [1, 3]})
    data = json.loads(plan.to_json())
    assert data["format"] == "mesimp-plan" and data["version"] == 1
    assert data["kept"] == {"conv1": [0, 2, 5], "fc": [1, 3]}
    assert {
        "module": "bn1",
        "kind": "BatchNorm2d",
        "role": "features",
        "size": 6,
        "kept": [0, 2, 5],
        "attrs": {"num_features": 3},
    } in data["edits"]
    assert Plan.from_json(plan.to_json()) == plan


@pytest.mark.parametrize(
    ("mutate", "match"),
    [
        (lambda d: d.update(format="other"), "not a mesimp plan"),
        (lambda d: d.update(version=99), "version 99"),
        (lambda d: d["edits"][0].update(kept=[5, 1]), "sorted"),
        (lambda d: d["edits"][0].update(attrs={"out_features": 99}), "out_features=99"),
        (lambda d: d["edits"].append(dict(d["edits"][0])), "edited twice"),
        (lambda d: d.pop("edits"), "malformed"),
        (lambda d: d["kept"].update({"0": [2, 5]}), "but the plan keeps"),
        (lambda d: d.update(version=True), "version True is not supported"),
        (lambda d: d["edits"][0].update(module=None), "expected a name, got None"),
    ],
)
def test_from_json_rejects_malformed_plans(mutate, match) -> None:
    _, structure = structure_of("sequential")
    data = make_plan(structure, {"0": [1, 5]}).to_dict()
    mutate(data)
    with pytest.raises(PlanError, match=match):
        Plan.from_json(json.dumps(data))
    with pytest.raises(PlanError, match="not valid JSON"):
        Plan.from_json("{")


def test_then_composes_two_rounds_into_one_plan_on_the_original() -> None:
    case, structure = structure_of("convnet")
    first = make_plan(structure, {"conv1": [0, 1, 3, 4, 5], "conv2": [0, 2, 3, 4]})
    twice = case.build()
    apply_plan(twice, first)
    second_structure = find_groups(twice, case.example())
    second = make_plan(second_structure, {"conv1": [1, 4], "fc": [0, 2, 6]})
    apply_plan(twice, second)
    combined = first.then(second)
    assert combined.kept["conv1"] == [1, 5] and combined.widths["conv1"] == 6
    assert combined.kept["conv2"] == [0, 2, 3, 4] and combined.kept["fc"] == [0, 2, 6]
    once = case.build()
    apply_plan(once, combined)
    x = case.example()
    assert torch.allclose(run(once, x), run(twice, x), atol=1e-6)
    for a, b in zip(once.state_dict().values(), twice.state_dict().values(), strict=True):
        assert torch.equal(a, b)


def test_then_rejects_plans_that_do_not_chain() -> None:
    _, structure = structure_of("sequential")
    first = make_plan(structure, {"0": [1, 2, 3]})
    other = make_plan(structure, {"0": [1, 2]})
    with pytest.raises(PlanError, match="expects width 9"):
        first.then(other)


def test_plan_validation_is_reused_by_apply() -> None:
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    bad = Plan({"0": [0]}, {"0": 4}, [Edit("0", "Linear", "out", 4, (2, 1), "out_features")])
    with pytest.raises(PlanError, match="sorted"):
        apply_plan(model, bad)
    assert model[0].out_features == 4
