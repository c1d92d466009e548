"""The fine-tune loop: meProp + activity + the meSimp rule + surgery, window by window.

A run is a list of phases (``schedule.cycle_plan``): pruning cycles train under meProp and
apply the rule after every window; normal cycles train without pruning (densely by default);
recovery epochs close the run. Optionally the loss adds distillation from the original model,
and ``max_drop`` rolls back a prune whose metric falls too far. Progress goes out as events.
"""

from __future__ import annotations

import copy
import gc
import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.utils._pytree as pytree
from torch import nn

from . import tasks
from .activity import ActivityTracker
from .batches import (
    batch_size,
    count_batches,
    has_nan,
    iterate,
    nan_input,
    split_batch,
    to_device,
    user_code,
)
from .checkpoint import Checkpointer, fingerprint, rng_state, set_rng_state
from .config import CompressConfig
from .distributed import World, wrap
from .errors import CheckpointError, ConfigError, DataError, NonFiniteLossError, ShapeError
from .events import EventSink, emit
from .features import captured, layer_loss, matched_layers
from .meprop import apply_meprop, remove_meprop, set_k
from .meprop.functions import sync_selection
from .plan import Plan
from .schedule import Phase, Rule, cycle_plan, decide
from .simplify import Simplifier


@dataclass
class WindowRecord:
    """What one window did: its mean loss, the eval metric, widths after it, what it pruned."""

    phase: str
    cycle: int
    epoch: int
    window: int
    step: int
    loss: float
    metric: float | None
    widths: dict[str, int]
    pruned: dict[str, list[int]] = field(default_factory=dict)  # key -> [before, after]

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass
class Rollback:
    """A prune undone by the accuracy guard."""

    window: int
    keys: list[str]
    metric: float
    threshold: float

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass
class FineTuneResult:
    """The compressed model (meProp removed), kept units in original indexing, history."""

    model: nn.Module
    kept: dict[str, list[int]]
    history: list[WindowRecord]
    rollbacks: list[Rollback]
    metric_before: float
    metric_after: float
    hits: dict[str, list[int]]
    examples: dict[str, int]


def module_modes(model: nn.Module) -> dict[str, bool]:
    """The train/eval mode of every module of ``model``, by name."""
    return {name: module.training for name, module in model.named_modules()}


def set_module_modes(model: nn.Module, modes: dict[str, bool]) -> None:
    """Put each module named in ``modes`` in its mode (modules rebuilt by surgery keep their
    names); others take their parent's."""
    for name, module in model.named_modules():
        parent = name.rpartition(".")[0]
        module.training = modes.get(name, modes.get(parent, module.training))


@torch.no_grad()
def evaluate(model: nn.Module, data: Iterable[Any], metric: Any, device: torch.device,
             batch_dim: int = 0) -> float:
    """The metric over all of ``data`` (sum over batches / count; a batch mean counts for the
    examples along ``batch_dim``)."""
    modes = module_modes(model)
    model.eval()
    total = count = 0.0
    batches = 0
    try:
        for i, batch in enumerate(iterate(data, where="eval data")):
            inputs, targets = split_batch(batch, where="eval data")
            batches += 1
            if batch_size(inputs, batch_dim) == 0:  # no example to score (a mean: NaN)
                continue
            where = f"eval batch {i + 1}"
            inputs, targets = to_device((inputs, targets), device, where=where)
            with user_code("the model", where):
                outputs = model(*inputs)
            _check_outputs(model, outputs, inputs, where)
            with user_code("the metric", where):
                value = metric(outputs, targets)
            s, c = tasks.metric_value(value, batch_size(inputs, batch_dim), where=where)
            total += s
            count += c
    finally:
        set_module_modes(model, modes)
    return tasks.mean_of(total, count, batches)


