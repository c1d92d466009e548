"""Simplifier: the restricted structure equals a fresh trace; the cumulative plan replays."""

from __future__ import annotations

import copy
import random

import _tiny
import pytest
import torch

from mesimp_compress.config import CompressConfig
from mesimp_compress.graph import Structure, find_groups
from mesimp_compress.simplify import Simplifier
from mesimp_compress.surgery import load_compressed

torch.set_num_threads(1)

MODELS = {
    "mlp": (_tiny.mlp, lambda: torch.randn(5, _tiny.IN_FEATURES)),
    "cnn": (_tiny.cnn, lambda: torch.randn(3, 1, 6, 6)),
    "bilstm": (_tiny.tagger, lambda: torch.randint(0, _tiny.VOCAB, (3, 7))),
}
CFG = CompressConfig(compensate=False, distill=0.0)


def random_kept(simplifier: Simplifier, seed: int, fraction: float) -> dict[str, list[int]]:
    """About ``fraction`` of each key's units, equal counts over tied keys (one nn.LSTM)."""
    rng = random.Random(seed)
    widths = simplifier.widths()
    counts = {k: max(1, int(w * fraction)) for k, w in widths.items()}
    for tied in simplifier.tied():
        n = min(counts[k] for k in tied)
        counts.update({k: n for k in tied})
    return {k: sorted(rng.sample(range(widths[k]), counts[k])) for k in widths}


def summary(structure: Structure) -> dict[str, object]:
    """Everything that matters in a structure, order-free: widths, members and positions."""
    out: dict[str, object] = {}
    for key, g in structure.groups.items():
        members = {(m.module, m.role): (m.kind, m.size, m.attr, m.positions) for m in g.members}
        out[key] = (g.kind, g.module, g.width, tuple(sorted(g.tied)), members)
    return out


def build(name: str):
    factory, inputs = MODELS[name]
    torch.manual_seed(5)
    x = inputs()
    model = factory().eval()
    return model, x, Simplifier.build(model, x, CFG)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_restricted_structure_equals_a_fresh_trace(name: str) -> None:
    model, x, simp = build(name)
    before = dict(simp.widths())
    for step, fraction in enumerate((0.7, 0.6)):
        kept = random_kept(simp, seed=step, fraction=fraction)
        simp.prune(model, kept, compensate=False)
        fresh = find_groups(model, x)
        assert summary(simp.structure) == summary(fresh)
        assert simp.widths() == {k: len(v) for k, v in kept.items()}
    assert all(simp.widths()[k] < before[k] for k in before)
    if name == "bilstm":
        assert set(before) == {"lstm.l0", "lstm.l0_reverse", "lstm.l1", "lstm.l1_reverse"}
        assert len(set(simp.widths().values())) == 1  # one hidden_size for all four keys


@pytest.mark.parametrize("name", sorted(MODELS))
def test_cumulative_plan_replays_on_a_fresh_model(name: str, tmp_path) -> None:
    model, x, simp = build(name)
    factory = MODELS[name][0]
    original_widths = dict(simp.widths())
    for step, fraction in enumerate((0.75, 0.5)):
        simp.prune(model, random_kept(simp, seed=10 + step, fraction=fraction), compensate=False)
    plan = simp.final_plan()
    assert plan.widths == original_widths
    assert plan.new_widths() == simp.widths()
    assert simp.kept_original() == plan.kept
    with torch.no_grad():
        expected = model(x)
    fresh = factory().eval()
    with torch.no_grad():
        assert not torch.allclose(fresh(x), expected)
    rebuilt = load_compressed(fresh, plan, copy.deepcopy(model.state_dict()))
    with torch.no_grad():
        assert torch.equal(rebuilt(x), expected)
    # and through the JSON file, as plan.json is read back
    (tmp_path / "plan.json").write_text(plan.to_json())
    again = load_compressed(factory().eval(), tmp_path / "plan.json", model.state_dict())
    with torch.no_grad():
        assert torch.equal(again(x), expected)


class HeadFirst(torch.nn.Module):
    """The output layer is defined before the body: definition order would pick 'fc2'."""

    def __init__(self) -> None:
        super().__init__()
        self.head = torch.nn.Linear(24, 4)
        self.fc1, self.fc2 = torch.nn.Linear(12, 32), torch.nn.Linear(32, 24)

    def forward(self, x):
        return self.head(torch.relu(self.fc2(torch.relu(self.fc1(x)))))


def test_the_output_layer_is_the_one_whose_units_reach_the_output() -> None:
    model = HeadFirst()
    simplifier = Simplifier.build(model, torch.randn(4, 12), CompressConfig())
    assert simplifier.output_layer == "head"
    assert set(simplifier.prunable_keys()) == {"fc1", "fc2"}
    named = Simplifier.build(HeadFirst(), torch.randn(4, 12), CompressConfig(output_layer="fc2"))
    assert named.output_layer == "fc2"  # a named output layer wins


def test_keys_include_leaves_out_are_listed_as_left_alone_with_the_reason() -> None:
    simplifier = Simplifier.build(_tiny.mlp(), torch.randn(4, 12), CompressConfig(include=["0"]))
    assert simplifier.widths() == {"0": 32}
    assert {"name": "2", "reason": "not matched by include (0)"} in simplifier.skipped()
    simplifier.detach_means()


def test_exclude_patterns_that_leave_no_layer_alone_are_noted():
    from test_surgery_zoo import CASE_IDS, CASES

    case = CASES[CASE_IDS.index("inverted_residual")]
    config = CompressConfig(exclude=["stem", "dw", "bn*", "zzz"], allow_residual=True)
    simp = Simplifier.build(case.build(), case.example(), config)
    assert simp.notes() == [
        "exclude pattern 'dw' matches only ['dw'], no prunable layer: name the layers "
        "('name.*' for those inside a block), or, for a BatchNorm or depthwise convolution, "
        "the layer whose units it reads",
        "exclude pattern 'bn*' matches only ['bn1', 'bn2', 'bn3'], no prunable layer: name the "
        "layers ('name.*' for those inside a block), or, for a BatchNorm or depthwise "
        "convolution, the layer whose units it reads",
        "exclude pattern 'zzz' matches no module of the model"]
    assert "excluded by name" in {s["name"]: s["reason"] for s in simp.skipped()}["stem"]


def test_a_named_output_layer_is_left_alone_with_its_reason():
    """meProp left it dense, so it counted no activity: it kept every unit with a note that
    blamed frozen parameters, and report.json did not list it as left alone."""
    from torch import nn

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 12), nn.ReLU(),
                          nn.Linear(12, 3))
    simp = Simplifier.build(model, torch.randn(4, 6), CompressConfig(output_layer="2"))
    assert simp.prunable_keys() == ["0"]
    assert {"name": "2", "reason": "named as the output layer (output_layer): never pruned"} in (
        simp.skipped())
