"""The facade: ``compress(model, train, eval, config=...)`` and ``load(fresh_model, dir)``."""

from __future__ import annotations

import copy
import itertools
import os
import random
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import distributed, tasks
from .batches import (
    KeywordBatches,
    check_reiterable,
    first_batch,
    has_nan,
    nan_input,
    to_device,
)
from .config import CompressConfig, read_toml
from .errors import (
    USER_FAILURES,
    CheckpointError,
    ConfigError,
    DataError,
    MesimpError,
    ShapeError,
    describe,
)
from .events import EventSink, NoteRecorder, emit
from .inputs import batch_axis, forward_order
from .meprop import native
from .modelcheck import check_model, copy_failed, unwrap
from .outputs import OutputDir
from .simplify import Simplifier
from .training import FineTuner, Rollback, WindowRecord, module_modes, set_module_modes


@dataclass
class CompressResult:
    """What a compression returns: the model, its plan, the history, and the report if exported."""

    model: nn.Module
    plan: Any
    history: list[WindowRecord]
    rollbacks: list[Rollback]
    metric_before: float
    metric_after: float
    skipped: list[dict[str, str]] = field(default_factory=list)
    report: dict[str, Any] | None = None
    out: Path | None = None
    widths_before: dict[str, int] = field(default_factory=dict)

    @property
    def widths(self) -> dict[str, int]:
        """Width of every prunable layer after compression (a layer nothing was cut from
        keeps its width)."""
        widths = dict(self.widths_before)
        widths.update({key: len(idx) for key, idx in self.plan.kept.items()})
        return widths


def compress(
    model: nn.Module,
    train: Iterable[Any],
    eval: Iterable[Any],  # noqa: A002 - the issue's name
    *,
    config: CompressConfig | Mapping[str, Any] | str | Path | None = None,
    loss: Any = None,
    metric: Any = None,
    out: str | Path | None = None,
    force: bool = False,
    sink: EventSink | None = None,
    factory: str | None = None,
    resume: bool = False,
    checkpoint_dir: str | Path | None = None,
) -> CompressResult:
    """Fine-tune ``model`` under meProp, remove rarely active units, and (with ``out``)
    export, verify and report. The caller's model is not modified. ``config`` is a
    CompressConfig, a mapping of its keys, or the path of a recipe TOML.

    With ``out`` (or ``checkpoint_dir``) a checkpoint is written after every window, beside
    ``out`` by default; ``resume=True`` continues from it (same config required) and reaches
    the plan and metrics of an uninterrupted run. The checkpoint is removed on success."""
    cfg = _config(config)
    if out is not None and not isinstance(out, (str, os.PathLike)):
        raise ConfigError(f"out must be a folder path, got {type(out).__name__}")
    if not isinstance(model, nn.Module):
        raise ConfigError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if sink is not None and not callable(sink):
        raise ConfigError(f"sink must be a callable taking an Event, got {type(sink).__name__}")
    if out is not None:  # every note of the run goes into report.json
        sink = NoteRecorder(sink)
    model = unwrap(model, sink)
    output = OutputDir(out, force=force) if out is not None else None  # refuse early
    checkpointer, state = _checkpoint(out, checkpoint_dir, resume, cfg, sink)
    _device(cfg.device)
    world, device_name = distributed.setup(cfg.device)
    from .checkpoint import rng_state, set_rng_state

    threads, generators = torch.get_num_threads(), rng_state()  # the caller's, given back
    try:
        if device_name != cfg.device:
            cfg = cfg.replace(device=device_name)
        if world.distributed:
            if cfg.sparse_update:
                raise ConfigError(SPARSE_UNDER_DDP)
            train = distributed.Shard(train, world.rank, world.size)
        if not world.is_main:  # only rank 0 writes files
            output = checkpointer = None
        return _run(
            model, train, eval, cfg, loss, metric, output, checkpointer, state, sink, factory, world
        )
    except SystemExit as exc:  # the library never exits: user code did, where none catches it
        raise DataError(f"user code (the model, its data, loss or metric): "
                        f"{describe(exc)}") from None
    finally:
        distributed.teardown(world)
        torch.set_num_threads(threads)
        set_rng_state(generators)