class FineTuner:
    """Runs the phases of one compression on a working copy of the model."""

    def __init__(
        self,
        model: nn.Module,
        teacher: nn.Module | None,
        train: Iterable[Any],
        eval_data: Iterable[Any],
        simplifier: Simplifier,
        config: CompressConfig,
        *,
        loss: Any = None,
        metric: Any = None,
        sink: EventSink | None = None,
        checkpoint: Checkpointer | None = None,
        resume: dict[str, Any] | None = None,
        world: World | None = None,
    ) -> None:
        self.cfg = config
        self.world = world or World()
        self.checkpointer = checkpoint
        self.resume = resume
        # the original weights the run starts from: a resume must start from the same ones
        # (every rank resumes, only rank 0 writes checkpoints)
        self.origin = fingerprint(model) if checkpoint is not None or resume else None
        self.epoch_rng: dict[str, Any] | None = None  # generators at the start of this epoch
        self.device = torch.device(config.device)
        self.model = model.to(self.device)
        # submodules the caller put in eval mode in a model in train mode (a frozen
        # BatchNorm) stay in eval mode while training
        self.kept_eval = ({n for n, m in model.named_modules() if not m.training}
                          if model.training else set())
        wants_teacher = config.distill > 0 or bool(config.distill_layers)
        self.teacher = (
            teacher.to(self.device).eval() if teacher is not None and wants_teacher else None
        )
        self.layers = (
            matched_layers(self.teacher, config.distill_layers)
            if self.teacher is not None and config.distill_layers else []
        )
        pruned = [name for name in self.layers if name in simplifier.resized_outputs()]
        if pruned:
            raise ConfigError(
                f"distill_layers: '{pruned[0]}' is pruned itself (its output loses units); "
                "match layers whose output keeps its width"
            )
        self.train_data, self.eval_data = train, eval_data
        self.simp = simplifier
        self.loss_fn = loss or tasks.cross_entropy
        self.metric_fn = metric or tasks.accuracy
        self.sink = sink
        self.rule = Rule(config.prune_rate, config.min_width, config.round_to)
        self.tracker = ActivityTracker()
        self.history: list[WindowRecord] = []
        self.rollbacks: list[Rollback] = []
        self.frozen: set[str] = set()
        self.step = 0
        self.window_index = 0
        self.n_batches, self.counted_by = count_batches(
            train, where="train data", limit=config.epoch_batches
        )
        self._miscounted = False
        self.window_batches = max(1, round(config.window * self.n_batches))

    # ------------------------------------------------------------------ public
    def run(self) -> FineTuneResult:
        """Run every phase (from the checkpoint, when resuming) and return the compressed model."""
        apply_meprop(
            self.model,
            self.cfg.k,
            mode=self.cfg.mode,
            sparse_bias=self.cfg.sparse_bias,
            include=self.cfg.include or None,
            exclude=self.cfg.exclude or None,
            output_layer=self.simp.output_layer,
            tracker=self.tracker,
        )
        self.optimizer = self._make_optimizer()
        self.net = wrap(self.model, self.world, self.device)
        self._guard: dict[str, Any] | None = None
        sync_selection(self.world.distributed)
        try:
            self._phases()
        finally:
            sync_selection(False)
            self._unwrap()  # compress() leaves the process group next: no DDP may outlive it
        remove_meprop(self.model)
        self.simp.detach_means(self.model)
        metric_after = self._evaluate()
        for note in self.simp.notes() + self._unseen_notes() + self._nothing_pruned():
            emit(self.sink, "note", message=note)
        emit(
            self.sink,
            "done",
            metric_before=self.metric_before,
            metric_after=metric_after,
            widths=self.simp.widths(),
        )
        return FineTuneResult(
            model=self.model,
            kept=self.simp.kept_original(),
            history=self.history,
            rollbacks=self.rollbacks,
            metric_before=self.metric_before,
            metric_after=metric_after,
            hits=self.simp.total_hits(self.tracker),
            examples=self.simp.total_examples(self.tracker),
        )

    # ------------------------------------------------------------------ phases
    def _phases(self) -> None:
        """Every epoch of every phase, from the checkpoint's position when resuming."""
        start_epoch, start_batch, rng = 0, 0, None
        if self.resume is not None:
            start_epoch, start_batch, rng = self._restore(self.resume)
            emit(
                self.sink,
                "resumed",
                epoch=start_epoch,
                batch=start_batch,
                window=self.window_index,
                widths=self.simp.widths(),
            )
        else:
            self.metric_before = self._evaluate()
        original = {key: self.simp.original_widths[key] for key in self.simp.prunable_keys()}
        emit(self.sink, "baseline", metric=self.metric_before, widths=original)
        phases = cycle_plan(self.cfg.cycles, self.cfg.epochs, self.cfg.recovery_epochs)
        total_epochs = sum(p.epochs for p in phases)
        epoch_no = 0
        for phase in phases:
            if epoch_no + phase.epochs <= start_epoch:
                epoch_no += phase.epochs
                continue
            self._enter(phase)
            for _ in range(phase.epochs):
                if epoch_no >= start_epoch:
                    resuming = epoch_no == start_epoch and rng is not None
                    self._epoch(
                        phase,
                        epoch_no,
                        total_epochs,
                        skip=start_batch if resuming else 0,
                        rng=rng if resuming else None,
                    )
                epoch_no += 1
        if self._guard is not None and self.history:  # the run ended before its check was due
            last = self.history[-1]
            self._check_guard(last.metric, last.window, due=True)

    def _enter(self, phase: Phase) -> None:
        dense = phase.kind == "normal" and self.cfg.normal_backprop == "dense"
        set_k(self.model, None if dense else self.cfg.k)
        self.tracker.reset_window()
        self.simp.reset_means()
        self.simp.pause_means(phase.kind != "prune")  # only prunes use them
        emit(self.sink, "phase", phase=phase.kind, cycle=phase.cycle, epochs=phase.epochs)

    def _epoch(
        self,
        phase: Phase,
        epoch: int,
        total_epochs: int,
        *,
        skip: int = 0,
        rng: dict[str, Any] | None = None,
    ) -> None:
        """One pass over the train data; when resuming, replay its order up to batch ``skip``."""
        self._train_mode()
        if rng is not None and skip > 0:
            set_rng_state(self.epoch_rng)  # the same shuffle as the interrupted epoch
        else:
            if rng is not None:
                set_rng_state(rng)
            self.epoch_rng = rng_state()
        emit(
            self.sink,
            "epoch_start",
            epoch=epoch,
            epochs=total_epochs,
            phase=phase.kind,
            batches=self.n_batches,
            skipped=skip,
        )
        running, seen, in_window, count = 0.0, 0, 0, 0
        step: dict[str, Any] | None = None
        batches = iterate(self.train_data, where=f"train data (epoch {epoch + 1})")
        for i, batch in enumerate(batches):
            count = i + 1
            if i < skip:
                if i == skip - 1 and rng is not None:
                    set_rng_state(rng)  # the generators as they were at the checkpoint
                continue
            if step is not None:  # (the last step's event waits for the epoch's last window)
                emit(self.sink, "step", **step)
            loss = self._train_step(batch, epoch, i)
            running += loss
            seen += 1
            in_window += 1
            step = {"epoch": epoch, "batch": i + 1, "batches": self.n_batches, "loss": loss}
            if in_window >= self.window_batches and not self._short_tail(i):
                self._end_window(phase, epoch, running / seen)
                running, seen, in_window = 0.0, 0, 0
                self._checkpoint(epoch, i + 1)
            if count == self.n_batches and self.cfg.epoch_batches is not None:
                break  # an epoch is the first epoch_batches batches (no further one is read)
        self._check_count(count, epoch)
        if in_window:  # the epoch's last window ends with its data, however long it was
            self._end_window(phase, epoch, running / seen)
            self._checkpoint(epoch + 1, 0)
        if step is not None:
            emit(self.sink, "step", **step)

    def _check_count(self, count: int, epoch: int) -> None:
        """An epoch whose data ended early or ran on: windows stay sized from the count
        the run started with (a note says so, once); no batch at all is an error."""
        if count == 0:
            raise DataError(f"train data (epoch {epoch + 1}): no batches")
        if count == self.n_batches or self._miscounted:
            return
        self._miscounted = True
        advice = "" if self.cfg.epoch_batches is not None else (
            " (set epoch_batches to fix the length of an epoch)")
        emit(
            self.sink,
            "note",
            message=f"train data gave {count} batches in epoch {epoch + 1}, not the "
            f"{self.n_batches} {self.counted_by} gives: windows stay {self.window_batches} "
            f"batches long, and each epoch's last window ends with its data{advice}",
        )

    def _short_tail(self, i: int) -> bool:
        """Whether the batches left after batch ``i`` are under half a window: they join this
        window rather than make one of their own (the rule on 2 batches would cut deep).
        At the expected last batch the epoch's end closes the window; past it (data longer
        than its count) nothing is known of what is left."""
        left = self.n_batches - (i + 1)
        if left < 0:
            return False
        return 2 * left < self.window_batches

    def _train_step(self, batch: Any, epoch: int, index: int) -> float:
        inputs, targets = split_batch(batch, where="train data")
        where = f"train batch {index + 1} (epoch {epoch + 1})"
        inputs, targets = to_device((inputs, targets), self.device, where=where)
        with captured(self.model, self.layers) as mine, captured(
            self.teacher, self.layers
        ) as theirs:
            with user_code("the model", where):
                outputs = self.net(*inputs)
            with user_code("the loss", where):
                loss = self.loss_fn(outputs, targets)
            tasks.check_loss(loss, where)
            if self.teacher is not None:
                with torch.no_grad():
                    reference = self.teacher(*inputs)
                if self.cfg.distill > 0:
                    loss = loss + self.cfg.distill * tasks.distillation(
                        outputs, reference, targets, self.cfg.temperature
                    )
            if self.layers:
                loss = loss + self.cfg.layer_weight * layer_loss(mine, theirs, self.layers)
        value = float(loss.detach())
        if not math.isfinite(value):
            _check_batch(inputs, targets, where, self.cfg.batch_dim)  # the data's fault?
            raise NonFiniteLossError(
                f"loss became {value} on {where}, step {self.step + 1}; lower the learning "
                "rate or check the data"
            )
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        try:
            self.optimizer.step()
        except RuntimeError as exc:
            if "overflow" not in str(exc):
                raise
            raise NonFiniteLossError(  # Adam's lr / (1 - beta1^t) past float32 at lr ~1e38
                f"the optimizer step overflowed on {where}, step {self.step + 1} "
                f"(lr {self.cfg.lr:g}); lower the learning rate"
            ) from None
        self.step += 1
        return value

    def _nothing_pruned(self) -> list[str]:
        """A note when no layer ended smaller, saying why: a run that compressed nothing
        otherwise reads as a success."""
        widths = self.simp.widths()
        if not widths or any(w < self.simp.original_widths[k] for k, w in widths.items()):
            return []
        if self.rollbacks:
            frozen = sorted({k for r in self.rollbacks for k in r.keys})
            why = (f"the accuracy guard rolled back every prune (max_drop {self.cfg.max_drop:g}; "
                   f"frozen: {', '.join(frozen)}): allow a larger drop or prune more gently")
        else:
            why = ("no unit's hits fell below prune_rate x examples in a window: raise "
                   "prune_rate or lower k")
        return [f"nothing was pruned: {why}"]

    # ------------------------------------------------------------------ windows
    def _end_window(self, phase: Phase, epoch: int, loss: float) -> None:
        pruned: dict[str, list[int]] = {}
        if phase.kind == "prune":
            pruned = self._prune()
        self.simp.pause_means(True)
        metric = self._evaluate()
        self.simp.pause_means(phase.kind != "prune")
        record = WindowRecord(
            phase.kind,
            phase.cycle,
            epoch,
            self.window_index,
            self.step,
            loss,
            metric,
            self.simp.widths(),
            pruned,
        )
        self.history.append(record)
        emit(self.sink, "window", **record.to_dict())
        self._check_guard(metric, self.window_index)
        self.window_index += 1

    def _prune(self) -> dict[str, list[int]]:
        self.tracker.all_reduce()
        hits, examples = self.simp.activity(self.tracker)
        kept = decide(hits, examples, self.rule, frozen=self.frozen, tied=self.simp.tied())
        self.tracker.reset_window()
        if not kept:
            self.simp.reset_means()
            return {}
        if self.cfg.max_drop is not None:
            if self._guard is None:
                self._guard = {"snapshot": self._snapshot(), "keys": sorted(kept), "age": 0}
            else:  # a rollback to the pending snapshot undoes this prune too: it names it
                self._guard["keys"] = sorted(set(self._guard["keys"]) | set(kept))
        before = self.simp.widths()
        self._unwrap()  # DDP holds the old gradient accumulators: let them go
        step = self.simp.prune(self.model, kept, optimizer=self.optimizer)  # means: None if off
        self.net = wrap(self.model, self.world, self.device)  # DDP buckets follow the new shapes
        self.simp.select_activity(self.tracker, kept, step)
        self.simp.reset_means()
        after = self.simp.widths()
        pruned = {k: [before[k], after[k]] for k in kept}
        emit(self.sink, "prune", window=self.window_index, pruned=pruned)
        return pruned

    # ------------------------------------------------------------------ accuracy guard
    def _snapshot(self) -> dict[str, Any]:
        memo = {id(self.tracker): self.tracker}
        if self.teacher is not None:
            memo[id(self.teacher)] = self.teacher
        return {
            "model": copy.deepcopy(self.model, memo),
            "optimizer": copy.deepcopy(self.optimizer.state_dict()),
            "tracker": copy.deepcopy(self.tracker.state_dict()),
            "bench": self.simp.state(),
        }

    def _check_guard(self, metric: float, window: int, *, due: bool = False) -> None:
        """After window ``window`` (``metric`` its metric): roll back the pending prunes once
        their recovery windows are over (or now, when ``due``) if the metric fell too far."""
        guard = self._guard
        if guard is None:
            return
        guard["age"] += 1
        if guard["age"] < self.cfg.recovery_windows and not due:
            return
        self._guard = None
        sign = 1.0 if self.cfg.greater_is_better else -1.0
        threshold = self.metric_before - sign * float(self.cfg.max_drop)
        if sign * metric >= sign * threshold:
            return
        snap = guard["snapshot"]
        self._unwrap()
        self.model = snap["model"]
        self._train_mode()  # a snapshot rebuilt on resume comes in eval mode
        self.optimizer = self._make_optimizer()
        self.optimizer.load_state_dict(snap["optimizer"])
        self.tracker.load_state_dict(snap["tracker"])
        self.simp.restore(snap["bench"], self.model)
        self.net = wrap(self.model, self.world, self.device)
        self.frozen.update(guard["keys"])
        rollback = Rollback(window, guard["keys"], metric, threshold)
        self.rollbacks.append(rollback)
        emit(self.sink, "rollback", **rollback.to_dict())

    def _train_mode(self) -> None:
        self.model.train()
        for name, module in self.model.named_modules():
            if name in self.kept_eval:
                module.training = False

    def _unwrap(self) -> None:
        """Drop the DDP wrapper, if any, now: it holds the model's gradient accumulators and
        the process group, and a wrapper freed late (by the garbage collector, at exit) may
        tear down gloo's threads after the group is gone."""
        if self.net is not self.model:
            self.net = self.model
            gc.collect()

    def _evaluate(self) -> float:
        return evaluate(self.model, self.eval_data, self.metric_fn, self.device,
                        self.cfg.batch_dim)

    def _unseen_notes(self) -> list[str]:
        """Layers meProp never counted: no gradient reached them while pruning (frozen, with
        nothing before them trained), so they kept every unit."""
        seen = self.simp.total_examples(self.tracker)
        return [
            f"'{key}' kept every unit: no gradient reached it while pruning (its parameters "
            "are frozen and nothing before it trains), so meProp counted no activity"
            for key in self.simp.prunable_keys()
            if not seen.get(key)
        ]

    # ------------------------------------------------------------------ checkpoints
    def _checkpoint(self, epoch: int, batch: int) -> None:
        """Save everything needed to continue from (epoch, batch): called after every window."""
        if self.checkpointer is None:
            return
        guard = None
        if self._guard is not None:
            snap = self._guard["snapshot"]
            guard = {
                "keys": self._guard["keys"],
                "age": self._guard["age"],
                "plan": snap["bench"]["plan"].to_dict(),
                "model": _cpu_state(snap["model"]),
                "optimizer": snap["optimizer"],
                "tracker": snap["tracker"],
            }
        self.checkpointer.save(
            {
                "config": self.cfg.to_dict(),
                "data": self._data_signature(),
                "origin": self.origin,
                "epoch": epoch,
                "batch": batch,
                "window": self.window_index,
                "step": self.step,
                "plan": self.simp.plan.to_dict(),
                "notes": list(self.simp.surgery_notes),
                "model": _cpu_state(self.model),
                "optimizer": self.optimizer.state_dict(),
                "tracker": self.tracker.state_dict(),
                "history": [r.to_dict() for r in self.history],
                "rollbacks": [r.to_dict() for r in self.rollbacks],
                "frozen": sorted(self.frozen),
                "metric_before": self.metric_before,
                "guard": guard,
                "epoch_rng": self.epoch_rng,
                "rng": rng_state(),
            }
        )
        emit(self.sink, "checkpoint", epoch=epoch, batch=batch, window=self.window_index)

    def _data_signature(self) -> dict[str, Any]:
        """What a resume must find unchanged in the train data: batches per epoch and, for a
        DataLoader, the number of examples."""
        try:
            examples = len(self.train_data.dataset)  # type: ignore[attr-defined]
        except (AttributeError, TypeError):
            examples = None
        return {"batches": self.n_batches, "examples": examples}

    def _restore(self, state: dict[str, Any]) -> tuple[int, int, dict[str, Any]]:
        """Bring the freshly wrapped full-size model to the checkpoint; return the position."""
        if self.checkpointer is not None:
            self.checkpointer.check(state)
        saved, now = state.get("data"), self._data_signature()
        if saved is not None and saved != now:
            raise CheckpointError(
                f"the checkpoint was made on other train data ({saved['batches']} batches per "
                f"epoch, {saved['examples']} examples; now {now['batches']}, "
                f"{now['examples']}): resume with the data it was made on"
            )
        if state.get("origin") not in (None, self.origin):
            raise CheckpointError(
                "the checkpoint was made from other original weights (another weights file or "
                "model): resume with the ones it was made from"
            )
        self._unwrap()  # DDP holds the full-size model's buckets: let them go
        pristine = copy.deepcopy(self.model) if state.get("guard") else None
        self.simp.replay(self.model, Plan.from_dict(state["plan"]))
        if "notes" in state:  # what the prunes before the interruption could not do
            self.simp.surgery_notes = list(state["notes"])
        self.model.load_state_dict(state["model"])
        self.optimizer = self._make_optimizer()
        self.optimizer.load_state_dict(state["optimizer"])
        self.tracker.load_state_dict(state["tracker"])
        self.net = wrap(self.model, self.world, self.device)
        self.history = [WindowRecord(**r) for r in state["history"]]
        self.rollbacks = [Rollback(**r) for r in state["rollbacks"]]
        self.frozen = set(state["frozen"])
        self.metric_before = float(state["metric_before"])
        self.step, self.window_index = int(state["step"]), int(state["window"])
        self.epoch_rng = state["epoch_rng"]
        guard = state.get("guard")
        if guard and pristine is not None:
            plan = Plan.from_dict(guard["plan"])
            bench = self.simp.state_for(plan)
            self.simp.replay(pristine, plan, update=False)
            pristine.load_state_dict(guard["model"])
            self._guard = {
                "keys": list(guard["keys"]),
                "age": int(guard["age"]),
                "snapshot": {
                    "model": pristine,
                    "optimizer": guard["optimizer"],
                    "tracker": guard["tracker"],
                    "bench": bench,
                },
            }
        epoch, batch = int(state["epoch"]), int(state["batch"])
        for _ in range(epoch):  # advance loaders that keep their own generator past those epochs
            for j, _ in enumerate(self.train_data):  # (as far as each epoch read them)
                if self.cfg.epoch_batches is not None and j + 1 == self.n_batches:
                    break
        return epoch, batch, state["rng"]

    # ------------------------------------------------------------------ helpers
    def _make_optimizer(self) -> torch.optim.Optimizer:
        params = [p for p in self.model.parameters() if p.requires_grad]
        if not params:
            raise ShapeError("the model has no trainable parameters")
        cfg = self.cfg
        if cfg.sparse_update:
            from .optim import RowSparseAdam, RowSparseSGD

            if cfg.optimizer == "sgd":
                return RowSparseSGD(params, lr=cfg.lr, momentum=0.9, weight_decay=cfg.weight_decay)
            return RowSparseAdam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        if cfg.optimizer == "sgd":
            return torch.optim.SGD(params, lr=cfg.lr, momentum=0.9, weight_decay=cfg.weight_decay)
        if cfg.optimizer == "adamw":
            return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


