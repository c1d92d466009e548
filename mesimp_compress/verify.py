"""Proof in onnxruntime: ORT outputs agree with PyTorch, and the task metric of an ONNX model.

Parity is checked per output on real inputs, the way ``numpy.allclose`` does it: an output
passes when every element has ``|ort - torch| <= atol + rtol * |torch|``. Reported per output:
``max_abs`` (largest absolute difference), ``max_rel`` (``max_abs`` over the largest
``|torch|`` of that output) and ``worst`` (largest ``|ort - torch| / (atol + rtol*|torch|)``,
so ``worst <= 1`` means it passed). The defaults fit fp32.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils import _pytree as pytree

from . import tasks
from .batches import batch_size, iterate, split_batch, to_device, user_code
from .errors import ConfigError, ExportError, ParityError, ShapeError
from .inputs import default_dynamic_axes, on_device_of, resize_inputs

ATOL = 1e-4
RTOL = 1e-3

OnnxModel = Any  # a path to an .onnx file or an onnxruntime.InferenceSession

_NUMPY_OF_ORT = {
    "tensor(float)": np.float32,
    "tensor(double)": np.float64,
    "tensor(float16)": np.float16,
    "tensor(int64)": np.int64,
    "tensor(int32)": np.int32,
    "tensor(int8)": np.int8,
    "tensor(uint8)": np.uint8,
    "tensor(bool)": np.bool_,
}


def make_session(path: str | os.PathLike[str], *, threads: int = 1) -> Any:
    """An onnxruntime CPU session: optimisation level ALL, ``threads`` intra-op threads,
    one inter-op thread, sequential execution."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = int(threads)
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.log_severity_level = 4  # fatal only: a failed run raises, and we say why in one line
    if not Path(path).is_file():
        raise ExportError(f"ONNX file {str(path)!r} does not exist")
    try:
        return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # noqa: BLE001 - ORT raises its own exception types
        raise ExportError(f"onnxruntime cannot load {Path(path).name}: {one_line(exc)}") from None


def session_of(model: OnnxModel, *, threads: int = 1) -> Any:
    """``model`` itself if it is a session, else a new session of the file."""
    return model if hasattr(model, "get_inputs") else make_session(model, threads=threads)


def feed(
    session: Any, inputs: Sequence[Any], input_names: Sequence[str] | None = None
) -> dict[str, np.ndarray]:
    """The ``{name: array}`` feed for ``inputs`` (by ``input_names`` when given, since an
    exporter may drop an unused input; else by position), cast to the types the model takes."""
    wanted = session.get_inputs()
    arrays = [
        x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x) for x in inputs
    ]
    if input_names is not None:
        if len(input_names) != len(arrays):
            raise ShapeError(
                f"{len(arrays)} inputs given for the {len(input_names)} input names "
                f"{list(input_names)}"
            )
        given = dict(zip(input_names, arrays, strict=True))
        missing = [i.name for i in wanted if i.name not in given]
        if missing:
            raise ShapeError(
                f"the ONNX model takes inputs {missing} that were not given (given: {list(given)})"
            )
        chosen = [given[i.name] for i in wanted]
    else:
        if len(wanted) != len(arrays):
            raise ShapeError(
                f"the ONNX model takes {len(wanted)} inputs "
                f"({', '.join(i.name for i in wanted)}), got {len(arrays)}"
            )
        chosen = arrays
    out = {}
    for info, array in zip(wanted, chosen, strict=True):
        dtype = _NUMPY_OF_ORT.get(info.type)
        out[info.name] = array.astype(dtype, copy=False) if dtype is not None else array
    return out


def run_onnx(
    session: Any, inputs: Sequence[Any], input_names: Sequence[str] | None = None,
    *, where: str = "the inputs",
) -> list[np.ndarray]:
    """The session's outputs for ``inputs``, in the model's output order; ExportError naming
    ``where`` when onnxruntime fails on them."""
    feeds = feed(session, inputs, input_names)
    try:
        return list(session.run(None, feeds))
    except Exception as exc:  # onnxruntime raises its own exception types
        hint = ""
        if "invalid dimensions" in str(exc):
            hint = (" (the file keeps every axis at the size it was exported with but the "
                    "batch, the length of integer token ids and, in compress, the axes that "
                    "differ between the first train batch and the eval batches)")
        raise ExportError(
            f"onnxruntime failed on {where}: {type(exc).__name__}: {one_line(exc)}{hint}"
        ) from exc


