"""ONNX export with dynamic batch (and sequence) axes, the ONNX checker, and the size check.

:func:`export_onnx` writes one self-contained ``.onnx`` file (no external data) with
``torch.onnx.export(dynamo=True)``; if that exporter fails it falls back to the TorchScript
exporter (``dynamo=False``) and says so in :attr:`ExportResult.fallback_reason`. When both
fail, :class:`ExportError` names the innermost module whose own export fails. The exporters'
progress output, warnings and log records never reach the user's screen.

Inputs are a tuple of tensors with dynamic axes per input (see :mod:`.inputs`): by default
the batch everywhere and the sequence of 2-D integer inputs.

:func:`check_shrunk` proves that a compressed file really is smaller: see :mod:`.sizes`.
"""

from __future__ import annotations

import contextlib
import copy
import io
import logging
import math
import os
import shutil
import sys
import tempfile
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils import _pytree as pytree

from .errors import USER_FAILURES, ConfigError, ExportError, ShapeError, describe, interrupted
from .events import EventSink, emit
from .inputs import (
    BATCH,
    SEQ,
    Axes,
    as_inputs,
    default_dynamic_axes,
    input_names_of,
    on_device_of,
    resize_inputs,
)
from .outputs import check_parent, make_parent, remove_empty
from .sizes import LayerSize, check_shrunk, onnx_layer_sizes, unused_params

EXPORTERS = ("auto", "dynamo", "torchscript")