def _run(
    model: nn.Module,
    train: Iterable[Any],
    eval_data: Iterable[Any],
    cfg: CompressConfig,
    loss: Any,
    metric: Any,
    output: OutputDir | None,
    checkpointer: Any,
    state: dict[str, Any] | None,
    sink: EventSink | None,
    factory: str | None,
    world: distributed.World,
) -> CompressResult:
    _seed(cfg.seed)
    native.reset_ran()  # the report says which meProp Linear backward this run trained with
    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)
    device = torch.device(cfg.device)  # validated by compress()

    # one batch for the checks, the trace and the export (a shuffled loader yields another
    # first batch on every pass, so inputs and targets must come from the same one)
    check_model(model)
    modes = module_modes(model)  # the result comes back in them
    check_reiterable(train, where="train data")
    check_reiterable(eval_data, where="eval data")
    order = forward_order(model)  # dict batches pass their inputs in forward's order
    keys: dict[str, Any] = {}  # train and eval dict batches must give the same inputs
    train = KeywordBatches(train, order, "train data", keys)
    eval_data = KeywordBatches(eval_data, order, "eval data", keys)
    example_inputs, example_targets = first_batch(train, where="train data")
    shift_note = None
    if keys and (loss is None or metric is None) and tasks.causal_lm(model):
        # a collator's labels are the input ids: the model shifts them itself, we take them out
        loss = loss or tasks.next_token(tasks.cross_entropy)
        metric = metric or tasks.next_token(tasks.accuracy)
        shift_note = (f"{type(model).__name__} is a causal language model given dict batches: "
                      "the default loss and metric score each position's logits against the "
                      "next position's label (labels shifted by one, as Hugging Face does)")
    if any(isinstance(x, torch.Tensor) and x.dim() and x.shape[batch_axis(x, cfg.batch_dim)] == 0
           for x in example_inputs):
        raise DataError("the first train batch has no examples: the model is traced and "
                        "exported on it, so it must hold at least one")
    first_batch(eval_data, where="eval data")
    try:
        original, working = copy.deepcopy(model), copy.deepcopy(model)
    except Exception as exc:  # noqa: BLE001 - e.g. hooks holding non-leaf tensors
        raise copy_failed(exc) from None
    original = original.to(device).eval()
    working = working.to(device)
    _check_forward(original, example_inputs, example_targets, loss, metric)

    simplifier = Simplifier.build(working, to_device(example_inputs, device), cfg)
    if cfg.distill_layers:
        _check_distill_layers(original, simplifier, to_device(example_inputs, device), cfg)
    if shift_note is not None:
        simplifier.surgery_notes.append(shift_note)
    emit(sink, "structure", groups=simplifier.widths(), skipped=simplifier.skipped())
    proof = None
    try:
        if output is not None:  # the original's file first: what cannot be proven fails now
            from .checkpoint import rng_state, set_rng_state
            from .pipeline import prove_original

            generators = rng_state()  # reading the eval data draws seeds: the run must
            proof = prove_original(output, original, example_inputs, eval_data, cfg, metric, sink)
            set_rng_state(generators)  # train as it would without an output folder
        tuner = FineTuner(
            working,
            original if cfg.distill > 0 or cfg.distill_layers else None,
            train,
            eval_data,
            simplifier,
            cfg,
            loss=loss,
            metric=metric,
            sink=sink,
            checkpoint=checkpointer,
            resume=state,
            world=world,
        )
        tuned = tuner.run()
        del tuner  # its DDP wrapper must go before the process group does
        distributed.teardown(world, together=True)  # only rank 0 goes on to export
        plan = simplifier.final_plan()
        set_module_modes(tuned.model, modes)  # in the caller's modes, as they gave them
        result = CompressResult(
            model=tuned.model,
            plan=plan,
            history=tuned.history,
            rollbacks=tuned.rollbacks,
            metric_before=tuned.metric_before,
            metric_after=tuned.metric_after,
            skipped=simplifier.skipped(),
            widths_before={key: simplifier.original_widths[key] for key in tuned.kept},
        )
        if output is not None:
            from .pipeline import export_and_verify

            result.report = export_and_verify(
                output,
                proof=proof,
                original=original,
                compressed=tuned.model,
                example_inputs=example_inputs,
                eval_data=eval_data,
                plan=plan,
                config=cfg,
                tuned=tuned,
                skipped=result.skipped,
                metric=metric,
                sink=sink,
                factory=factory,
                notes=sink.notes if isinstance(sink, NoteRecorder) else (),
            )
            result.out = output.path
    except BaseException:
        if output is not None and output.published:
            # a published folder (a parity failure is published, marked failed; a sink may
            # raise on 'written') ends the run: its checkpoint goes
            if checkpointer is not None:
                checkpointer.clear()
        elif output is not None:
            output.discard()  # original.onnx was staged before fine-tuning
        raise
    if checkpointer is not None:
        checkpointer.clear()
    return result


