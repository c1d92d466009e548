"""Export both models, prove the result in onnxruntime, write the folder.

Before fine-tuning, :func:`prove_original` exports ``original.onnx`` and checks it in
onnxruntime (parity on eval batches, the metric): a model or data that cannot be exported or
checked fails there, not after hours of training. After fine-tuning, :func:`export_and_verify`
exports ``model.onnx`` (compressed) (and, in a scratch folder, the dense twin of the
compressed model as the physical reference); proves the compressed file shrank layer by
layer; checks its ORT-vs-PyTorch parity on real eval batches; evaluates the task metric in
ORT; optionally quantizes to int8; times all models interleaved; saves ``plan.json`` +
``weights.pt`` and the plots; writes ``report.json`` last and publishes the folder atomically.

A parity failure of the compressed model still publishes the folder, with ``report.json``
marked ``"failed"``, and then raises :class:`ParityError`; the original's raises before
fine-tuning; any other error leaves no folder behind.
"""

from __future__ import annotations

import copy
import os
import tempfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .config import CompressConfig
from .errors import ConfigError, ExportError, ParityError
from .events import EventSink, emit
from .meprop.native import which_ran
from .outputs import OutputDir

ORIGINAL, COMPRESSED, REFERENCE, INT8 = "original", "compressed", "reference", "int8"
RESIZED = "resized to batch"  # how the parity batch the proof resized is named
INT8_TOLERANCE = (0.05, 0.05)  # int8 parity is recorded, not enforced: it is a lossy format


@dataclass
class OriginalProof:
    """The original model's file, exported and checked in onnxruntime before fine-tuning."""

    export: Any  # ExportResult
    parity: Any  # ParityResult
    metric: float  # the task metric of original.onnx on the eval data
    batches: list[tuple[torch.Tensor, ...]]  # the parity inputs (the compressed model's too)
    where: list[str]  # how errors name them
    axes: list[dict[int, str]] | None = None  # dynamic axes beyond the defaults, if any
    sizes: list[Any] | None = None  # the file's parameter counts per module (LayerSize)


def prove_original(
    output: OutputDir,
    original: nn.Module,
    example_inputs: tuple[Any, ...],
    eval_data: Iterable[Any],
    cfg: CompressConfig,
    metric: Any = None,
    sink: EventSink | None = None,
) -> OriginalProof:
    """Export ``original.onnx`` into the staging folder and check it: ParityError when
    onnxruntime disagrees with PyTorch on the original already (no compressed model could
    then be proven; adjust atol/rtol or opset)."""
    from .batches import user_code
    from .export import export_onnx
    from .inputs import check_room, observed_axes
    from .sizes import onnx_layer_sizes, unused_params
    from .verify import check_parity, evaluate_onnx, make_session, parity_inputs

    emit(sink, "stage", message="exporting and checking the original model (before fine-tuning)")
    on_cpu = all(t.device.type == "cpu" for t in original.state_dict().values())
    before = original if on_cpu else copy.deepcopy(original).cpu()  # (a teacher stays put)
    before.eval()
    inputs = tuple(x.cpu() if isinstance(x, torch.Tensor) else x for x in example_inputs)
    path = output.file("original.onnx")
    batches, names = parity_inputs(eval_data, max_batches=3, resize_to=(), batch_dim=cfg.batch_dim)
    # e.g. float sequences padded per batch (and the batch axis of time-major inputs), seen
    # in any eval batch: a length that first differs in a later one failed there in ORT
    axes = observed_axes(inputs, [*batches, *_input_shapes(eval_data)], cfg.batch_dim)
    if cfg.batches:  # the latency table's largest batch must fit (checked again when timed)
        check_room(inputs, axes, max(cfg.batches), cfg.bench_seq)
    for note in _resized_batch(before, batches, names, cfg.batch_dim, axes):
        emit(sink, "note", message=note)
    try:
        exported = export_onnx(before, inputs, path, opset=cfg.opset, dynamic_axes=axes,
                               sink=sink)
    except ExportError:
        if axes is not None:  # a size may differ because a batch is bad: the model says which
            with torch.no_grad():
                for batch, name in zip(batches, names, strict=True):
                    with user_code("the model", name):
                        before(*batch)
        raise
    # a file the size proof cannot read fails now
    sizes = onnx_layer_sizes(path, before, unused=unused_params(before, inputs))
    session = make_session(path)
    try:
        parity = check_parity(
            session,
            before,
            batches,
            atol=cfg.atol,
            rtol=cfg.rtol,
            label=ORIGINAL,
            input_names=exported.input_names,
            where=names,
        )
    except ParityError as exc:
        if RESIZED in exc.where:  # the real batches agreed
            raise ParityError(
                f"before fine-tuning, {exc}: the file computes otherwise at that batch size "
                "only (a model that branches on its batch size, x.shape[0], is exported with "
                "one branch); nothing was trained") from None
        raise ParityError(f"before fine-tuning, {exc}; nothing was trained (set atol/rtol or "
                          "opset)") from None
    with torch.no_grad():
        like = before(*inputs)  # ORT's flat outputs go to the metric in this structure
    value = evaluate_onnx(session, eval_data, metric, input_names=exported.input_names, like=like,
                          batch_dim=cfg.batch_dim)
    return OriginalProof(exported, parity, value, batches, names, axes, sizes)


