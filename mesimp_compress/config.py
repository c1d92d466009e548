"""CompressConfig: every setting of a compression run, validated, loadable from TOML.

A recipe file holds the same keys as the dataclass fields (``prune_rate`` or ``prune-rate``);
unknown keys and values of the wrong type are errors, never ignored.
"""

from __future__ import annotations

import dataclasses
import math
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import torch

from .errors import ConfigError, KError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

MODES = ("unified", "per_example")
OPTIMIZERS = ("adam", "adamw", "sgd")
NORMAL_BACKPROP = ("dense", "meprop")
COMPENSATE = ("off", "mean", "linear")
MAX_THREADS = 1024  # OpenMP tries to allocate a pool for any count: 10**9 aborts the process


@dataclass
class CompressConfig:
    """Settings of one compression run (the paper's names where it has one)."""

    k: int | float = 0.25
    """meProp top-k per layer: an int, or a fraction of the layer's width. With unified
    top-k the width converges to k, so k is in effect the target width."""
    mode: str = "unified"
    """meProp top-k: "unified" (one top-k over |dy| summed over the batch, shared by it) or
    "per_example" (each example its own top-k, as in the paper's CPU code)."""
    prune_rate: float = 0.1
    """A unit with hits < prune_rate * examples_in_window is removed after each window."""
    window: float = 0.125
    """Window length as a fraction of an epoch (the paper: 1/8)."""
    epochs: int = 2
    """Epochs of each pruning cycle and of each normal cycle."""
    epoch_batches: int | None = None
    """Batches that make one epoch (None: a whole pass over the train data, counted by
    ``len()`` or, without one, by a first pass). Needed for an endless stream; with finite
    data, an epoch is at most one pass."""
    cycles: int = 1
    """How many (pruning cycle, normal cycle) pairs to run."""
    recovery_epochs: int = 2
    """Extra normal epochs after the last cycle (recovery fine-tuning)."""
    lr: float = 1e-3
    """Learning rate of the fine-tuning optimizer."""
    optimizer: str = "adam"
    """"adam", "adamw" or "sgd" (momentum 0.9)."""
    weight_decay: float = 0.0
    """L2 weight decay (adamw: decoupled)."""
    sparse_update: bool = False
    """Row-sparse optimizer step during meProp phases (only rows with a gradient move)."""
    normal_backprop: str = "dense"
    """Backprop in normal cycles: "dense" (measured better) or "meprop" (the paper)."""
    sparse_bias: bool = False
    """Give the bias the top-k gradient too (default: dense, as in the paper)."""
    min_width: int = 4
    """Never shrink a layer below this many units."""
    round_to: int = 1
    """Round kept widths up to a multiple of this (8 or 16 suit ORT's kernels)."""
    include: list[str] = field(default_factory=list)
    """Module-name patterns (fnmatch) of the layers to prune; empty: every prunable layer."""
    exclude: list[str] = field(default_factory=list)
    """Module-name patterns of layers to leave alone."""
    output_layer: str | None = None
    """The model's output layer, never pruned (None: found from the trace)."""
    allow_residual: bool = False
    """Prune units coupled through residual adds (every writer shares one index set); units
    coupled by a product (a gate: SwiGLU FFNs, squeeze-and-excitation) are pruned together
    either way."""
    compensate: str = "linear"
    """What the layers reading removed units get instead: "off" (nothing), "mean" (their
    mean, folded into the consumer's bias) or "linear" (their least-squares prediction
    from the kept units, folded into the consumer's weight and bias; measured on the MLP:
    +0.8 points, ahead of the Torch-Pruning peer). TOML/API booleans mean "mean" (true) and
    "off" (false)."""
    distill: float = 0.5
    """Weight of distillation from the original model (0 = task loss only)."""
    distill_layers: list[str] = field(default_factory=list)
    """Module-name patterns whose outputs are matched to the original model's (layer
    distillation: relative squared error, weight ``layer_weight``); for layers whose output
    keeps its width, e.g. ``"encoder.layer.*"`` of a transformer whose FFNs are pruned."""
    layer_weight: float = 1.0
    """Weight of the layer distillation loss."""
    temperature: float = 2.0
    """Softmax temperature of the distillation from the original's logits."""
    max_drop: float | None = None
    """Roll back a prune whose metric falls more than this below the original (rises above
    it, with ``greater_is_better = false``)."""
    recovery_windows: int = 2
    """Windows after a prune, its own window included, at whose end max_drop checks the
    metric (1: right after the prune; a run that ends earlier checks at its end)."""
    greater_is_better: bool = True
    """Whether a higher metric is better (accuracy, cosine) or a lower one (error, loss,
    perplexity): the direction max_drop measures a drop in."""
    batch_dim: int = 0
    """The dim of the model's inputs that indexes examples: 0 (batch first) or 1 (time-major
    sequences (T, B, ...), as nn.LSTM / nn.GRU / nn.Transformer take them by default). Metrics
    weigh batches by it, and the ONNX files take any size of it; a 1-D input (lengths) has
    its batch at dim 0 either way. (meProp's per_example mode takes the examples of a Linear
    from dim 0 of its input, positions from the rest.)"""
    device: str = "cpu"
    """Where to fine-tune: "cpu", "cuda", "cuda:N" (or a torch.device)."""
    threads: int | None = None
    """torch threads for fine-tuning (None: torch's default)."""
    seed: int = 0
    """Seed of every random generator the run uses."""
    batches: list[int] = field(default_factory=lambda: [1, 8, 64])
    """Batch sizes of the latency benchmark."""
    bench_threads: int = 1
    """A thread count to time at besides 1 and every core (the benchmark runs each of
    {1, bench_threads, cpu_count})."""
    bench_seq: int | None = None
    """Sequence length of the latency benchmark (None: that of the first training batch)."""
    quantize: bool = False
    """Also export, check and time a dynamically quantised int8 model of the result."""
    opset: int | None = None
    """ONNX opset to export with (None: the exporter's default)."""
    atol: float = 1e-4
    """Parity: absolute tolerance of onnxruntime against PyTorch."""
    rtol: float = 1e-3
    """Parity: relative tolerance (|ort - torch| <= atol + rtol * |torch|)."""

    def __new__(cls, *args: Any, **kwargs: Any) -> CompressConfig:
        # a misspelt key is a ConfigError like any bad setting, not the dataclass's TypeError
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(kwargs) - known)
        if unknown:
            raise ConfigError(
                f"unknown key {unknown[0]!r}; valid keys: {', '.join(sorted(known))}"
            )
        return super().__new__(cls)

    def __post_init__(self) -> None:
        self.validate()

    # ------------------------------------------------------------------ validation
    def validate(self) -> None:
        """Raise ConfigError (KError for k) naming the first bad setting."""
        _check_k(self.k)
        _choice("mode", self.mode, MODES)
        _choice("optimizer", self.optimizer, OPTIMIZERS)
        _choice("normal_backprop", self.normal_backprop, NORMAL_BACKPROP)
        if isinstance(self.compensate, bool):  # the earlier on/off switch
            self.compensate = "mean" if self.compensate else "off"
        _choice("compensate", self.compensate, COMPENSATE)
        _range("prune_rate", self.prune_rate, 0.0, 1.0, low_open=False)
        _range("window", self.window, 0.0, 1.0, low_open=True)
        for name in ("epochs", "cycles"):
            if _is_int(getattr(self, name)) and getattr(self, name) == 0:
                raise ConfigError(
                    f"{name} = 0 leaves no pruning epoch, so nothing would be pruned; "
                    "`mesimp export` exports a model as it is"
                )
        _int_min("epochs", self.epochs, 1)
        if self.epoch_batches is not None:
            _int_min("epoch_batches", self.epoch_batches, 1)
        _int_min("cycles", self.cycles, 1)
        _int_min("recovery_epochs", self.recovery_epochs, 0)
        _range("lr", self.lr, 0.0, FLOAT32_MAX, low_open=True)
        _range("weight_decay", self.weight_decay, 0.0, FLOAT32_MAX, low_open=False)
        if self.sparse_update and self.optimizer == "adamw" and self.weight_decay > 0:
            raise ConfigError(
                "sparse_update steps adam or sgd: adamw's decoupled weight decay would move "
                "every row each step; use optimizer = 'adam' (L2 decay on the updated rows) "
                "or weight_decay = 0"
            )
        _int_min("min_width", self.min_width, 1)
        _int_min("round_to", self.round_to, 1)
        _int_min("batch_dim", self.batch_dim, 0, 1)
        _range("distill", self.distill, 0.0, FLOAT32_MAX, low_open=False)
        _range("temperature", self.temperature, 0.0, FLOAT32_MAX, low_open=True)
        _range("layer_weight", self.layer_weight, 0.0, FLOAT32_MAX, low_open=False)
        if self.max_drop is not None:
            _range("max_drop", self.max_drop, 0.0, math.inf, low_open=False)
        _int_min("recovery_windows", self.recovery_windows, 1)
        if self.threads is not None:
            _int_min("threads", self.threads, 1, MAX_THREADS)
        _int_min("seed", self.seed, 0, 2**32 - 1)  # NumPy's seed range
        _int_min("bench_threads", self.bench_threads, 1, MAX_THREADS)
        if self.bench_seq is not None:
            _int_min("bench_seq", self.bench_seq, 1, 1 << 20)
        if self.opset is not None:
            check_opset(self.opset)
        if not self.batches or any(not _is_int(b) or b < 1 for b in self.batches):
            raise ConfigError(
                f"batches must be a non-empty list of positive ints, got {self.batches!r}"
            )
        for name in ("include", "exclude", "distill_layers"):
            value = getattr(self, name)
            if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                raise ConfigError(f"{name} must be a list of module-name patterns, got {value!r}")
        if isinstance(self.device, torch.device):
            self.device = str(self.device)
        for name in sorted(_BOOL_KEYS):  # a string such as "no" would read as true
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"{name} must be true or false, got {getattr(self, name)!r}")
        if self.output_layer is not None and not isinstance(self.output_layer, str):
            raise ConfigError(
                f"output_layer must be a module name or None, got {self.output_layer!r}"
            )
        if not isinstance(self.device, str) or not self.device:
            raise ConfigError(
                f"device must be a string like 'cpu' or 'cuda:0', got {self.device!r}"
            )
        _range("atol", self.atol, 0.0, math.inf, low_open=True)
        _range("rtol", self.rtol, 0.0, math.inf, low_open=False)

    # ------------------------------------------------------------------ (de)serialisation
    def to_dict(self) -> dict[str, Any]:
        """Plain-data copy of every setting (for report.json)."""
        return dataclasses.asdict(self)

    @classmethod
    def keys(cls) -> list[str]:
        """Names of every setting."""
        return [f.name for f in fields(cls)]

    @classmethod
    def from_dict(cls, values: dict[str, Any], *, source: str = "config") -> CompressConfig:
        """Build from a mapping; hyphens in keys are accepted; unknown keys are errors."""
        if not isinstance(values, Mapping):
            raise ConfigError(
                f"{source}: settings must be a mapping of keys to values, got "
                f"{type(values).__name__}"
            )
        known = {f.name: f for f in fields(cls)}
        clean: dict[str, Any] = {}
        spelled: dict[str, Any] = {}
        for raw_key, value in values.items():
            key = str(raw_key).replace("-", "_")
            if key not in known:
                raise ConfigError(
                    f"{source}: unknown key {raw_key!r}; valid keys: {', '.join(sorted(known))}"
                )
            if key in clean:
                raise ConfigError(
                    f"{source}: {key} is given twice (as {spelled[key]!r} and {raw_key!r})"
                )
            spelled[key] = raw_key
            clean[key] = _coerce(key, value, source)
        return cls(**clean)

    @classmethod
    def from_toml(cls, path: str | Path) -> CompressConfig:
        """Read a recipe file (a flat TOML table, or one under ``[compress]``)."""
        return cls.from_dict(read_toml(path), source=str(path))

    def replace(self, **changes: Any) -> CompressConfig:
        """A copy with some settings changed (validated)."""
        return CompressConfig.from_dict({**self.to_dict(), **changes})


