"""The examples' compression recipes and helpers (fast: no model is trained or loaded)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from mesimp_compress.config import CompressConfig

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def _module(path: Path):
    spec = importlib.util.spec_from_file_location(f"example_{path.parent.name}_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("example, expected", [
    ("cnn", {"k": 0.4, "prune_rate": 0.1, "window": 0.125, "threads": 1,
             "compensate": "mean"}),
    ("pos_lstm_turkish", {"k": 48, "prune_rate": 0.1, "window": 0.125, "recovery_epochs": 3}),
    ("minilm", {"k": 0.37, "include": ["*intermediate.dense"], "distill": 0.0, "recovery_epochs": 3,
                "compensate": "off", "distill_layers": ["encoder.encoder.layer.[0-9]"]}),
])
def test_recipe_is_a_valid_config(example: str, expected: dict) -> None:
    cfg = CompressConfig.from_toml(EXAMPLES / example / "recipe.toml")
    assert {key: getattr(cfg, key) for key in expected} == expected


def test_minilm_loss_and_metric_are_cosine_based() -> None:
    data = _module(EXAMPLES / "minilm" / "data.py")
    targets = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    outputs = torch.tensor([[2.0, 0.0], [1.0, 0.0]])  # cosines 1 and 0
    assert data.loss(outputs, targets).item() == pytest.approx(0.5)
    assert data.metric(outputs, targets) == pytest.approx((1.0, 2.0))
