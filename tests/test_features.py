"""Layer distillation: outputs of chosen layers matched to the original model's."""

from __future__ import annotations

import copy

import _tiny
import pytest
import torch
from torch import nn

import mesimp_compress as mc
from mesimp_compress.config import CompressConfig
from mesimp_compress.errors import ConfigError
from mesimp_compress.features import captured, layer_loss, matched_layers

torch.set_num_threads(1)


def test_matched_layers_follow_the_patterns_in_order() -> None:
    model = _tiny.mlp()
    assert matched_layers(model, ["2", "0"]) == ["2", "0"]
    assert matched_layers(model, ["[04]", "0"]) == ["0", "4"]
    with pytest.raises(ConfigError, match="no module matches 'fc'"):
        matched_layers(model, ["fc"])


def test_layer_loss_is_the_relative_squared_error_of_each_layer_averaged() -> None:
    torch.manual_seed(0)
    student, teacher = _tiny.mlp(), _tiny.mlp()
    with torch.no_grad():
        student[2].weight.add_(0.1 * torch.randn_like(student[2].weight))
    x = torch.randn(5, _tiny.IN_FEATURES)
    with captured(student, ["2", "4"]) as mine, captured(teacher, ["2", "4"]) as theirs:
        student(x)
        teacher(x)
    assert set(mine) == {"2", "4"}
    s2, t2 = student[:3](x), teacher[:3](x)
    s4, t4 = student(x), teacher(x)
    expected = ((s2 - t2).pow(2).sum() / t2.pow(2).sum()
                + (s4 - t4).pow(2).sum() / t4.pow(2).sum()) / 2
    assert torch.allclose(layer_loss(mine, theirs, ["2", "4"]), expected, rtol=1e-6)
    assert layer_loss(theirs, theirs, ["2", "4"]).item() == 0.0
    student(2 * x)  # the hooks are gone after the block: nothing is recorded any more
    assert torch.allclose(mine["2"], s2)
    with pytest.raises(ConfigError, match="keeps its width"):
        layer_loss({"2": torch.zeros(5, 3)}, {"2": torch.zeros(5, 24)}, ["2"])


def test_compress_with_layer_distillation_trains_toward_the_original_layers() -> None:
    train, eval_data = _tiny.mlp_data()
    cfg = CompressConfig(k=8, window=0.25, epochs=1, cycles=1, recovery_epochs=1, lr=1e-2,
                         threads=1, seed=3, include=["0"], distill=0.0,
                         distill_layers=["2"], layer_weight=1.0)
    model = _tiny.mlp()
    result = mc.compress(copy.deepcopy(model), train, eval_data, config=cfg)
    assert result.widths["0"] < 32
    plain = mc.compress(copy.deepcopy(model), train, eval_data,
                        config=cfg.replace(distill_layers=[]))

    x = torch.cat([inputs for inputs, _ in eval_data])

    def gap(compressed: nn.Module) -> float:  # how far layer "2"'s output is from the original
        with torch.no_grad():
            reference = model[:3](x)
            return float((compressed[:3](x) - reference).pow(2).sum() / reference.pow(2).sum())

    assert gap(result.model) < gap(plain.model)


def test_a_pruned_layer_cannot_be_matched() -> None:
    train, eval_data = _tiny.mlp_data()
    cfg = CompressConfig(k=8, window=0.25, epochs=1, recovery_epochs=0, lr=1e-2, threads=1,
                         distill=0.0, distill_layers=["0"])
    with pytest.raises(ConfigError, match="'0' is pruned itself"):  # refused before training
        mc.compress(_tiny.mlp(), train, eval_data, config=cfg)
    with pytest.raises(ConfigError, match="no module matches"):
        mc.compress(_tiny.mlp(), train, eval_data, config=cfg.replace(distill_layers=["nope"]))