def load(fresh_model: nn.Module, directory: str | Path) -> nn.Module:
    """Rebuild a compressed model: apply ``plan.json`` to a freshly built model, then load
    ``weights.pt``; returns that model, rebuilt in place. After a PlanError or
    CheckpointError the model may be left partly rebuilt: build a fresh one to try again."""
    from .surgery import load_compressed

    if not isinstance(directory, (str, os.PathLike)):
        raise CheckpointError(f"directory must be the path of a run folder, got "
                              f"{type(directory).__name__}")
    d = Path(directory)
    if d.is_file():  # its plan.json named
        d = d.parent
    elif not d.is_dir():
        raise CheckpointError(f"no run folder at '{d}'")
    return load_compressed(fresh_model, d / "plan.json", d / "weights.pt")


# ---------------------------------------------------------------------- helpers
_NOT_TRAINING = {
    "device",
    "threads",
    "batches",
    "bench_threads",
    "bench_seq",
    "quantize",
    "opset",
    "atol",
    "rtol",
}


def _checkpoint(
    out: Any, directory: Any, resume: bool, cfg: CompressConfig, sink: EventSink | None
) -> tuple[Any, dict[str, Any] | None]:
    """The run's Checkpointer (None without a place for it) and, when resuming, its state."""
    from .checkpoint import Checkpointer, default_dir

    if directory is None and out is None:
        if resume:
            raise ConfigError("resume needs the output directory (out=) or checkpoint_dir=")
        return None, None
    checkpointer = Checkpointer(directory if directory is not None else default_dir(out))
    if checkpointer.directory.exists() and not checkpointer.directory.is_dir():
        raise CheckpointError(  # found now, not after the first window
            f"{checkpointer.directory} is a file; the run keeps its checkpoint folder there "
            "(move the file, or give checkpoint_dir)"
        )
    if not resume:
        if checkpointer.exists():
            emit(
                sink,
                "note",
                message=f"replacing the checkpoint of an earlier run in "
                f"{checkpointer.directory} (use --resume to continue it)",
            )
        return checkpointer, None
    state = checkpointer.load()
    defaults = CompressConfig().to_dict()  # a key added since the checkpoint: its default
    saved = {k: v for k, v in {**defaults, **state["config"]}.items() if k not in _NOT_TRAINING}
    now = {k: v for k, v in cfg.to_dict().items() if k not in _NOT_TRAINING}
    changed = sorted(k for k in set(saved) | set(now) if saved.get(k) != now.get(k))
    if changed:
        raise CheckpointError(
            "the checkpoint was made with other settings: "
            + ", ".join(f"{k}={saved.get(k)!r} (now {now.get(k)!r})" for k in changed[:5])
        )
    return checkpointer, state


def _check_distill_layers(original: nn.Module, simplifier: Simplifier,
                          inputs: tuple[Any, ...], cfg: CompressConfig) -> None:
    """Layers to distill must keep their output width: one after a pruned layer (its ReLU)
    loses units with it. Checked on a copy shrunk by a unit per layer, before training."""
    from .features import check_kept_widths, matched_layers

    resized = simplifier.resized_outputs()  # the fine-tuner names these: "pruned itself"
    names = [n for n in matched_layers(original, cfg.distill_layers) if n not in resized]
    if not names:
        return
    try:
        shrunk = simplifier.shrunk_copy(original)
    except MesimpError:  # a plan it cannot build here (tied layers partly included)
        return
    check_kept_widths(original, shrunk, inputs, names)