def _input_shapes(data: Iterable[Any]) -> list[tuple[Any, ...]]:
    """The inputs of every batch of ``data`` as stand-ins with their shapes (meta tensors:
    no memory), for :func:`~mesimp_compress.inputs.observed_axes`."""
    from .batches import iterate, split_batch

    shapes = []
    for batch in iterate(data, where="eval data"):
        inputs, _ = split_batch(batch, where="eval data")
        shapes.append(tuple(torch.empty(x.shape, dtype=x.dtype, device="meta")
                            if isinstance(x, torch.Tensor) else x for x in inputs))
    return shapes


def _resized_batch(model: nn.Module, batches: list[tuple[Any, ...]], names: list[str],
                   batch_dim: int = 0, axes: list[dict[int, str]] | None = None) -> list[str]:
    """Add the first eval batch resized to batch 1 (else 2) to the parity inputs, so that the
    file's dynamic batch axis is checked at a size of the proof's own choosing; a model that
    cannot run at either (BatchNorm on batch statistics needs two examples) is checked at its
    eval batches' sizes only, which the returned note says."""
    from .batches import batch_size
    from .inputs import default_dynamic_axes, resize_inputs

    tried = []
    axes = axes or default_dynamic_axes(batches[0], batch_dim)
    for size in (1, 2):
        if size == batch_size(batches[0], batch_dim):
            continue
        resized = resize_inputs(batches[0], size, axes=axes)
        try:
            with torch.no_grad():
                model(*resized)
        except Exception as exc:  # noqa: BLE001 - the model's own limit, said in the note
            tried.append(f"{size} ({type(exc).__name__})")
            continue
        batches.append(resized)
        names.append(f"{names[0]} {RESIZED} {size}")
        return []
    if not tried:
        return []
    return [f"the model does not run on {names[0]} resized to batch {' or '.join(tried)}: "
            "the ONNX files' batch axis is checked at the eval batches' own sizes only"]


def export_and_verify(
    output: OutputDir,
    *,
    proof: OriginalProof,
    original: nn.Module,
    compressed: nn.Module,
    example_inputs: tuple[Any, ...],
    eval_data: Iterable[Any],
    plan: Any,
    config: CompressConfig,
    tuned: Any,
    skipped: list[dict[str, str]],
    metric: Any = None,
    sink: EventSink | None = None,
    factory: str | None = None,
    notes: Sequence[str] = (),
) -> dict[str, Any]:
    """Run the proof and publish ``output``; return the report. ``notes`` is the run's
    list of note messages (what every ``note`` event said, the proof's while it runs)."""
    try:
        report = _prove(
            output,
            proof,
            original,
            compressed,
            example_inputs,
            eval_data,
            plan,
            config,
            tuned,
            skipped,
            metric,
            sink,
            factory,
            notes,
        )
    except BaseException:
        output.discard()
        raise
    output.commit()
    emit(sink, "written", path=str(output.path), status=report["status"])
    if report["status"] != "ok":
        raise ParityError(f"{report['error']} (report written to {output.path / 'report.json'})")
    return report


