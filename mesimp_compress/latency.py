"""Interleaved latency benchmark of ONNX models in onnxruntime, and the dense reference.

Every model gets the same session options (:func:`~mesimp_compress.verify.make_session`:
optimisation level ALL, pinned intra-op threads, one inter-op thread, sequential) and the
same inputs, resized from the example inputs to each batch size (and sequence length).
After ``warmup`` calls each, the models run in ``rounds`` rounds; in a round each model
makes ``block`` consecutive calls, and the order of the models rotates from round to round.
Every call is timed on its own.

Per model: median, p10 and p90 of the per-call times. Speedup of a model over the baseline
(the first model): ``median(baseline) / median(model)``; its spread is the p10..p90 range of
the per-round ratios ``median_in_round(baseline) / median_in_round(model)``, which pairs
calls made seconds apart and so cancels slow drifts of a shared machine.

:func:`dense_twin` builds the physical reference: the compressed model with every layer
rebuilt as a fresh plain torch module of the same shape. Exported and timed beside the
compressed model, it should run as fast: surgery must cost nothing at inference.
"""

from __future__ import annotations

import copy
import math
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn.utils import parametrize

from .config import MAX_THREADS
from .errors import ConfigError, DataError, ShapeError
from .events import EventSink, emit
from .inputs import BATCH, SEQ, check_bytes, resize_inputs
from .verify import feed, make_session, one_line


@dataclass
class Timing:
    """Per-call latency of one model in one setting, in milliseconds."""

    median_ms: float
    p10_ms: float
    p90_ms: float
    mean_ms: float
    calls: int


@dataclass
class Speedup:
    """``value = median(baseline) / median(model)``; ``low``..``high``: the p10..p90 range of
    the per-round ratios."""

    value: float
    low: float
    high: float


@dataclass
class LatencyRow:
    """All models at one batch size, sequence length and thread count."""

    batch: int
    seq: int | None
    threads: int
    timings: dict[str, Timing]
    speedups: dict[str, Speedup]


