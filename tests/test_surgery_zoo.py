"""Small models covering every structure graph and surgery must handle (shared by the tests).

Each entry builds a fresh, deterministically initialised model, so a test can build the same
model twice (e.g. a "fresh model from the user's factory" for persistence).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

torch.set_num_threads(1)


class CustomMLP(nn.Module):
    """Linear -> activation -> Linear in a custom forward, functional activations."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(6, 10)
        self.fc2 = nn.Linear(10, 8)
        self.drop = nn.Dropout(0.2)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        h = self.drop(F.gelu(self.fc1(x)))
        h = torch.sigmoid(self.fc2(h)) * 2.0 - 1.0
        return self.head(h)


class ConvNet(nn.Module):
    """Conv2d -> BatchNorm2d -> ReLU -> Conv2d -> ReLU -> pool -> Flatten -> Linear -> Linear."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 6, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(6)
        self.conv2 = nn.Conv2d(6, 5, 3)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(5 * 2 * 2, 7)
        self.out = nn.Linear(7, 2)

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        return self.out(F.relu(self.fc(self.flatten(x))))


class TextCNN(nn.Module):
    """Embedding -> Conv1d -> BatchNorm1d -> ReLU -> Conv1d -> ReLU -> pool -> Flatten -> MLP."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(20, 6)
        self.conv1 = nn.Conv1d(6, 8, 3, padding=1)
        self.bn1 = nn.BatchNorm1d(8)
        self.conv2 = nn.Conv1d(8, 7, 3)
        self.fc = nn.Linear(7 * 3, 5)
        self.out = nn.Linear(5, 2)

    def forward(self, tokens):
        x = self.emb(tokens).transpose(1, 2)  # (batch, channels, length)
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.max_pool1d(F.relu(self.conv2(x)), 2)
        return self.out(F.relu(self.fc(x.flatten(1))))


class InvertedResidual(nn.Module):
    """MobileNetV2's block: 1x1 expand -> BN -> ReLU6 -> depthwise 3x3 -> BN -> ReLU6 -> 1x1
    project -> BN, added to its input; then a head."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3, padding=1)
        self.expand = nn.Conv2d(4, 12, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(12)
        self.dw = nn.Conv2d(12, 12, 3, padding=1, groups=12, bias=False)
        self.bn2 = nn.BatchNorm2d(12)
        self.project = nn.Conv2d(12, 4, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(4)
        self.out = nn.Linear(4, 2)

    def forward(self, x):
        x = F.relu(self.stem(x))
        h = F.relu6(self.bn2(self.dw(F.relu6(self.bn1(self.expand(x))))))
        return self.out((x + self.bn3(self.project(h))).mean((2, 3)))


class ResidualMLP(nn.Module):
    """A residual stream written by ``stem`` and ``block2`` and read by ``block1`` and ``head``."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Linear(5, 8)
        self.block1 = nn.Linear(8, 12)
        self.block2 = nn.Linear(12, 8)
        self.head = nn.Linear(8, 2)

    def forward(self, x):
        h = self.stem(x)
        h = h + self.block2(F.relu(self.block1(h)))
        return self.head(F.relu(h))


class Branches(nn.Module):
    """Two branches concatenated with the input itself, read by one Linear."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 5)
        self.b = nn.Linear(4, 6)
        self.head = nn.Linear(5 + 4 + 6, 3)

    def forward(self, x):
        return self.head(torch.cat([F.relu(self.a(x)), x, torch.tanh(self.b(x))], dim=1))


class Tagger(nn.Module):
    """Embedding -> Linear -> 2-layer BiLSTM -> Linear on every time step."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(20, 5)
        self.proj = nn.Linear(5, 6)
        self.lstm = nn.LSTM(6, 7, num_layers=2, bidirectional=True, batch_first=True)
        self.out = nn.Linear(14, 4)

    def forward(self, tokens):
        h, _ = self.lstm(torch.tanh(self.proj(self.emb(tokens))))
        return self.out(h)


class LastState(nn.Module):
    """A classifier on the last layer's final states ``cat(h_n[-2], h_n[-1])``."""

    def __init__(self) -> None:
        super().__init__()
        self.lstm = nn.LSTM(4, 6, num_layers=2, bidirectional=True)
        self.fc = nn.Linear(12, 5)
        self.out = nn.Linear(5, 2)

    def forward(self, x):
        _, (h, _) = self.lstm(x)
        return self.out(F.relu(self.fc(torch.cat([h[-2], h[-1]], dim=1))))