def _prove(
    output: OutputDir,
    proof: OriginalProof,
    original: nn.Module,
    compressed: nn.Module,
    example_inputs: tuple[Any, ...],
    eval_data: Iterable[Any],
    plan: Any,
    cfg: CompressConfig,
    tuned: Any,
    skipped: list[dict[str, str]],
    metric: Any,
    sink: EventSink | None,
    factory: str | None,
    notes: Sequence[str],
) -> dict[str, Any]:
    from .export import export_onnx
    from .latency import benchmark, dense_twin
    from .report import build_report, layer_rows, write_report
    from .sizes import check_shrunk, unused_params
    from .surgery import save_compressed
    from .verify import check_parity, evaluate_onnx, make_session

    before = original.cpu().eval()  # the run's own copy, not needed on the device any more
    after = copy.deepcopy(compressed).cpu().eval()  # the caller keeps result.model where it was
    # weights.pt first: the checks below run forwards, which may move buffers (a counter)
    save_compressed(after, plan, output.staging)
    inputs = tuple(x.cpu() if isinstance(x, torch.Tensor) else x for x in example_inputs)
    paths = {ORIGINAL: output.file("original.onnx"), COMPRESSED: output.file("model.onnx")}
    with tempfile.TemporaryDirectory(prefix="mesimp-ref-") as scratch:
        exports = {
            ORIGINAL: proof.export,
            COMPRESSED: export_onnx(after, inputs, paths[COMPRESSED], opset=cfg.opset,
                                    dynamic_axes=proof.axes, sink=sink),
        }
        names = exports[COMPRESSED].input_names
        emit(sink, "stage", message="checking that every pruned layer shrank in ONNX")
        sizes = check_shrunk(
            paths[COMPRESSED],
            after,
            original_onnx=paths[ORIGINAL],
            original_model=before,
            plan=plan,
            original_sizes=proof.sizes,
            unused=unused_params(after, inputs),
        )

        emit(sink, "stage", message="checking parity in onnxruntime")
        session = make_session(paths[COMPRESSED])
        batches, where = proof.batches, proof.where
        parity = {
            ORIGINAL: proof.parity,
            COMPRESSED: check_parity(
                session,
                after,
                batches,
                atol=cfg.atol,
                rtol=cfg.rtol,
                label=COMPRESSED,
                input_names=names,
                raise_on_fail=False,
                where=where,
            ),
        }
        emit(sink, "stage", message="evaluating the compressed ONNX model")
        with torch.no_grad():
            like = after(*inputs)  # ORT's flat outputs go to the metric in this structure
        metrics = {
            "name": getattr(metric, "__name__", None) or "accuracy",
            "torch_before": tuned.metric_before,
            "torch_after": tuned.metric_after,
            "ort_before": proof.metric,
            "ort_after": evaluate_onnx(session, eval_data, metric, input_names=names, like=like,
                                       batch_dim=cfg.batch_dim),
        }

        timed = {ORIGINAL: paths[ORIGINAL], COMPRESSED: paths[COMPRESSED]}
        exporter = exports[COMPRESSED].exporter  # every file timed comes from this exporter
        _same_exporter(timed, exports, exporter, before, inputs, Path(scratch),
                                      cfg, proof, sink)
        reference = Path(scratch) / "reference.onnx"
        try:
            export_onnx(dense_twin(after), inputs, reference, opset=cfg.opset,
                        dynamic_axes=proof.axes, exporter=exporter, sink=sink)
        except ExportError:  # timed all the same, from whichever exporter takes it
            export_onnx(dense_twin(after), inputs, reference, opset=cfg.opset,
                        dynamic_axes=proof.axes, sink=sink)
        timed[REFERENCE] = reference
        if cfg.quantize:
            from .quantize import quantize_int8

            emit(sink, "stage", message="quantizing the compressed model to int8")
            timed[INT8] = quantize_int8(paths[COMPRESSED], output.file("model.int8.onnx"))
            int8 = make_session(timed[INT8])
            parity[INT8] = check_parity(
                int8,
                after,
                batches,
                atol=INT8_TOLERANCE[0],
                rtol=INT8_TOLERANCE[1],
                label=INT8,
                input_names=names,
                raise_on_fail=False,
                where=where,
            )
            metrics["int8"] = evaluate_onnx(int8, eval_data, metric, input_names=names,
                                            like=like, batch_dim=cfg.batch_dim)

        emit(sink, "stage", message="timing in onnxruntime (interleaved)")
        threads = sorted({1, cfg.bench_threads, os.cpu_count() or 1})
        latency = benchmark(
            timed,
            inputs,
            batches=cfg.batches,
            threads=threads,
            seq=cfg.bench_seq,
            rounds=30,
            max_seconds=20.0,
            axes=proof.axes,
            input_names=names,
            sink=sink,
        )

    failed = [p for label, p in parity.items() if label != INT8 and not p.passed]
    error = None
    if failed:
        worst = max(failed[0].outputs, key=lambda o: o.worst)
        error = (
            f"{failed[0].label}: onnxruntime output '{worst.name}' differs from PyTorch by "
            f"{worst.max_abs:.3g}, beyond atol {cfg.atol:g} + rtol {cfg.rtol:g}*|ref|"
        )
    history = [r.to_dict() for r in tuned.history]
    report = build_report(
        config=cfg.to_dict(),
        layers=layer_rows(before, after, sizes),
        plan=plan,
        widths={key: len(kept) for key, kept in tuned.kept.items()},
        params=(_unique_params(before), _unique_params(after)),
        metrics=metrics,
        parity=parity,
        latency=latency,
        export=exports,
        skipped=skipped,
        notes=list(notes),
        bench_threads=threads,
        status="failed" if failed else "ok",
        error=error,
        extra={
            "factory": factory,
            "history": history,
            "rollbacks": [r.to_dict() for r in tuned.rollbacks],
            "hits": tuned.hits,
            "examples": tuned.examples,
        },
    )
    for entry in report["export"].values():  # where the files will be once published
        entry["path"] = str(output.path / Path(entry["path"]).name)
    report["metric_before"] = {
        "torch": metrics["torch_before"],
        "onnxruntime": metrics["ort_before"],
    }
    report["metric_after"] = {"torch": metrics["torch_after"], "onnxruntime": metrics["ort_after"]}
    # which meProp Linear backward trained (results differ between them in float rounding)
    report["versions"]["meprop_backward"] = which_ran()
    _plots(report, output, tuned, cfg, sink)
    write_report(report, output.file("report.json"))
    return report


