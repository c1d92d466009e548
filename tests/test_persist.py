"""Persistence without pickle: plan.json + weights.pt replayed on a fresh model."""

from __future__ import annotations

import json

import pytest
import torch
from test_surgery_zoo import CASE_IDS, CASES, Case, random_kept, run
from torch import nn

from mesimp_compress.errors import CheckpointError, PlanError
from mesimp_compress.graph import find_groups
from mesimp_compress.plan import make_plan
from mesimp_compress.surgery import apply_plan, load_compressed, read_plan, save_compressed

torch.set_num_threads(1)


def compressed(case: Case):
    model = case.build()
    structure = find_groups(model, case.example(), allow_residual=case.allow_residual)
    plan = make_plan(structure, random_kept(structure, seed=4, fraction=0.6))
    apply_plan(model, plan)
    with torch.no_grad():  # the compressed weights differ from a fresh model's
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    return model, plan


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_round_trip_on_a_fresh_model_from_the_factory(case: Case, tmp_path) -> None:
    model, plan = compressed(case)
    folder = save_compressed(model, plan, tmp_path / "out")
    assert sorted(p.name for p in folder.iterdir()) == ["plan.json", "weights.pt"]
    loaded = load_compressed(case.build(seed=123), folder)
    x = case.example(seed=9)
    assert torch.equal(run(loaded, x), run(model, x))
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value)


def test_files_are_plain_json_and_a_weights_only_state_dict(tmp_path) -> None:
    case = CASES[CASE_IDS.index("convnet")]
    model, plan = compressed(case)
    save_compressed(model, plan, tmp_path)
    data = json.loads((tmp_path / "plan.json").read_text())
    assert data["kept"] == plan.kept
    weights = torch.load(tmp_path / "weights.pt", weights_only=True)
    assert weights["fc.weight"].shape == model.fc.weight.shape
    assert read_plan(tmp_path) == plan
    loaded = load_compressed(case.build(), tmp_path / "plan.json", weights)
    assert loaded.conv2.out_channels == model.conv2.out_channels


def test_saving_again_replaces_files_and_leaves_no_temporaries(tmp_path) -> None:
    case = CASES[CASE_IDS.index("sequential")]
    model, plan = compressed(case)
    save_compressed(model, plan, tmp_path)
    save_compressed(model, plan, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["plan.json", "weights.pt"]


def test_load_errors_are_typed(tmp_path) -> None:
    case = CASES[CASE_IDS.index("sequential")]
    model, plan = compressed(case)
    with pytest.raises(PlanError, match="cannot read plan"):
        load_compressed(case.build(), tmp_path / "missing")
    save_compressed(model, plan, tmp_path)
    with pytest.raises(PlanError, match="has size"):
        load_compressed(nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 7)), tmp_path)
    structure = find_groups(model, case.example())  # a second compression of the first
    again = make_plan(structure, random_kept(structure, seed=5, fraction=0.6))
    with pytest.raises(PlanError, match="\\(a plan of a model compressed before applies to "
                                        "that model: rebuild it first"):
        apply_plan(case.build(), again)
    (tmp_path / "weights.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="cannot read weights"):
        load_compressed(case.build(), tmp_path)
    bad = {k: v for k, v in model.state_dict().items() if k != "0.bias"}
    with pytest.raises(CheckpointError,
                       match="state_dict does not fit the model: missing '0.bias'"):
        load_compressed(case.build(), plan, bad)
    with pytest.raises(CheckpointError, match="no state_dict"):
        load_compressed(case.build(), plan)
    numbered = dict(enumerate(model.state_dict().values()))  # keys that are not names
    with pytest.raises(CheckpointError, match="does not fit the model: missing '0.weight'.*"
                                              "unexpected 0, 1"):
        load_compressed(case.build(), plan, numbered)


def test_damaged_files_and_wrong_arguments_are_typed_errors(tmp_path) -> None:
    """A corrupt run folder or a factory passed for its model: one-line typed errors."""
    import mesimp_compress as mc
    from mesimp_compress.errors import ConfigError
    from mesimp_compress.surgery import apply_plan

    case = CASES[CASE_IDS.index("sequential")]
    model, plan = compressed(case)
    save_compressed(model, plan, tmp_path)
    with pytest.raises(ConfigError, match="call your factory"):
        mc.load(case.build, tmp_path)
    with pytest.raises(PlanError, match="read a plan file with read_plan"):
        apply_plan(case.build(), str(tmp_path / "plan.json"))
    with pytest.raises(CheckpointError, match="a mapping or a path, got list"):
        load_compressed(case.build(), plan, [1, 2])
    with pytest.raises(CheckpointError, match="no run folder"):
        mc.load(case.build(), tmp_path / "elsewhere")
    rebuilt = mc.load(case.build(), tmp_path / "plan.json")  # the folder's plan file named
    assert torch.equal(rebuilt[0].weight, model[0].weight)
    (tmp_path / "weights.pt").write_bytes(b"hello world\x00\x01")
    with pytest.raises(CheckpointError, match="not a file written by torch.save, or damaged"):
        mc.load(case.build(), tmp_path)
    (tmp_path / "plan.json").write_bytes(b"\xff\xfe garbage")
    with pytest.raises(PlanError, match="not UTF-8 text"):
        mc.load(case.build(), tmp_path)
    (tmp_path / "plan.json").write_text("[" * 100_000)
    with pytest.raises(PlanError, match="nested too deeply"):
        mc.load(case.build(), tmp_path)
