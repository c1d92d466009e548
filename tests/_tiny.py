"""Tiny models and data for the end-to-end tests (also usable as `tests/_tiny.py:name` specs).

Every factory seeds its own initialisation, so two calls build the same model (the "fresh
model from the user's factory"). Data functions return ``(train, eval)`` lists of
``(inputs, targets)`` batches drawn from a fixed generator; the targets come from a random
teacher, so there is something to learn.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

HERE = Path(__file__).resolve()
IN_FEATURES, CLASSES = 12, 4


def spec(name: str) -> str:
    """``path/to/_tiny.py:name``, for the CLI."""
    return f"{HERE}:{name}"


# ---------------------------------------------------------------------- models
def mlp() -> nn.Module:
    """12 -> 32 -> 24 -> 4 with ReLUs."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(IN_FEATURES, 32), nn.ReLU(), nn.Linear(32, 24), nn.ReLU(), nn.Linear(24, CLASSES)
    )


class ConvNet(nn.Module):
    """Conv -> BN -> ReLU -> Conv -> BN -> ReLU -> Flatten -> Linear -> Linear on 1x6x6."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 16, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(16)
        self.conv2 = nn.Conv2d(16, 16, 3)
        self.bn2 = nn.BatchNorm2d(16)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(16 * 4 * 4, 24)
        self.out = nn.Linear(24, CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.bn2(self.conv2(x)))
        return self.out(torch.relu(self.fc(self.flatten(x))))


def cnn() -> nn.Module:
    torch.manual_seed(0)
    model = ConvNet()
    for bn in (model.bn1, model.bn2):  # non-trivial statistics, so BN surgery is visible
        bn.running_mean.uniform_(-0.5, 0.5)
        bn.running_var.uniform_(0.5, 2.0)
    return model


VOCAB, TAGS = 20, 5


class Tagger(nn.Module):
    """Embedding -> 2-layer bidirectional LSTM -> Linear on every token."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(VOCAB, 8)
        self.lstm = nn.LSTM(8, 16, num_layers=2, bidirectional=True, batch_first=True)
        self.out = nn.Linear(32, TAGS)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        h, _ = self.lstm(self.emb(tokens))
        return self.out(h)


def tagger() -> nn.Module:
    torch.manual_seed(0)
    return Tagger()


