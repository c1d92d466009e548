import pytest
import torch

from mesimp_compress.errors import ConfigError
from mesimp_compress.schedule import Rule, cycle_plan, decide, most_active


def test_rule_keeps_units_at_or_above_threshold():
    hits = torch.tensor([0, 9, 10, 11, 100, 3])
    # threshold 0.1 * 100 = 10: units 2, 3, 4 survive (>=), 1 (9 < 10) does not
    assert Rule(prune_rate=0.1).kept_count(hits, 100) == 3
    kept = decide({"fc": hits}, {"fc": 100}, Rule(prune_rate=0.1))
    assert kept["fc"].tolist() == [2, 3, 4]


def test_min_width_keeps_most_active():
    hits = torch.tensor([5, 0, 7, 1])
    kept = decide({"fc": hits}, {"fc": 1000}, Rule(prune_rate=0.1, min_width=2))
    assert kept["fc"].tolist() == [0, 2]


def test_rounding_up_to_multiple_never_exceeds_width():
    hits = torch.arange(20)
    rule = Rule(prune_rate=0.5, round_to=8)  # threshold 10 -> 10 units pass -> 16
    assert rule.kept_count(hits, 20) == 16
    kept = decide({"fc": hits}, {"fc": 20}, rule)["fc"]
    assert kept.tolist() == list(range(4, 20))
    assert Rule(prune_rate=0.0, round_to=8).kept_count(torch.ones(12), 1) == 12


def test_unchanged_frozen_and_unseen_layers_are_left_out():
    hits = {"a": torch.tensor([5, 5]), "b": torch.tensor([0, 5]), "c": torch.tensor([0, 0])}
    kept = decide(hits, {"a": 5, "b": 5, "c": 0}, Rule(prune_rate=0.5), frozen={"b"})
    assert kept == {}


def test_tied_layers_keep_equal_counts_each_its_own_units():
    hits = {"lstm.l0": torch.tensor([9, 0, 0, 9]), "lstm.l0_reverse": torch.tensor([0, 9, 1, 0])}
    kept = decide(hits, {k: 10 for k in hits}, Rule(prune_rate=0.5), tied=[tuple(hits)])
    assert kept["lstm.l0"].tolist() == [0, 3]
    assert kept["lstm.l0_reverse"].tolist() == [1, 2]


def test_most_active_breaks_ties_by_index():
    assert most_active(torch.tensor([3, 3, 3, 1]), 2).tolist() == [0, 1]


def test_bad_rule_settings_raise():
    with pytest.raises(ConfigError, match="min_width"):
        Rule(min_width=0)
    with pytest.raises(ConfigError, match="prune_rate"):
        Rule(prune_rate=1.5)


def test_cycle_plan_alternates_and_recovers():
    plan = cycle_plan(cycles=2, epochs=3, recovery_epochs=1)
    assert [(p.kind, p.epochs, p.cycle) for p in plan] == [
        ("prune", 3, 0), ("normal", 3, 0), ("prune", 3, 1), ("normal", 3, 1), ("normal", 1, 2)
    ]