def read_toml(path: str | Path) -> dict[str, Any]:
    """Read a recipe's key/value table; ConfigError for a missing or malformed file."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file not found: {p}")
    try:
        data = tomllib.loads(p.read_text(encoding="utf-8-sig"))  # a BOM is no TOML
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{p}: malformed TOML: {exc}") from None
    if set(data) == {"compress"} and isinstance(data["compress"], dict):
        data = data["compress"]
    return data


# ---------------------------------------------------------------------- helpers
_FLOAT_KEYS = {
    "prune_rate",
    "window",
    "lr",
    "weight_decay",
    "layer_weight",
    "distill",
    "temperature",
    "max_drop",
    "atol",
    "rtol",
}
_INT_KEYS = {
    "epochs",
    "epoch_batches",
    "cycles",
    "recovery_epochs",
    "min_width",
    "round_to",
    "batch_dim",
    "recovery_windows",
    "threads",
    "seed",
    "bench_threads",
    "bench_seq",
    "opset",
}
_BOOL_KEYS = {"sparse_update", "sparse_bias", "allow_residual", "quantize", "greater_is_better"}
_STR_KEYS = {"mode", "optimizer", "normal_backprop", "device", "output_layer"}
_LIST_KEYS = {"include", "exclude", "batches", "distill_layers"}


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _coerce(key: str, value: Any, source: str) -> Any:
    def bad(expected: str) -> ConfigError:
        return ConfigError(f"{source}: {key} must be {expected}, got {value!r}")

    if value is None and key in {"max_drop", "threads", "opset", "output_layer", "bench_seq",
                                 "epoch_batches"}:
        return None
    if key == "k":
        return value  # validated by _check_k with its own message
    if key in _FLOAT_KEYS:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise bad("a number")
        return float(value)
    if key in _INT_KEYS:
        if not _is_int(value):
            raise bad("an integer")
        return value
    if key in _BOOL_KEYS:
        if not isinstance(value, bool):
            raise bad("true or false")
        return value
    if key == "compensate":
        if isinstance(value, bool):
            return "mean" if value else "off"
        if not isinstance(value, str):
            raise bad(f"one of {', '.join(COMPENSATE)} (or true/false)")
        return value
    if key == "device" and isinstance(value, torch.device):
        return str(value)
    if key in _STR_KEYS:
        if not isinstance(value, str):
            raise bad("a string")
        return value
    if key in _LIST_KEYS:
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            raise bad("a list")
        if key == "batches":
            out = []
            for v in value:
                if isinstance(v, str) and v.strip().isdigit():
                    v = int(v)
                if not _is_int(v):
                    raise bad("a list of positive ints")
                out.append(v)
            return out
        return list(value)
    return value


def _check_k(k: Any) -> None:
    if isinstance(k, bool) or not isinstance(k, (int, float)):
        raise KError(f"k must be a positive int or a fraction in (0, 1], got {k!r}")
    if isinstance(k, float):
        if not (0.0 < k <= 1.0) or math.isnan(k):
            raise KError(f"k as a fraction must lie in (0, 1], got {k!r}")
    elif k < 1:
        raise KError(f"k must be >= 1, got {k!r}")


def _choice(name: str, value: Any, valid: tuple[str, ...]) -> None:
    if value not in valid:
        raise ConfigError(f"{name} must be one of {', '.join(valid)}; got {value!r}")


# the largest float32: learning rates, decays and loss weights multiply float32 tensors
FLOAT32_MAX = 3.4028234663852886e38


def _range(name: str, value: Any, low: float, high: float, *, low_open: bool) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ConfigError(f"{name} must be a finite number, got {value!r}")
    ok_low = value > low if low_open else value >= low
    if not ok_low or value > high:
        bracket = "(" if low_open else "["
        raise ConfigError(f"{name} must lie in {bracket}{low}, {high}], got {value!r}")


MIN_OPSET = 7
"""The oldest ONNX opset torch.onnx exports to (the newest is the installed onnx's)."""


def check_opset(opset: Any) -> None:
    """ConfigError unless ``opset`` is an ONNX opset torch.onnx can write here."""
    import onnx

    _int_min("opset", opset, MIN_OPSET, onnx.defs.onnx_opset_version())


def _int_min(name: str, value: Any, low: int, high: int | None = None) -> None:
    if not _is_int(value) or value < low:
        raise ConfigError(f"{name} must be an integer >= {low}, got {value!r}")
    if high is not None and value > high:
        raise ConfigError(f"{name} must be an integer <= {high}, got {value!r}")