# ---------------------------------------------------------------------- misbehaving models
class NoExport(nn.Module):
    """Trains fine in PyTorch, but its forward cannot be exported to ONNX (data-dependent
    Python control flow on a tensor value and an op with no ONNX form)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(IN_FEATURES, 16)
        self.out = nn.Linear(16, CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.fc(x))
        if torch.onnx.is_in_onnx_export() or torch.compiler.is_compiling():
            raise RuntimeError("this forward refuses to be exported")
        return self.out(h)


def no_export() -> nn.Module:
    torch.manual_seed(0)
    return NoExport()


class Shifted(nn.Module):
    """An MLP whose exported graph computes something else (+1 on every output): ONNX parity
    must fail."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(IN_FEATURES, 16)
        self.out = nn.Linear(16, CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.out(torch.relu(self.fc(x)))
        if torch.onnx.is_in_onnx_export() or torch.compiler.is_compiling():
            y = y + 1.0
        return y


def shifted() -> nn.Module:
    torch.manual_seed(0)
    return Shifted()


class ShiftedOncePruned(Shifted):
    """Exports faithfully at full width, shifted (+1) once ``fc`` lost units: only the
    compressed model's parity fails."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.out(torch.relu(self.fc(x)))
        exporting = torch.onnx.is_in_onnx_export() or torch.compiler.is_compiling()
        return y + 1.0 if exporting and self.fc.out_features < 16 else y


def shifted_once_pruned() -> nn.Module:
    torch.manual_seed(0)
    return ShiftedOncePruned()


class OnlyHead(nn.Module):
    """A single Linear: its outputs are the model's outputs, so nothing can be pruned."""

    def __init__(self) -> None:
        super().__init__()
        self.out = nn.Linear(IN_FEATURES, CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(x)


def only_head() -> nn.Module:
    torch.manual_seed(0)
    return OnlyHead()


def not_a_module() -> dict:
    return {"fc": nn.Linear(2, 2)}


def raises() -> nn.Module:
    raise RuntimeError("factory exploded")


def exits() -> nn.Module:
    raise SystemExit(3)  # a script's factory that quits instead of raising


# ---------------------------------------------------------------------- data
def _classify(n: int, seed: int, batch: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    teacher = torch.randn(IN_FEATURES, CLASSES, generator=torch.Generator().manual_seed(99))
    x = torch.randn(n, IN_FEATURES, generator=g)
    y = (x @ teacher).argmax(1)
    return [(x[i : i + batch], y[i : i + batch]) for i in range(0, n, batch)]


def mlp_data(n_train: int = 256, n_eval: int = 64, batch: int = 32):
    """(train, eval) for :func:`mlp` and the other 12-feature models."""
    return _classify(n_train, 1, batch), _classify(n_eval, 2, batch)


def _images(n: int, seed: int, batch: int):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 1, 6, 6, generator=g)
    y = (x[:, 0, :3].sum((1, 2)) > 0).long() + 2 * (x[:, 0, :, :3].sum((1, 2)) > 0).long()
    return [(x[i : i + batch], y[i : i + batch]) for i in range(0, n, batch)]


def cnn_data(n_train: int = 192, n_eval: int = 64, batch: int = 32):
    """(train, eval) for :func:`cnn`."""
    return _images(n_train, 1, batch), _images(n_eval, 2, batch)


def _tokens(n: int, seed: int, batch: int, length: int = 7):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, VOCAB, (n, length), generator=g)
    y = x % TAGS
    return [(x[i : i + batch], y[i : i + batch]) for i in range(0, n, batch)]


def tagger_data(n_train: int = 128, n_eval: int = 32, batch: int = 16):
    """(train, eval) for :func:`tagger`: the tag is the token id mod 5."""
    return _tokens(n_train, 1, batch), _tokens(n_eval, 2, batch)


# ---------------------------------------------------------------------- bad data
def empty_data():
    return [], []


def wrong_shape_data():
    train, evaluation = mlp_data()
    return [(x[:, :5], y) for x, y in train], [(x[:, :5], y) for x, y in evaluation]


def float_targets_data():
    train, evaluation = mlp_data()
    return [(x, y.float()) for x, y in train], [(x, y.float()) for x, y in evaluation]


def int_inputs_data():
    train, evaluation = mlp_data()
    return [(x.long(), y) for x, y in train], [(x.long(), y) for x, y in evaluation]


def not_pairs_data():
    return [torch.zeros(4, IN_FEATURES)], [torch.zeros(4, IN_FEATURES)]


def one_part_data():
    return mlp_data()[0]


def raising_data():
    raise OSError("data source is offline")


def exiting_data():
    import sys

    sys.exit("no data today")


class _ExitingLoss:
    """Cross-entropy that calls sys.exit() on its ``at``-th call (1-based)."""

    def __init__(self, at: int) -> None:
        self.at, self.calls = at, 0

    def __call__(self, outputs, targets):
        self.calls += 1
        if self.calls == self.at:
            self.calls = 0  # the next run in this process exits at the same call
            raise SystemExit(0)
        return nn.functional.cross_entropy(outputs, targets)


exiting_loss = _ExitingLoss(at=5)


def generator_data():
    train, evaluation = mlp_data()
    return iter(train), iter(evaluation)


class _Failing:
    """Re-iterable batches whose reading fails at batch ``at`` (1-based), like a dataset
    whose records go bad."""

    def __init__(self, batches, at: int) -> None:
        self.batches, self.at = batches, at

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self):
        for i, batch in enumerate(self.batches):
            if i + 1 == self.at:
                raise ValueError(f"record {i} is corrupt")
            yield batch


def failing_data():
    train, evaluation = mlp_data()
    return _Failing(train, at=4), evaluation


def nan_inputs_data():
    train, evaluation = mlp_data()
    x, y = train[0]
    return [(x.clone().fill_(float("nan")), y), *train[1:]], evaluation


def empty_first_batch_data():
    train, evaluation = mlp_data()
    x, y = train[0]
    return [(x[:0], y[:0]), *train], evaluation


# ---------------------------------------------------------------------- bad models
def meta_mlp() -> nn.Module:
    with torch.device("meta"):
        return mlp()


def nan_mlp() -> nn.Module:
    model = mlp()
    with torch.no_grad():
        model[2].weight[0, 0] = float("inf")
    return model


class _Bracketed(nn.Module):
    """The tiny MLP with layer names that look like Rich markup (a ModuleDict key may be any
    string): '[/]' closes a tag, '[cls]' would vanish as an unknown style."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.layers = nn.ModuleDict({"[/]": nn.Linear(IN_FEATURES, 32),
                                     "[cls]": nn.Linear(32, 24), "out": nn.Linear(24, CLASSES)})

    def forward(self, x):
        x = self.layers["[/]"](x).relu()
        return self.layers["out"](self.layers["[cls]"](x).relu())


def bracketed() -> nn.Module:
    return _Bracketed()
