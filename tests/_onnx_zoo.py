"""Tiny models of every kind the surgery handles, each exported once per test session.

Shared by test_export, test_sizes, test_verify and test_report: a dynamo export costs about
a second even for a tiny model, so each one is made once and cached here.
"""

from __future__ import annotations

import functools
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from mesimp_compress.export import ExportResult, export_onnx

_DIR = tempfile.TemporaryDirectory(prefix="mesimp-onnx-zoo-")
OUT = Path(_DIR.name)


@dataclass
class Exported:
    model: nn.Module
    inputs: tuple[torch.Tensor, ...]
    axes: list[dict[int, str]] | None
    result: ExportResult


def mlp(hidden: tuple[int, int] = (12, 12), seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Linear(16, hidden[0]),
        nn.ReLU(),
        nn.Linear(hidden[0], hidden[1]),
        nn.ReLU(),
        nn.Linear(hidden[1], 4),
    ).eval()


def slice_mlp(original: nn.Sequential, keep1: list[int], keep2: list[int]) -> nn.Sequential:
    """What surgery does: a freshly built smaller MLP holding the kept rows and columns."""
    small = mlp((len(keep1), len(keep2)))
    k1, k2 = torch.tensor(keep1), torch.tensor(keep2)
    with torch.no_grad():
        small[0].weight.copy_(original[0].weight[k1])
        small[0].bias.copy_(original[0].bias[k1])
        small[2].weight.copy_(original[2].weight[k2][:, k1])
        small[2].bias.copy_(original[2].bias[k2])
        small[4].weight.copy_(original[4].weight[:, k2])
        small[4].bias.copy_(original[4].bias)
    return small.eval()


KEEP1 = [0, 2, 3, 7, 9]
KEEP2 = [1, 4, 5, 11]


class Tagger(nn.Module):
    """Embedding -> 2-layer bidirectional LSTM -> Linear, over token ids (B, T)."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(50, 8)
        self.lstm = nn.LSTM(8, 6, num_layers=2, bidirectional=True, batch_first=True)
        self.out = nn.Linear(12, 5)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.out(self.lstm(self.embed(ids))[0])


def _export(
    name: str,
    model: nn.Module,
    inputs: tuple[torch.Tensor, ...],
    axes: list[dict[int, str]] | None = None,
    exporter: str = "auto",
) -> Exported:
    model.eval()
    result = export_onnx(model, inputs, OUT / f"{name}.onnx", dynamic_axes=axes, exporter=exporter)
    return Exported(model, inputs, axes, result)


@functools.cache
def mlp_pair() -> tuple[Exported, Exported]:
    original = mlp()
    compressed = slice_mlp(original, KEEP1, KEEP2)
    x = torch.randn(2, 16)
    return _export("mlp_original", original, (x,)), _export("mlp_compressed", compressed, (x,))


@functools.cache
def mlp_torchscript() -> Exported:
    """The same small MLP through the (fast) TorchScript exporter, for tests of later stages."""
    return _export("mlp_ts", mlp(), (torch.randn(2, 16),), exporter="torchscript")


@functools.cache
def cnn() -> Exported:
    torch.manual_seed(1)
    model = nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(4 * 8 * 8, 5),
    )
    with torch.no_grad():  # non-trivial statistics, so folding BN into the conv is exercised
        bn = model[1]
        bn.running_mean.uniform_(-0.5, 0.5)
        bn.running_var.uniform_(0.5, 2.0)
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.uniform_(-0.5, 0.5)
    return _export("cnn", model, (torch.randn(2, 1, 8, 8),))


@functools.cache
def tagger() -> Exported:
    torch.manual_seed(2)
    return _export("tagger", Tagger(), (torch.randint(0, 50, (2, 7)),))


@functools.cache
def encoder_layer() -> Exported:
    torch.manual_seed(3)
    layer = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True)
    return _export("encoder_layer", layer, (torch.randn(2, 5, 16),), axes=[{0: "batch", 1: "seq"}])


@functools.cache
def bert() -> Exported:
    from transformers import BertConfig, BertModel

    torch.manual_seed(4)
    config = BertConfig(
        vocab_size=100,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
    )
    model = BertModel(config)
    ids = torch.randint(1, 100, (2, 7))
    mask = torch.ones(2, 7, dtype=torch.long)
    mask[1, 5:] = 0
    return _export("bert", model, (ids, mask))