def shaped_like(outputs: Sequence[torch.Tensor], like: Any) -> Any:
    """ORT's flat ``outputs`` in the structure of ``like``, one PyTorch output of the same
    model (a tensor, or tuples/lists/dicts of them): each tensor leaf of ``like`` in turn
    takes the next ORT output, and its other leaves (None, numbers) are kept as they are."""
    leaves, spec = pytree.tree_flatten(like)
    flat = iter(outputs)
    return pytree.tree_unflatten(
        [next(flat) if isinstance(leaf, torch.Tensor) else leaf for leaf in leaves], spec
    )


def torch_outputs(model: nn.Module, inputs: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """The model's tensor outputs, flattened in the order the ONNX exporters use."""
    with torch.no_grad():
        out = model(*inputs)
    return [x for x in pytree.tree_leaves(out) if isinstance(x, torch.Tensor)]


# ---------------------------------------------------------------------- parity
@dataclass
class OutputParity:
    """How far one ORT output is from PyTorch's, over all checked batches."""

    name: str
    max_abs: float
    max_rel: float
    worst: float
    passed: bool


@dataclass
class ParityResult:
    """Parity of one ONNX model with its PyTorch model, per output."""

    label: str
    atol: float
    rtol: float
    batches: int
    outputs: list[OutputParity] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        """True when every output is within tolerance."""
        return all(o.passed for o in self.outputs)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready fields, with ``passed``."""
        return {**asdict(self), "passed": self.passed}


def check_parity(
    onnx_model: OnnxModel,
    model: nn.Module,
    batches: Iterable[Sequence[torch.Tensor]],
    *,
    atol: float = ATOL,
    rtol: float = RTOL,
    label: str = "model",
    input_names: Sequence[str] | None = None,
    raise_on_fail: bool = True,
    where: Sequence[str] | None = None,
) -> ParityResult:
    """Compare ORT with PyTorch on each input tuple of ``batches``; ParityError naming the
    worst output when one is beyond tolerance (unless ``raise_on_fail`` is False). ``where``
    names the batches in errors (default: "parity batch N")."""
    if not (0.0 < atol < math.inf and 0.0 <= rtol < math.inf):
        raise ConfigError(f"tolerances must be atol > 0 and rtol >= 0, finite; got atol "
                          f"{atol!r}, rtol {rtol!r}")
    session = session_of(onnx_model)
    names = [o.name for o in session.get_outputs()]
    was_training = model.training
    model.eval()
    stats: dict[str, list[float]] = {}
    worst_at: dict[str, str] = {}  # output -> the batch of its largest scaled error
    count = 0
    try:
        for i, inputs in enumerate(batches):
            inputs = (inputs,) if isinstance(inputs, torch.Tensor) else tuple(inputs)
            batch = where[i] if where is not None and i < len(where) else f"parity batch {i + 1}"
            with user_code("the model", batch):
                expected = torch_outputs(model, on_device_of(model, inputs))
            got = run_onnx(session, inputs, input_names, where=batch)
            if len(got) != len(expected):
                raise ParityError(
                    f"{label}: onnxruntime gives {len(got)} outputs, PyTorch {len(expected)}"
                )
            for name, ort_out, ref in zip(names, got, expected, strict=True):
                ref_np = ref.detach().cpu().numpy()
                if ort_out.shape != ref_np.shape:
                    raise ParityError(
                        f"{label}: output '{name}' has shape {ort_out.shape} in "
                        f"onnxruntime, {ref_np.shape} in PyTorch"
                    )
                stat = stats.setdefault(name, [0.0, 0.0, 0.0])
                before = stat[2]
                _accumulate(stat, ort_out, ref_np, atol, rtol)
                if stat[2] > before or name not in worst_at:
                    worst_at[name] = batch
            count += 1
    finally:
        model.train(was_training)
    if count == 0:
        raise ShapeError(f"{label}: no inputs to check parity on")
    result = ParityResult(
        label,
        atol,
        rtol,
        count,
        [
            OutputParity(n, s[0], s[0] / s[1] if s[1] > 0 else s[0], s[2], s[2] <= 1.0)
            for n, s in stats.items()
        ],
    )
    if raise_on_fail and not result.passed:
        bad = max(result.outputs, key=lambda o: o.worst)
        error = ParityError(
            f"{label}: onnxruntime output '{bad.name}' differs from PyTorch by up to "
            f"{bad.max_abs:.3g} (relative {bad.max_rel:.3g}) on {worst_at[bad.name]}, "
            f"beyond atol {atol:g} + rtol {rtol:g}*|ref|"
        )
        error.where = worst_at[bad.name]
        raise error
    return result


def differences(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, bool]:
    """``|a - b|`` where both are finite (0 elsewhere), and whether a non-finite value
    disagrees: equal infinities (a score masked to -inf in both) and NaN with NaN agree."""
    finite = np.isfinite(a) & np.isfinite(b)
    same = (a == b) | (np.isnan(a) & np.isnan(b))
    diff = np.abs(np.subtract(a, b, out=np.zeros(np.broadcast(a, b).shape), where=finite))
    return diff, bool((~finite & ~same).any())


def _accumulate(
    stat: list[float], got: np.ndarray, ref: np.ndarray, atol: float, rtol: float
) -> None:
    """Fold one output into ``stat`` = [max |got - ref|, max finite |ref|, max scaled error
    (1 = at the tolerance)]. Where either side is not finite, agreement means the very same
    value (NaN with NaN, inf with inf of that sign), else the error is infinite."""
    a, b = got.astype(np.float64), ref.astype(np.float64)
    if a.size == 0:
        return
    diff, mismatch = differences(a, b)
    scaled = diff / (atol + rtol * np.abs(np.where(np.isfinite(b), b, 0.0)))
    stat[0] = max(stat[0], np.inf if mismatch else float(diff.max()))
    stat[1] = max(stat[1], float(np.abs(b[np.isfinite(b)]).max(initial=0.0)))
    stat[2] = max(stat[2], np.inf if mismatch else float(scaled.max()))


def parity_inputs(
    data: Iterable[Any], *, max_batches: int = 3, resize_to: Sequence[int] = (1,), axes: Any = None,
    batch_dim: int = 0,
) -> tuple[list[tuple[torch.Tensor, ...]], list[str]]:
    """Inputs of up to ``max_batches`` real batches of ``data`` (those with examples), plus
    the first resized to each size in ``resize_to`` (so the dynamic batch axis is exercised
    too); and how errors name each."""
    picked: list[tuple[torch.Tensor, ...]] = []
    names: list[str] = []
    for i, batch in enumerate(iterate(data, where="eval data")):
        inputs, _ = split_batch(batch, where="eval data")
        if batch_size(inputs, batch_dim) == 0:
            continue  # no example to compare
        picked.append(tuple(to_device(inputs, "cpu", where=f"eval batch {i + 1}")))
        names.append(f"eval batch {i + 1}")
        if len(picked) >= max_batches:
            break
    if not picked:
        raise ShapeError("eval data: no batches with examples to check parity on")
    if axes is None and resize_to:
        axes = default_dynamic_axes(picked[0], batch_dim)
    for size in resize_to:
        picked.append(resize_inputs(picked[0], size, axes=axes))
        names.append(f"{names[0]} resized to batch {size}")
    return picked, names


# ---------------------------------------------------------------------- metric
def evaluate_onnx(
    onnx_model: OnnxModel,
    data: Iterable[Any],
    metric: Any = None,
    *,
    input_names: Sequence[str] | None = None,
    like: Any = None,
    batch_dim: int = 0,
) -> float:
    """The task metric (accuracy by default) of the ONNX model over all of ``data``. The
    outputs go to ``metric(outputs, targets)`` as tensors, in the structure of ``like`` (one
    output of the PyTorch model, e.g. a dict) when given, else one tensor or a tuple."""
    session = session_of(onnx_model)
    metric = metric or tasks.accuracy
    total = count = 0.0
    batches = 0
    for i, batch in enumerate(iterate(data, where="eval data")):
        inputs, targets = split_batch(batch, where="eval data")
        batches += 1
        if batch_size(inputs, batch_dim) == 0:  # no example to score (a mean would be NaN)
            continue
        flat = run_onnx(session, inputs, input_names, where=f"eval batch {i + 1}")
        outs = [torch.from_numpy(np.asarray(o)) for o in flat]
        if like is not None:
            outputs = shaped_like(outs, like)
        else:
            outputs = outs[0] if len(outs) == 1 else tuple(outs)
        where = f"eval batch {i + 1} (onnxruntime outputs)"
        with user_code("the metric", where):
            value = metric(outputs, targets.cpu() if isinstance(targets, torch.Tensor) else targets)
        s, c = tasks.metric_value(value, batch_size(inputs, batch_dim), where=where)
        total += s
        count += c
    return tasks.mean_of(total, count, batches)


def evaluate_torch(model: nn.Module, data: Iterable[Any], metric: Any = None) -> float:
    """The task metric (accuracy by default) of the PyTorch model over all of ``data``, on
    the device its parameters are on."""
    from .training import evaluate

    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    return evaluate(model, data, metric or tasks.accuracy, device)


def one_line(exc: BaseException, limit: int = 240) -> str:
    """An error's whole message on one line (onnxruntime and protobuf write several)."""
    text = " ".join(str(exc).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


__all__ = [
    "ATOL",
    "RTOL",
    "OutputParity",
    "ParityResult",
    "check_parity",
    "evaluate_onnx",
    "evaluate_torch",
    "feed",
    "make_session",
    "parity_inputs",
    "run_onnx",
    "session_of",
    "shaped_like",
    "torch_outputs",
]