def _check_outputs(model: nn.Module, outputs: Any, inputs: tuple[Any, ...], where: str) -> None:
    """When the model's outputs hold NaN: DataError naming the input that does, or
    NonFiniteLossError when fine-tuning made the weights non-finite, else DataError."""
    if not has_nan(outputs):
        return
    if (i := nan_input(inputs)) is not None:
        raise DataError(f"{where}: input {i} holds NaN values")
    for name, p in model.named_parameters():
        if p.is_floating_point() and not bool(torch.isfinite(p).all()):
            raise NonFiniteLossError(
                f"the weights became non-finite in fine-tuning ('{name}'; seen on {where}); "
                "lower the learning rate"
            )
    raise DataError(f"{where}: the model's outputs hold NaN values")


def _check_batch(inputs: tuple[Any, ...], targets: Any, where: str, batch_dim: int) -> None:
    """DataError when a batch that gave a non-finite loss is empty or holds NaN/inf."""
    if batch_size(inputs, batch_dim) == 0:
        raise DataError(f"{where} has no examples")
    if (i := nan_input(inputs)) is not None:
        raise DataError(f"{where}: input {i} holds NaN values (the loss became NaN on it)")
    for t in pytree.tree_leaves(targets):
        if isinstance(t, torch.Tensor) and t.is_floating_point() and not bool(t.isfinite().all()):
            raise DataError(f"{where}: its targets hold NaN or infinite values (the loss "
                            "became non-finite on them)")


def _cpu_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