def _seed(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)
    try:
        import numpy as np

        np.random.seed(seed)
    except ImportError:  # pragma: no cover
        pass


SPARSE_UNDER_DDP = (
    "sparse_update cannot be combined with distributed training: row gradients would bypass "
    "DDP's all-reduce"
)


def _config(config: Any) -> CompressConfig:
    """A CompressConfig from one, from a mapping of its keys, or from a recipe TOML path."""
    if config is None:
        return CompressConfig()
    if isinstance(config, CompressConfig):
        config.validate()  # a field may have been set after it was built
        return config
    if isinstance(config, Mapping):
        return CompressConfig.from_dict(dict(config))
    if isinstance(config, (str, os.PathLike)):
        return CompressConfig.from_dict(read_toml(config), source=str(config))
    raise ConfigError(
        "config must be a CompressConfig, a mapping of its keys or a recipe TOML path; got "
        f"{type(config).__name__}"
    )


def check_launch(cfg: CompressConfig, out: str | Path | None, *, force: bool = False) -> None:
    """What a distributed run would refuse, checked once before its workers start."""
    if out is not None:
        OutputDir(out, force=force)
    _device(cfg.device)
    if cfg.sparse_update:
        raise ConfigError(SPARSE_UNDER_DDP)


def _device(name: str) -> torch.device:
    try:
        device = torch.device(name)
    except RuntimeError as exc:
        raise ConfigError(f"device {name!r} is not a valid torch device: {exc}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {name!r} requested but CUDA is not available on this machine")
    if device.type == "meta":
        raise ConfigError("device 'meta' holds no data: training needs a real device")
    try:
        torch.empty(1, device=device)
    except (RuntimeError, AssertionError) as exc:
        detail = " ".join(str(exc).split())[:200]
        raise ConfigError(f"device {name!r} cannot be used on this machine: {detail}") from None
    return device


def _first_call(role: str, given: Any, default_name: str, default: Any, outputs: Any,
                targets: Any) -> Any:
    """The user's loss or metric (or the default one) on the first train batch; a failure is
    a ShapeError saying which it was."""
    try:
        return (given or default)(outputs, targets)
    except ShapeError as exc:
        if given is not None:
            raise
        raise ShapeError(f"the default {role} ({default_name}): {exc}") from None
    except MesimpError:
        raise
    except USER_FAILURES as exc:  # whatever the user's function raises
        raise ShapeError(f"the {role} failed on the first train batch: {describe(exc)}") from None


def _check_forward(
    model: nn.Module, inputs: tuple[Any, ...], targets: Any, loss: Any, metric: Any
) -> None:
    """Run the model and the loss on one batch, so shape errors surface before training."""
    from . import tasks

    tensor = next(itertools.chain(model.parameters(), model.buffers()), None)
    device = tensor.device if tensor is not None else torch.device("cpu")
    inputs, targets = to_device((inputs, targets), device, where="the first train batch")
    if (i := nan_input(inputs)) is not None:
        raise DataError(f"the first train batch: input {i} holds NaN values")
    try:
        with torch.no_grad():
            outputs = model(*inputs)
    except MesimpError:
        raise
    except USER_FAILURES as exc:  # whatever the user's forward raises
        shapes = ", ".join(
            str(tuple(x.shape)) if isinstance(x, torch.Tensor) else type(x).__name__ for x in inputs
        )
        raise ShapeError(
            f"the model failed on the first train batch (inputs {shapes}): {describe(exc)}"
        ) from None
    if has_nan(outputs):
        raise DataError("the model's outputs on the first train batch hold NaN values")
    value = _first_call("loss", loss, "cross-entropy over class scores", tasks.cross_entropy,
                        outputs, targets)
    tasks.metric_value(
        _first_call("metric", metric, "accuracy over class scores", tasks.accuracy, outputs,
                    targets), 1, where="the first train batch")
    tasks.check_loss(value, "the first train batch", differentiable=False)