def _plots(
    report: dict[str, Any],
    output: OutputDir,
    tuned: Any,
    cfg: CompressConfig,
    sink: EventSink | None,
) -> None:
    try:
        from .plots import write_plots

        examples = tuned.examples
        write_plots(
            report,
            output.staging / "plots",
            hits=tuned.hits,
            examples=examples,
            prune_rate=cfg.prune_rate,
        )
    except ConfigError as exc:  # matplotlib missing: the run is still complete
        emit(sink, "note", message=str(exc))


def _unique_params(model: nn.Module) -> int:
    """Parameter count with a shared (tied) parameter counted once, as the file holds it."""
    return sum(p.numel() for p in model.parameters())


def _same_exporter(timed: dict[str, Path], exports: dict[str, Any], exporter: str,
                   before: nn.Module, inputs: tuple[Any, ...], scratch: Path,
                   cfg: CompressConfig, proof: OriginalProof,
                   sink: EventSink | None) -> None:
    """Time the original from a file of the compressed model's exporter: when model.onnx fell
    back to another exporter than original.onnx, part of the speedup was the other graph (a
    tagger's TorchScript file ran 1.16x faster than its dynamo file at batch 1). Says so in
    a note."""
    from .export import export_onnx

    first = exports[ORIGINAL].exporter
    if first == exporter:
        return
    twin = scratch / "original.onnx"
    try:
        export_onnx(before, inputs, twin, opset=cfg.opset, dynamic_axes=proof.axes,
                    exporter=exporter, sink=sink)
    except ExportError:
        note = (f"original.onnx comes from the {first} exporter and model.onnx from the "
                f"{exporter} one, and the original cannot be exported with the {exporter} "
                "exporter: the latency ratios include the difference of their graphs")
    else:
        timed[ORIGINAL] = twin
        note = (f"model.onnx comes from the {exporter} exporter, original.onnx from the "
                f"{first} one: the original is timed from a {exporter} export of its own, so "
                "the latency ratios compare graphs of one exporter")
    emit(sink, "note", message=note)