@dataclass
class LatencyResult:
    """A whole benchmark: the models, the settings, and one row per (threads, batch)."""

    labels: list[str]
    baseline: str
    settings: dict[str, Any]
    rows: list[LatencyRow] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form, rows flattened to ``{label}_median_ms`` / ``_p90_ms`` / ``speedup``."""
        return {
            "models": list(self.labels),
            "baseline": self.baseline,
            "settings": dict(self.settings),
            "rows": [flat_row(r, self.baseline) for r in self.rows],
        }


def flat_row(row: LatencyRow, baseline: str) -> dict[str, Any]:
    """One row as flat keys: batch, seq, threads, ``{label}_median_ms``, ``{label}_p90_ms``,
    ``{label}_p10_ms`` and, for every non-baseline model, ``{label}_speedup`` with
    ``_low``/``_high``; the first of them also as plain ``speedup``."""
    out: dict[str, Any] = {"batch": row.batch, "seq": row.seq, "threads": row.threads}
    for label, t in row.timings.items():
        out[f"{label}_median_ms"] = t.median_ms
        out[f"{label}_p10_ms"] = t.p10_ms
        out[f"{label}_p90_ms"] = t.p90_ms
    for i, (label, s) in enumerate(row.speedups.items()):
        if i == 0:
            out.update(speedup=s.value, speedup_low=s.low, speedup_high=s.high)
        out[f"{label}_speedup"] = s.value
        out[f"{label}_speedup_low"] = s.low
        out[f"{label}_speedup_high"] = s.high
    return out


def benchmark(
    models: Mapping[str, str | os.PathLike[str]],
    example_inputs: Sequence[torch.Tensor],
    *,
    batches: Sequence[int] = (1, 8, 64),
    seq: int | None = None,
    threads: Sequence[int] = (1,),
    warmup: int = 10,
    rounds: int = 30,
    block: int = 10,
    max_seconds: float | None = None,
    axes: Sequence[Mapping[int, str]] | None = None,
    input_names: Sequence[str] | None = None,
    sink: EventSink | None = None,
) -> LatencyResult:
    """Time ``models`` (label -> ONNX file; the first is the baseline) interleaved at each
    thread count and batch size. ``max_seconds`` caps one (threads, batch) cell: rounds stop
    early once it is spent (at least 3 rounds run)."""
    labels = list(models)
    if len(labels) < 1:
        raise ConfigError("benchmark needs at least one model")
    check_settings(batches=batches, threads=threads, rounds=rounds, block=block,
                   warmup=warmup, max_seconds=max_seconds, seq=seq)
    if seq is None:  # the example's own length is timed: say which
        seq = example_seq(example_inputs, axes)
    settings = {
        "warmup": warmup,
        "rounds": rounds,
        "block": block,
        "max_seconds": max_seconds,
        "graph_optimization_level": "ORT_ENABLE_ALL",
        "inter_op_threads": 1,
        "execution_mode": "ORT_SEQUENTIAL",
        "threads": [int(t) for t in threads],
        "batches": [int(b) for b in batches],
        "seq": seq,
        "spread": "p10..p90 of per-round median ratios",
    }
    result = LatencyResult(labels, labels[0], settings)
    for n_threads in threads:
        sessions = {
            label: make_session(path, threads=int(n_threads)) for label, path in models.items()
        }
        for b in batches:
            inputs = resize_inputs(example_inputs, int(b), seq=seq, axes=axes)
            feeds = {label: feed(s, inputs, input_names) for label, s in sessions.items()}
            emit(sink, "bench_start", batch=int(b), seq=seq, threads=int(n_threads))
            row = _measure(
                sessions, feeds, int(b), seq, int(n_threads), warmup, rounds, block, max_seconds
            )
            result.rows.append(row)
            emit(sink, "bench_row", row=flat_row(row, result.baseline))
    return result


def example_seq(inputs: Sequence[Any], axes: Sequence[Mapping[int, str]] | None) -> int | None:
    """The length of the first ``"seq"`` axis of ``inputs`` (None without one)."""
    for x, named in zip(inputs, axes or (), strict=False):
        for dim, name in named.items():
            if name == SEQ and isinstance(x, torch.Tensor) and dim < x.dim():
                return int(x.shape[dim])
    return None


def check_settings(*, batches: Sequence[int], threads: Sequence[int], rounds: int, block: int,
                   warmup: int, max_seconds: float | None, seq: int | None) -> None:
    """ConfigError naming the first benchmark setting that cannot be run."""
    if not batches or any(int(b) < 1 for b in batches):
        raise ConfigError(f"batch sizes must be positive ints, got {list(batches)}")
    if not threads or any(not 1 <= int(t) <= MAX_THREADS for t in threads):
        raise ConfigError(
            f"thread counts must be ints in [1, {MAX_THREADS}], got {list(threads)}"
        )
    if rounds < 1 or block < 1 or warmup < 0:
        raise ConfigError(
            f"need rounds >= 1, block >= 1, warmup >= 0 (got {rounds}, {block}, {warmup})"
        )
    if max_seconds is not None and not 0 <= max_seconds < math.inf:
        raise ConfigError(f"max_seconds must be a finite number of seconds >= 0, got {max_seconds}")
    if seq is not None and seq < 1:
        raise ConfigError(f"the sequence length must be >= 1, got {seq}")


def _measure(
    sessions: Mapping[str, Any],
    feeds: Mapping[str, dict[str, np.ndarray]],
    batch: int,
    seq: int | None,
    threads: int,
    warmup: int,
    rounds: int,
    block: int,
    max_seconds: float | None,
) -> LatencyRow:
    labels = list(sessions)
    for label in labels:
        try:
            sessions[label].run(None, feeds[label])
        except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own error types
            detail = one_line(exc)
            at = f"batch {batch}" + (f", sequence length {seq}" if seq is not None else "")
            raise ShapeError(
                f"onnxruntime cannot run '{label}' on synthesised inputs at {at}: {detail}"
            ) from None
        for _ in range(warmup):
            sessions[label].run(None, feeds[label])
    calls: dict[str, list[float]] = {label: [] for label in labels}
    per_round: dict[str, list[float]] = {label: [] for label in labels}
    clock = time.perf_counter_ns
    start = clock()
    for r in range(rounds):
        k = r % len(labels)
        for label in labels[k:] + labels[:k]:
            run, data, times = sessions[label].run, feeds[label], []
            for _ in range(block):
                t0 = clock()
                run(None, data)
                times.append((clock() - t0) / 1e6)
            calls[label].extend(times)
            per_round[label].append(float(np.median(times)))
        if max_seconds is not None and r >= 2 and (clock() - start) / 1e9 > max_seconds:
            break
    timings = {label: _timing(calls[label]) for label in labels}
    base = np.asarray(per_round[labels[0]])
    speedups = {}
    for label in labels[1:]:
        ratios = base / np.asarray(per_round[label])
        speedups[label] = Speedup(
            timings[labels[0]].median_ms / timings[label].median_ms,
            float(np.percentile(ratios, 10)),
            float(np.percentile(ratios, 90)),
        )
    return LatencyRow(batch, seq, threads, timings, speedups)


def _timing(times: list[float]) -> Timing:
    a = np.asarray(times)
    return Timing(
        float(np.median(a)),
        float(np.percentile(a, 10)),
        float(np.percentile(a, 90)),
        float(a.mean()),
        int(a.size),
    )


def dense_twin(model: nn.Module) -> nn.Module:
    """The physical reference: a copy of ``model`` in which every Linear, Conv, BatchNorm,
    LayerNorm, Embedding, LSTM and GRU is a freshly built plain torch module of the same
    shape (same weights, so the same outputs), and no module keeps a hook. Timed against the
    compressed model, it shows whether surgery left any cost behind. A subclass of those
    becomes the plain module too, without state of its own and its own forward: its
    outputs may then differ, which a timing reference allows."""
    twin = copy.deepcopy(model).cpu().eval()
    for module in twin.modules():
        module._forward_hooks.clear()
        module._forward_pre_hooks.clear()
        for name, child in list(module.named_children()):
            if parametrize.is_parametrized(child):  # its weight is computed: leave it as it is
                continue
            fresh = _fresh(child)
            if fresh is None:
                continue
            state = child.state_dict()
            floating = [t.dtype for t in state.values() if t.is_floating_point()]
            if floating:  # built in the default dtype; a float64 model stays float64
                fresh.to(floating[0])
            # a subclass's own state (a scale buffer) stays behind with its own forward
            if fresh.load_state_dict(state, strict=False).missing_keys:
                continue
            setattr(module, name, fresh.eval())
    return twin


def _fresh(m: nn.Module) -> nn.Module | None:
    bias = getattr(m, "bias", None) is not None
    if isinstance(m, nn.Linear):
        return nn.Linear(m.in_features, m.out_features, bias=bias)
    if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
        base = next(c for c in (nn.Conv1d, nn.Conv2d, nn.Conv3d) if isinstance(m, c))
        return base(
            m.in_channels,
            m.out_channels,
            m.kernel_size,
            m.stride,
            m.padding,
            m.dilation,
            m.groups,
            bias,
            m.padding_mode,
        )
    if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)):
        base = next(c for c in (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d) if isinstance(m, c))
        return base(m.num_features, m.eps, m.momentum, m.affine, m.track_running_stats)
    if isinstance(m, nn.LayerNorm):
        return nn.LayerNorm(m.normalized_shape, m.eps, m.elementwise_affine, bias=bias)
    if isinstance(m, nn.Embedding):
        return nn.Embedding(
            m.num_embeddings,
            m.embedding_dim,
            m.padding_idx,
            m.max_norm,
            m.norm_type,
            m.scale_grad_by_freq,
            m.sparse,
        )
    if isinstance(m, nn.LSTM):
        return nn.LSTM(
            m.input_size,
            m.hidden_size,
            m.num_layers,
            m.bias,
            m.batch_first,
            m.dropout,
            m.bidirectional,
            m.proj_size,
        )
    if isinstance(m, nn.GRU):
        return nn.GRU(
            m.input_size,
            m.hidden_size,
            m.num_layers,
            m.bias,
            m.batch_first,
            m.dropout,
            m.bidirectional,
        )
    return None


def inputs_from_onnx(
    path: str | os.PathLike[str], *, batch: int = 2, seq: int = 16, seed: int = 0,
    sizes: Mapping[str, int] | None = None,
) -> tuple[tuple[torch.Tensor, ...], list[dict[int, str]], list[str]]:
    """Example inputs built from an ONNX file's input signature: ``(inputs, axes, names)``.

    A symbolic dim is the batch when named like one (else at position 0) and the sequence
    when named ``seq...`` or ``len...`` (else at position 1), so time-major files ('seq',
    'batch') are sized right; float inputs are random normal, integer inputs 1 (a valid
    token id and mask value), bool inputs True. In a file with a sequence axis, a 1-D
    integer input of one value per example is read as the sequences' lengths and set to
    ``seq`` (a packed LSTM then runs every step). Any other symbolic dim (an image size
    ``compress`` found varying) takes its size from ``sizes`` by name."""
    sizes = dict(sizes or {})
    graph = _graph_of(path)
    initializers = {i.name for i in graph.initializer}
    generator = torch.Generator().manual_seed(seed)
    inputs, axes, names = [], [], []
    need = 0
    symbolic = {d.dim_param for v in graph.input for d in v.type.tensor_type.shape.dim
                if d.HasField("dim_param")}
    unknown = sorted(set(sizes) - symbolic)
    if unknown:
        raise ConfigError(
            f"{os.fspath(path)} has no symbolic axis {', '.join(map(repr, unknown))}; its "
            f"symbolic axes: {', '.join(sorted(symbolic)) or 'none'}"
        )
    for value in graph.input:
        if value.name in initializers:
            continue
        tensor_type = value.type.tensor_type
        dtype = _TORCH_OF_ONNX.get(tensor_type.elem_type)
        if dtype is None:
            raise ShapeError(
                f"input '{value.name}' of {os.fspath(path)} has an element type "
                f"({tensor_type.elem_type}) the benchmark cannot synthesise"
            )
        shape, entry = [], {}
        for i, dim in enumerate(tensor_type.shape.dim):
            if dim.HasField("dim_value"):
                shape.append(dim.dim_value)
                continue
            label = dim.dim_param.lower()
            named_seq = "seq" in label or "len" in label
            if dim.dim_param in sizes:  # timed at that one size
                shape.append(int(sizes[dim.dim_param]))
                continue
            if "batch" in label or (i == 0 and not named_seq):
                entry[i], size = BATCH, batch
            elif named_seq or i == 1:
                entry[i], size = SEQ, seq
            else:
                raise ShapeError(
                    f"input '{value.name}' dim {i} ('{dim.dim_param}') is neither a "
                    f"batch nor a sequence axis: give its size (--size {dim.dim_param}=N)"
                )
            shape.append(size)
        need += math.prod(shape) * dtype.itemsize
        check_bytes(need, f"shape {shape} (input '{value.name}')")
        if dtype.is_floating_point:
            x = torch.randn(shape, generator=generator).to(dtype)
        elif dtype == torch.bool:
            x = torch.ones(shape, dtype=torch.bool)
        else:
            x = torch.ones(shape, dtype=dtype)
        inputs.append(x)
        axes.append(entry)
        names.append(value.name)
    if any(SEQ in a.values() for a in axes):  # per-example integers: sequence lengths
        inputs = [x.fill_(seq) if a == {0: BATCH} and x.dim() == 1 and not x.is_floating_point()
                  and x.dtype != torch.bool else x for x, a in zip(inputs, axes, strict=True)]
    return tuple(inputs), axes, names


_TORCH_OF_ONNX = {
    1: torch.float32,
    10: torch.float16,
    11: torch.float64,
    16: torch.bfloat16,
    6: torch.int32,
    7: torch.int64,
    9: torch.bool,
    2: torch.uint8,
    3: torch.int8,
}


def _graph_of(path: str | os.PathLike[str]) -> Any:
    """The graph of an ONNX file (without external data); DataError if it is not one."""
    import onnx

    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # noqa: BLE001 - protobuf raises its own decode errors
        raise DataError(f"{Path(path).name} is not an ONNX model: {one_line(exc)}") from None
    graph = model.graph
    if not graph.node and not graph.input and not graph.output:
        raise DataError(f"{Path(path).name} is not an ONNX model: it holds no graph")
    return graph


def signature_of(path: str | os.PathLike[str]) -> list[tuple[str, int, list[Any]]]:
    """``(name, element type, dims)`` of each graph input (dims: int or symbolic name)."""
    graph = _graph_of(path)
    initializers = {i.name for i in graph.initializer}
    return [
        (
            v.name,
            v.type.tensor_type.elem_type,
            [
                d.dim_value if d.HasField("dim_value") else d.dim_param
                for d in v.type.tensor_type.shape.dim
            ],
        )
        for v in graph.input
        if v.name not in initializers
    ]


__all__ = [
    "LatencyResult",
    "LatencyRow",
    "Speedup",
    "Timing",
    "benchmark",
    "dense_twin",
    "flat_row",
    "inputs_from_onnx",
    "signature_of",
]