class PackedTagger(nn.Module):
    """Variable-length sequences through pack_padded_sequence / pad_packed_sequence."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(3, 5)
        self.lstm = nn.LSTM(5, 6, batch_first=True)
        self.out = nn.Linear(6, 2)

    def forward(self, x, lengths):
        packed = pack_padded_sequence(
            torch.relu(self.proj(x)), lengths, batch_first=True, enforce_sorted=False
        )
        h, _ = self.lstm(packed)
        h, _ = pad_packed_sequence(h, batch_first=True, total_length=x.shape[1])
        return self.out(h)


class Encoder(nn.Module):
    """nn.TransformerEncoderLayer and a head on the mean over positions."""

    def __init__(self) -> None:
        super().__init__()
        self.layer = nn.TransformerEncoderLayer(16, 2, dim_feedforward=24, batch_first=True)
        self.head = nn.Linear(16, 3)

    def forward(self, x):
        return self.head(self.layer(x).mean(dim=1))


def _bert() -> nn.Module:
    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(
        vocab_size=40,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=16,
    )
    return transformers.BertModel(config)


class GatedFFN(nn.Module):
    """A SwiGLU FFN in a pre-norm residual block, as Llama's MLP: ``gate`` and ``up`` meet in
    a product (one group, two writers), ``down`` reads it; the stream itself is left alone."""

    def __init__(self) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(6)
        self.gate = nn.Linear(6, 10, bias=False)
        self.up = nn.Linear(6, 10)
        self.down = nn.Linear(10, 6)
        self.head = nn.Linear(6, 3)

    def forward(self, x):
        h = self.norm(x)
        x = x + self.down(F.silu(self.gate(h)) * self.up(h))
        return self.head(x)


@dataclass(frozen=True)
class Case:
    """A zoo entry: how to build the model, its example inputs, and its prunable keys."""

    name: str
    factory: Callable[[], nn.Module]
    inputs: Callable[[], Any]
    keys: tuple[str, ...]
    allow_residual: bool = False

    def build(self, seed: int = 0) -> nn.Module:
        """A fresh model, initialised from ``seed`` (BatchNorm statistics made non-trivial)."""
        torch.manual_seed(seed)
        model = self.factory()
        for module in model.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.running_mean.uniform_(-0.5, 0.5)
                module.running_var.uniform_(0.5, 2.0)
                module.weight.data.uniform_(0.5, 1.5)
                module.bias.data.uniform_(-0.3, 0.3)
        return model.eval()

    def example(self, seed: int = 1) -> Any:
        """Example inputs, drawn from ``seed``."""
        torch.manual_seed(seed)
        return self.inputs()


def _lstm_keys(name: str, layers: int, bidirectional: bool) -> tuple[str, ...]:
    suffixes = ["", "_reverse"] if bidirectional else [""]
    return tuple(f"{name}.l{layer}{s}" for layer in range(layers) for s in suffixes)


CASES = [
    Case(
        "sequential",
        lambda: nn.Sequential(
            nn.Linear(6, 9), nn.ReLU(), nn.Linear(9, 7), nn.Tanh(), nn.Linear(7, 3)
        ),
        lambda: torch.randn(4, 6),
        ("0", "2"),
    ),
    Case("custom_mlp", CustomMLP, lambda: torch.randn(4, 6), ("fc1", "fc2")),
    Case("convnet", ConvNet, lambda: torch.randn(2, 3, 6, 6), ("conv1", "conv2", "fc")),
    Case("text_cnn", TextCNN, lambda: torch.randint(0, 20, (3, 8)), ("conv1", "conv2", "fc")),
    Case("inverted_residual", InvertedResidual, lambda: torch.randn(2, 3, 5, 5), ("expand",)),
    Case(
        "residual",
        ResidualMLP,
        lambda: torch.randn(4, 5),
        ("stem", "block1"),
        allow_residual=True,
    ),
    Case("branches", Branches, lambda: torch.randn(4, 4), ("a", "b")),
    Case(
        "tagger",
        Tagger,
        lambda: torch.randint(0, 20, (2, 5)),
        ("proj",) + _lstm_keys("lstm", 2, True),
    ),
    Case(
        "last_state",
        LastState,
        lambda: torch.randn(5, 3, 4),
        _lstm_keys("lstm", 2, True) + ("fc",),
    ),
    Case(
        "packed",
        PackedTagger,
        lambda: (torch.randn(3, 5, 3), torch.tensor([5, 2, 4])),
        ("proj", "lstm.l0"),
    ),
    Case("transformer", Encoder, lambda: torch.randn(2, 5, 16), ("layer.linear1",)),
    Case("gated_ffn", GatedFFN, lambda: torch.randn(2, 5, 6), ("gate",)),
    Case(
        "bert",
        _bert,
        lambda: {"input_ids": torch.randint(0, 40, (2, 6))},
        ("encoder.layer.0.intermediate.dense", "encoder.layer.1.intermediate.dense"),
    ),
]
CASE_IDS = [case.name for case in CASES]


def run(model: nn.Module, inputs: Any) -> torch.Tensor:
    """The model's main output tensor for ``inputs``."""
    with torch.no_grad():
        if isinstance(inputs, dict):
            out = model(**inputs)
        elif isinstance(inputs, tuple):
            out = model(*inputs)
        else:
            out = model(inputs)
    return out if isinstance(out, torch.Tensor) else out[0]


def random_kept(structure, seed: int = 0, fraction: float = 0.5) -> dict[str, list[int]]:
    """A random plan: each key keeps ``fraction`` of its units (tied keys equal counts)."""
    gen = torch.Generator().manual_seed(seed)
    kept: dict[str, list[int]] = {}
    for key, group in structure.groups.items():
        lead = group.tied[0] if group.tied else key
        count = max(1, int(structure.groups[lead].width * fraction))
        kept[key] = sorted(torch.randperm(group.width, generator=gen)[:count].tolist())
    return kept


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_zoo_models_run_deterministically(case: Case) -> None:
    a = run(case.build(), case.example())
    b = run(case.build(), case.example())
    assert torch.equal(a, b)
    assert torch.isfinite(a).all()