@dataclass
class ExportResult:
    """What one export wrote: the file, which exporter made it, its inputs and outputs.

    ``input_names`` has one name per example input, in order; the graph lacks the inputs
    the model ignores, and ``dynamic_axes`` lists only those it has.
    """

    path: Path
    exporter: str
    opset: int
    input_names: list[str]
    output_names: list[str]
    dynamic_axes: dict[str, dict[int, str]]
    initializers: int
    initializer_elements: int
    file_bytes: int
    fallback_reason: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready fields (the path as a string)."""
        data = asdict(self)
        data["path"] = str(self.path)
        return data


# ---------------------------------------------------------------------- export
def export_onnx(
    model: nn.Module,
    example_inputs: Any,
    path: str | os.PathLike[str],
    *,
    opset: int | None = None,
    exporter: str = "auto",
    input_names: Sequence[str] | None = None,
    output_names: Sequence[str] | None = None,
    dynamic_axes: Sequence[Axes] | None = None,
    external_data: bool = False,
    sink: EventSink | None = None,
) -> ExportResult:
    """Export ``model`` to one ONNX file at ``path`` with dynamic axes and check it fully.

    ``exporter`` is ``"auto"`` (dynamo, falling back to TorchScript), ``"dynamo"`` or
    ``"torchscript"``. ``external_data`` stores the weights beside the file (dynamo only; for
    models past protobuf's 2 GB). The file appears only once it passed ``onnx.checker``
    (full check, strict shape inference).
    """
    if exporter not in EXPORTERS:
        raise ConfigError(f"exporter must be one of {', '.join(EXPORTERS)}, got {exporter!r}")
    inputs = on_device_of(model, as_inputs(example_inputs))
    axes = (
        [dict(a) for a in dynamic_axes]
        if dynamic_axes is not None
        else default_dynamic_axes(inputs)
    )
    if len(axes) != len(inputs):
        raise ConfigError(f"dynamic_axes has {len(axes)} entries for {len(inputs)} inputs")
    for i, (x, a) in enumerate(zip(inputs, axes, strict=True)):
        for d, name in a.items():
            if not (isinstance(d, int) and 0 <= d < x.dim()):
                raise ConfigError(
                    f"dynamic axis {d!r} ({name}) of input {i} does not exist: the input has "
                    f"{x.dim()} dims (shape {tuple(x.shape)})"
                )
    named: dict[str, tuple[int, int, int]] = {}  # axis name -> (input, dim, size) first seen
    for i, (x, a) in enumerate(zip(inputs, axes, strict=True)):
        for d, name in a.items():
            j, e, size = named.setdefault(name, (i, d, x.shape[d]))
            if x.shape[d] != size:
                raise ShapeError(
                    f"inputs {j} and {i} share the dynamic axis '{name}' but have sizes {size} "
                    f"and {x.shape[d]} there (dims {e} and {d}): an input given whole with "
                    "every batch has no batch axis; leave it out of that input's dynamic axes"
                )
    # batch 1 (or sequence 1) examples let the exporter specialise the axis: export with >= 2
    sizes = {
        name: max(2, x.shape[d]) for x, a in zip(inputs, axes, strict=True) for d, name in a.items()
    }
    inputs = resize_inputs(inputs, sizes.get(BATCH, 2), seq=sizes.get(SEQ), axes=axes)
    in_names = list(input_names) if input_names else input_names_of(model, len(inputs))
    if len(in_names) != len(inputs):
        raise ConfigError(f"{len(in_names)} input names for {len(inputs)} inputs")
    target = Path(path)
    check_parent(target, "ONNX file")
    made = make_parent(target, "ONNX file")
    was_training = model.training
    model.eval()
    try:
        outputs = _run(model, inputs)
        out_names = (
            list(output_names)
            if output_names
            else (["output"] if len(outputs) == 1 else [f"output_{i}" for i in range(len(outputs))])
        )
        if len(out_names) != len(outputs):
            raise ConfigError(f"{len(out_names)} output names for {len(outputs)} outputs")
        job = _Job(model, inputs, axes, in_names, out_names, opset, external_data, outputs)
        try:
            result = _export_with_fallback(job, target, exporter, sink)
        except ExportError as exc:
            if dynamic_axes is not None or not any(SEQ in a.values() for a in axes):
                raise
            # a guessed sequence axis the model does not have (fixed-length integer features,
            # a table of positions): keep the length fixed, only the batch dynamic
            job.axes = [{d: n for d, n in a.items() if n != SEQ} for a in axes]
            fixed = f"the sequence axis is kept fixed ({error_line(exc)})"
            emit(sink, "export_fallback", exporter=exporter, reason=fixed)
            result = _export_with_fallback(job, target, exporter, sink)
            # the report says why the file takes one length only
            result.fallback_reason = "; ".join(filter(None, (fixed, result.fallback_reason)))
    except BaseException:
        remove_empty(made)  # the folders made for a file that never came
        raise
    finally:
        model.train(was_training)
    return result


@dataclass
class _Job:
    model: nn.Module
    inputs: tuple[torch.Tensor, ...]
    axes: list[dict[int, str]]
    input_names: list[str]
    output_names: list[str]
    opset: int | None
    external_data: bool = False
    outputs: Sequence[torch.Tensor] = ()  # PyTorch's, for the example inputs
    # where the TorchScript trace turned a tensor into a Python value (file:line)
    traced_constants: list[str] = field(default_factory=list)


def _export_with_fallback(
    job: _Job, target: Path, exporter: str, sink: EventSink | None
) -> ExportResult:
    order = ["dynamo", "torchscript"] if exporter == "auto" else [exporter]
    failures: list[tuple[str, str]] = []
    for name in order:
        emit(sink, "stage", message=f"exporting {target.name} ({name} exporter)")
        # written under its final name in a hidden folder beside the target, then moved into
        # place (external data first), so a failed export leaves nothing behind
        scratch = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
        try:
            _EXPORT[name](job, scratch / target.name)
            check_onnx(scratch / target.name)
            _check_dynamic(scratch / target.name, job)
            _declare_outputs(scratch / target.name, _check_resized(scratch / target.name, job))
            _check_opset(scratch / target.name, job)
            for part in sorted(scratch.iterdir(), key=lambda p: p.name == target.name):
                os.replace(part, target.parent / part.name)
        except Exception as exc:  # noqa: BLE001 - any exporter failure is reported, typed
            if interrupted(exc):  # Ctrl-C inside torch's lazy imports: not a failure to report
                raise KeyboardInterrupt from exc
            failures.append((name, str(exc) if isinstance(exc, ExportError) else error_line(exc)))
            continue
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
        reason = "; ".join(f"{n} exporter failed: {r}" for n, r in failures) or None
        if job.traced_constants:  # torch's TracerWarning, which quiet() keeps off the screen
            reason = (f"{reason}; " if reason else "") + (
                "the TorchScript trace froze the example's path where the model turns a "
                f"tensor into a Python value ({', '.join(job.traced_constants[:3])}): "
                "inputs that branch otherwise there get wrong outputs")
        if reason:
            emit(sink, "export_fallback", exporter=name, reason=reason)
        return _describe(target, name, job, reason)
    where = _failing_module(job, order[0])
    detail = "; ".join(f"{n}: {r}" for n, r in failures)
    if "Cache" in detail and getattr(getattr(job.model, "config", None), "use_cache", False):
        detail += ("; the model returns its key/value cache (a Hugging Face model with "
                   "config.use_cache = True): set model.config.use_cache = False")
    raise ExportError(f"ONNX export failed{where}: {detail}")


def _export_dynamo(job: _Job, path: Path) -> None:
    dims: dict[str, Any] = {}
    shapes = tuple(
        {d: dims.setdefault(n, torch.export.Dim(n)) for d, n in a.items()} or None for a in job.axes
    )
    with quiet():
        torch.onnx.export(
            job.model,
            job.inputs,
            str(path),
            dynamo=True,
            external_data=job.external_data,
            opset_version=job.opset,
            input_names=job.input_names,
            output_names=job.output_names,
            dynamic_shapes=shapes,
        )


def _export_torchscript(job: _Job, path: Path) -> None:
    axes = {n: dict(a) for n, a in zip(job.input_names, job.axes, strict=True) if a}
    axes.update(zip(job.output_names, _output_axes(job), strict=True))
    with quiet(), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", torch.jit.TracerWarning)
        torch.onnx.export(
            job.model,
            job.inputs,
            str(path),
            dynamo=False,
            opset_version=job.opset,
            input_names=job.input_names,
            output_names=job.output_names,
            dynamic_axes=axes,
            do_constant_folding=True,
        )
    torch_dir = Path(torch.__file__).parent  # torch's own (packing an LSTM's lengths) is safe
    job.traced_constants = list(dict.fromkeys(
        f"{Path(w.filename).name}:{w.lineno}" for w in caught
        if issubclass(w.category, torch.jit.TracerWarning) and "generalize" in str(w.message)
        and not Path(w.filename).is_relative_to(torch_dir)
    ))


_EXPORT: dict[str, Callable[[_Job, Path], None]] = {
    "dynamo": _export_dynamo,
    "torchscript": _export_torchscript,
}


def _output_axes(job: _Job) -> list[dict[int, str]]:
    """Which output dims follow the batch / sequence axes, found by running one size larger."""
    base = [tuple(o.shape) for o in _run(job.model, job.inputs)]
    found: list[dict[int, str]] = [{} for _ in base]
    for name in (BATCH, SEQ):
        sizes = {n: job.inputs[i].shape[d] for i, a in enumerate(job.axes) for d, n in a.items()}
        if name not in sizes:
            continue
        grown = resize_inputs(
            job.inputs,
            sizes.get(BATCH, 2) + (name == BATCH),
            seq=sizes.get(SEQ, 2) + (name == SEQ),
            axes=job.axes,
        )
        outs = _run(job.model, grown, what=f"once its {name} axis grew by one (inputs {{}}); "
                    f"is that axis really dynamic?")
        for axes, before, out in zip(found, base, outs, strict=True):
            changed = [d for d, (a, b) in enumerate(zip(before, out.shape, strict=False)) if a != b]
            axes.update({d: name for d in changed})
    return found


def _check_dynamic(path: Path, job: _Job) -> None:
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    declared = dict(zip(job.input_names, job.axes, strict=True))
    for value in graph.input:
        dims = value.type.tensor_type.shape.dim
        for d, name in declared.get(value.name, {}).items():
            if d < len(dims) and not dims[d].dim_param:
                raise ExportError(
                    f"input '{value.name}' axis {d} ({name}) was exported as the fixed size "
                    f"{dims[d].dim_value}"
                )


def _check_resized(path: Path, job: _Job) -> dict[int, dict[int, str]]:
    """The file must run at other sizes of its dynamic axes and give PyTorch's outputs there:
    an exporter can declare an axis dynamic yet bake its size into a Reshape (the dynamo
    exporter does, for stacked LSTMs) or into pooling windows (adaptive pooling to a fixed
    size). Each axis is tried one longer, else one shorter (a position table may end at the
    example's length); where PyTorch itself fails at both, nothing is checked. Values are
    compared only when the file agrees with PyTorch at the example's own sizes, and only for
    a gross difference (1e-3 of the outputs' scale): a file wrong at every size is the
    parity check's to report (it publishes what it finds). Returns the output axes whose size
    followed the inputs' (output index -> axis -> name), for :func:`_declare_outputs`."""
    from .verify import make_session, run_onnx

    axes = {name: x.shape[d] for x, a in zip(job.inputs, job.axes, strict=True)
            for d, name in a.items()}
    if not axes:
        return {}
    session = make_session(path)
    faithful = _far(run_onnx(session, job.inputs, job.input_names), job.outputs)
    for step in (1, -1):
        sizes = {name: max(1, size + step) for name, size in axes.items()}
        inputs = resize_inputs(job.inputs, sizes.get(BATCH, 2), seq=sizes.get(SEQ),
                               axes=job.axes)
        try:
            expected = _run(job.model, inputs)
        except ShapeError:  # the model's own limit, not the exporter's
            continue
        shapes = ", ".join(str(tuple(x.shape)) for x in inputs)
        got = run_onnx(session, inputs, job.input_names, where=f"inputs resized to {shapes}")
        if len(got) != len(expected):
            raise ExportError(f"at inputs resized to {shapes} the file gives {len(got)} "
                              f"outputs, PyTorch {len(expected)}")
        for i, (g, e) in enumerate(zip(got, expected, strict=True)):
            if tuple(g.shape) != tuple(e.shape):
                raise ExportError(f"at inputs resized to {shapes} the file's output {i} has "
                                  f"shape {tuple(g.shape)}, PyTorch's {tuple(e.shape)}")
        far = _far(got, expected)
        if faithful is None and far is not None:
            i, diff = far
            raise ExportError(
                f"at inputs resized to {shapes} the file's output {i} is {diff:.3g} from "
                "PyTorch's, though they agree at the exported sizes: the model computes with "
                "the size of a dynamic axis when it is exported (adaptive pooling to a fixed "
                "size, a loop over the length), so that axis cannot vary")
        return _varying(job.outputs, expected, axes, sizes)
    return {}


def _varying(at_export: Sequence[torch.Tensor], resized: Sequence[torch.Tensor],
             axes: dict[str, int], sizes: dict[str, int]) -> dict[int, dict[int, str]]:
    """Output axes whose size changed with the inputs', named after the input axis whose
    sizes they took (else ``out<i>_dim<d>``)."""
    varying: dict[int, dict[int, str]] = {}
    for i, (a, b) in enumerate(zip(at_export, resized, strict=False)):
        if not isinstance(a, torch.Tensor) or not isinstance(b, torch.Tensor) or a.dim() != b.dim():
            continue
        for d, (m, n) in enumerate(zip(a.shape, b.shape, strict=True)):
            if m != n:
                named = [k for k, size in axes.items() if size == m and sizes[k] == n]
                varying.setdefault(i, {})[d] = named[0] if len(named) == 1 else f"out{i}_dim{d}"
    return varying


def _declare_outputs(path: Path, varying: dict[int, dict[int, str]]) -> None:
    """Declare the output axes that follow the inputs' sizes symbolic where the exporter
    wrote the example's fixed size: onnxruntime warned on every call at another size
    ("Expected shape {-1,14,6} does not match actual {3,10,6}"). The exporter's shapes of
    inner values (optional hints, with the same fixed sizes) go too: onnxruntime infers
    them from the inputs."""
    if not varying:
        return
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    changed = False
    for i, value in enumerate(model.graph.output):
        dims = value.type.tensor_type.shape.dim
        for d, name in varying.get(i, {}).items():
            if d < len(dims) and dims[d].HasField("dim_value"):
                dims[d].dim_param = name  # (clears dim_value: one of a oneof)
                changed = True
    if changed:
        del model.graph.value_info[:]
        onnx.save(model, str(path))


def _far(got: Sequence[np.ndarray], expected: Sequence[torch.Tensor]) -> tuple[int, float] | None:
    """The first float output where the file is grossly off PyTorch's, with the difference
    (None: every float output within 1e-3 of its scale)."""
    for i, (g, e) in enumerate(zip(got, expected, strict=False)):
        want = e.detach().cpu()
        want = (want.float() if want.dtype == torch.bfloat16 else want).numpy()
        if want.dtype.kind != "f" or not want.size or not np.isfinite(want).all():
            continue
        if tuple(np.shape(g)) != want.shape:
            return i, float("inf")
        diff = float(np.abs(np.asarray(g, dtype=want.dtype) - want).max())
        if diff > 1e-3 * (1.0 + float(np.abs(want).max())):
            return i, diff
    return None


def _check_opset(path: Path, job: _Job) -> None:
    """A requested opset must be the file's: an exporter that could not convert to it
    (the dynamo exporter keeps its own opset then) counts as failed."""
    if job.opset is None:
        return
    got = _opset_of(_load_without_data(path))
    if got != job.opset:
        raise ExportError(f"wrote opset {got}, not the requested {job.opset}")


def _load_without_data(path: Path) -> Any:
    import onnx

    return onnx.load(str(path), load_external_data=False)


def _opset_of(model: Any) -> int:
    return int(next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0))


def check_onnx(path: str | os.PathLike[str]) -> None:
    """Run ``onnx.checker`` with the full check (strict shape inference); ExportError on failure."""
    import onnx

    try:
        onnx.checker.check_model(str(path), full_check=True)
    except Exception as exc:  # noqa: BLE001 - checker and shape inference raise several types
        raise ExportError(f"onnx.checker rejected {Path(path).name}: {error_line(exc)}") from None


def _describe(path: Path, exporter: str, job: _Job, reason: str | None) -> ExportResult:
    import onnx

    model = onnx.load(str(path))
    opset = _opset_of(model)
    inits = model.graph.initializer
    elements = sum(math.prod(init.dims) for init in inits)
    in_graph = {v.name for v in model.graph.input}
    return ExportResult(
        path=path,
        exporter=exporter,
        opset=int(opset),
        input_names=list(job.input_names),
        output_names=[v.name for v in model.graph.output],
        dynamic_axes={
            n: dict(a) for n, a in zip(job.input_names, job.axes, strict=True) if n in in_graph
        },
        initializers=len(inits),
        initializer_elements=int(elements),
        file_bytes=sum(
            f.stat().st_size for f in (path, path.with_name(path.name + ".data")) if f.exists()
        ),
        fallback_reason=reason,
    )


# ---------------------------------------------------------------------- which module failed
def _failing_module(job: _Job, exporter: str, budget: int = 24) -> str:
    """`` in module 'name' (Class)``: the innermost module whose own export still fails."""
    calls: dict[nn.Module, tuple[tuple[Any, ...], dict[str, Any]]] = {}

    def record(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        calls.setdefault(module, (args, kwargs))

    hooks = [m.register_forward_pre_hook(record, with_kwargs=True) for m in job.model.modules()]
    try:
        _run(job.model, job.inputs)
    except Exception:  # noqa: BLE001 - the model ran before; nothing more to learn here
        return ""
    finally:
        for h in hooks:
            h.remove()
    names = {m: n for n, m in job.model.named_modules()}
    current = job.model
    with tempfile.TemporaryDirectory() as scratch:
        while budget > 0:
            children = sorted((c for c in current.children() if c in calls), key=list(calls).index)
            failing = None
            for child in children[:budget]:
                budget -= 1
                if _fails_alone(child, *calls[child], Path(scratch), exporter):
                    failing = child
                    break
            if failing is None:
                break
            current = failing
    name = names.get(current, "")
    return f" in module '{name or '<root>'}' ({type(current).__name__})"


def _fails_alone(
    module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], scratch: Path, exporter: str
) -> bool:
    leaves = pytree.tree_leaves((args, kwargs))
    if not leaves or not all(isinstance(x, torch.Tensor) for x in leaves if x is not None):
        return False
    try:
        with quiet():
            torch.onnx.export(
                copy.deepcopy(module),
                args,
                str(scratch / "part.onnx"),
                kwargs=kwargs,
                dynamo=exporter == "dynamo",
                external_data=False,
            )
    except Exception:  # noqa: BLE001 - failing is what we are looking for
        return True
    return False


# ---------------------------------------------------------------------- helpers
@contextlib.contextmanager
def quiet() -> Iterator[io.StringIO]:
    """Keep exporter chatter off the screen: stdout, stderr, warnings and logging go to a buffer,
    and what native code writes to file descriptors 1 and 2 (the TorchScript exporter prints
    its graph there when it fails) to a scratch file."""
    buffer = io.StringIO()
    previous = logging.root.manager.disable
    logging.disable(logging.CRITICAL)
    try:
        with (
            _native_output_discarded(),
            warnings.catch_warnings(),
            contextlib.redirect_stdout(buffer),
            contextlib.redirect_stderr(buffer),
        ):
            warnings.simplefilter("ignore")
            yield buffer
    finally:
        logging.disable(previous)


@contextlib.contextmanager
def _native_output_discarded() -> Iterator[None]:
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    saved: list[tuple[int, int]] = []
    with tempfile.TemporaryFile() as scratch:
        try:
            for fd in (1, 2):
                try:
                    saved.append((fd, os.dup(fd)))
                except OSError:  # no such descriptor here
                    continue
                os.dup2(scratch.fileno(), fd)
            yield
        finally:
            for fd, copy in saved:
                os.dup2(copy, fd)
                os.close(copy)


def _run(model: nn.Module, inputs: tuple[torch.Tensor, ...],
         what: str = "on the example inputs {}") -> list[torch.Tensor]:
    try:
        with torch.no_grad():
            out = model(*inputs)
    except USER_FAILURES as exc:  # user model (even a sys.exit()): report it in one line
        shapes = ", ".join(str(tuple(x.shape)) for x in inputs)
        raise ShapeError(
            f"the model failed {what.format(shapes)}: {error_line(exc)}"
        ) from None
    every = pytree.tree_leaves(out)
    numbers = [i for i, x in enumerate(every)
               if isinstance(x, (int, float, bool)) and not isinstance(x, torch.Tensor)]
    if numbers:  # the exporters make an output of it, which nothing here can compare
        i = numbers[0]
        raise ExportError(
            f"output {i} of the model is a Python {type(every[i]).__name__} ({every[i]!r}; "
            "a size such as x.shape[0]?), not a tensor: the ONNX files return tensors only; "
            "return it as a tensor or leave it out"
        )
    leaves = [x for x in every if isinstance(x, torch.Tensor)]
    if not leaves:
        raise ExportError(
            f"the model returned no tensors ({type(out).__name__}: outputs must be tensors, "
            "or tuples, lists or dicts of them); nothing to export"
        )
    return leaves


def error_line(exc: BaseException, limit: int = 240) -> str:
    """``Type: message`` in one line, from an exporter's (often pages long) message."""
    if isinstance(exc, SystemExit):
        return describe(exc)
    text = str(exc)
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    pick = next((ln for ln in lines if ln.startswith("<class '")), None)
    if pick is not None:  # the dynamo exporter's "Exception summary"
        pick = pick.split(">: ", 1)[-1]
    line = pick or (lines[0] if lines else "")
    line = " ".join(line.replace("\x1b[96m", "").replace("\x1b[0m", "").split())
    if len(line) > limit:
        line = line[: limit - 3] + "..."
    return f"{type(exc).__name__}: {line}" if line else type(exc).__name__


__all__ = [
    "EXPORTERS",
    "ExportResult",
    "LayerSize",
    "as_inputs",
    "check_onnx",
    "check_shrunk",
    "default_dynamic_axes",
    "export_onnx",
    "input_names_of",
    "onnx_layer_sizes",
    "error_line",
    "quiet",
    "resize_inputs",
    "unused_params",
]
