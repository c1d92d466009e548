"""The bridge between training and surgery: which layer keys may shrink, and shrinking them.

A :class:`Simplifier` holds the structure of the model being compressed (found once, on the
full model, by :func:`mesimp_compress.graph.find_groups`), the plan accumulated so far (every
removal in original indexing, so ``plan.json`` rebuilds the result from a fresh model), and the
activation means used to compensate removed units. After each surgery the structure is
*restricted* to the kept units rather than traced again: the meProp wrappers stay in place and
fractional ``k`` keeps its base.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from dataclasses import replace
from fnmatch import fnmatchcase
from typing import Any

import torch
from torch import nn

from .activity import ActivityTracker
from .config import CompressConfig
from .errors import ConfigError, KError, UnsupportedStructureError
from .graph import ROLE_FEATURES, ROLE_IN, Group, Structure, find_groups
from .graph.build import OUTPUT_REASON
from .meprop.apply import output_layer_of
from .plan import Plan, make_plan
from .surgery import ActivationMeans, apply_plan, update_configs
from .surgery.compensation import measured
from .surgery.hfconfig import config_values, restore_values


def _output_layer(model: nn.Module, structure: Structure) -> str | None:
    """The layer whose units reach the model output, as the trace saw it (the last such
    module in definition order when there are several); else the last eligible module."""
    reaching = {s.name for s in structure.skipped if s.reason == OUTPUT_REASON}
    found = [name for name, _ in model.named_modules() if name in reaching]
    return found[-1] if found else output_layer_of(model)


def restrict(structure: Structure, plan: Plan) -> Structure:
    """The structure of the model after ``plan``: pruned groups lose their removed units and
    every member dimension that the plan shortened is re-indexed."""
    slots = {(e.module, e.role): {old: new for new, old in enumerate(e.kept)} for e in plan.edits}
    sizes = {(e.module, e.role): e.width for e in plan.edits}
    groups: dict[str, Group] = {}
    for key, group in structure.groups.items():
        units = plan.kept.get(key, range(group.width))
        members = []
        for m in group.members:
            slot = (m.module, m.role)
            where = slots.get(slot)
            if where is None:
                positions = tuple(m.positions[u] for u in units)
                members.append(replace(m, positions=positions))
                continue
            positions = tuple(tuple(where[p] for p in m.positions[u]) for u in units)
            members.append(replace(m, size=sizes[slot], positions=positions))
        groups[key] = replace(group, width=len(units), members=tuple(members))
    return Structure(groups, list(structure.skipped))


class Simplifier:
    """Structure, cumulative plan and compensation means of one compression run."""

    def __init__(self, model: nn.Module, structure: Structure, config: CompressConfig) -> None:
        self.cfg = config
        self.structure = structure
        self.original_structure = structure
        self.original_widths = structure.widths()
        self.plan = Plan({}, {}, [])
        # distinct notes of the settings and of every prune so far
        self.surgery_notes: list[str] = [*_exclude_notes(model, structure, config.exclude),
                                         *_layout_notes(model, config.batch_dim)]
        self.config_notes: list[str] = []  # what the HF configs cannot say, now
        self._config_values = config_values(model)  # as they were before any prune
        self.output_layer = config.output_layer or _output_layer(model, structure)
        self.means: ActivationMeans | None = None
        if config.compensate != "off":
            self.means = self._measure(model)
        self._keys = self._choose_keys()

    @classmethod
    def build(cls, model: nn.Module, example_inputs: Any, config: CompressConfig) -> Simplifier:
        """Trace ``model`` once; raise UnsupportedStructureError if nothing can be pruned."""
        structure = find_groups(
            model, example_inputs, exclude=config.exclude, allow_residual=config.allow_residual
        )
        simplifier = cls(model, structure, config)
        if not simplifier._keys:
            simplifier.detach_means(model)
            left = simplifier.skipped()[:6]
            reasons = "; ".join(f"{s['name']}: {s['reason']}" for s in left) or "none"
            hint = " (no key matches --include)" if config.include and structure.groups else ""
            raise UnsupportedStructureError(
                f"no layer of this model can be pruned{hint}; left alone: {reasons}"
            )
        simplifier._check_k()
        return simplifier

    def _check_k(self) -> None:
        """k >= width on every prunable layer would select every unit: nothing to learn from."""
        from .meprop.settings import resolve_k

        widths = self.widths()
        ks = {key: resolve_k(self.cfg.k, width, key) for key, width in widths.items()}
        if all(k is None or k >= widths[key] for key, k in ks.items()):
            self.detach_means()
            raise KError(
                f"k={self.cfg.k!r} selects every unit of every prunable layer (widths "
                f"{_brief(widths)}): nothing would be pruned; choose k below the widths"
            )
        from .schedule import Rule

        rule = Rule(self.cfg.prune_rate, self.cfg.min_width, self.cfg.round_to)
        if all(rule.least(w) >= w for w in widths.values()):
            self.detach_means()
            raise ConfigError(
                f"min_width={self.cfg.min_width} and round_to={self.cfg.round_to} keep every "
                f"unit of every prunable layer (widths {_brief(widths)}): nothing would be "
                "pruned; choose them below the widths"
            )

    def shrunk_copy(self, model: nn.Module) -> nn.Module:
        """A copy of ``model`` (built like the one this simplifier prunes, without its
        hooks) with one unit less in every prunable layer wider than one."""
        from .plan import make_plan
        from .surgery import apply_plan

        twin = copy.deepcopy(model)
        groups = self.structure.groups
        kept = {k: range(groups[k].width - 1) for k in self._keys if groups[k].width > 1}
        apply_plan(twin, make_plan(self.structure, kept))
        return twin

    # ------------------------------------------------------------------ queries
    def widths(self) -> dict[str, int]:
        """Current width of every prunable layer key."""
        return {key: self.structure.groups[key].width for key in self._keys}

    def prunable_keys(self) -> list[str]:
        """Layer keys the rule may shrink (after --include/--exclude)."""
        return list(self._keys)

    def resized_outputs(self) -> set[str]:
        """Names of the modules whose output loses units when the prunable keys shrink."""
        groups = self.structure.groups
        return {m.module for key in self._keys for m in groups[key].members if m.role != ROLE_IN}

    def tied(self) -> list[tuple[str, ...]]:
        """Sets of keys that must keep equal counts (the layers of one nn.LSTM)."""
        return [t for t in self.structure.tied_sets() if any(k in self._keys for k in t)]

    def skipped(self) -> list[dict[str, str]]:
        """Keys and modules left alone, each with the reason (``include`` leaves out the
        prunable keys it does not match)."""
        left = [{"name": s.name, "reason": s.reason} for s in self.structure.skipped]
        patterns = ", ".join(self.cfg.include or [])
        return left + [
            {"name": key, "reason": "named as the output layer (output_layer): never pruned"
             if group.module == self.cfg.output_layer
             else f"not matched by include ({patterns})"}
            for key, group in self.structure.groups.items()
            if key not in self._keys
        ]

    def kept_original(self) -> dict[str, list[int]]:
        """Kept units of every prunable key, in the original model's indexing."""
        return {
            key: list(self.plan.kept.get(key, range(self.original_widths[key])))
            for key in self._keys
        }

    def final_plan(self) -> Plan:
        """Everything removed, as one plan from the original model."""
        return self.plan

    # ------------------------------------------------------------------ activity
    def writers(self, key: str) -> tuple[str, ...]:
        """The meProp keys whose activity counts for ``key`` (several on a residual stream)."""
        return self.structure.groups[key].writers or (key,)

    def activity(self, tracker: ActivityTracker) -> tuple[dict[str, torch.Tensor], dict[str, int]]:
        """This window's hits and examples per prunable key (summed over writers)."""
        return self._summed(tracker, tracker.window_hits), self._summed(
            tracker, tracker.window_examples
        )

    def select_activity(self, tracker: ActivityTracker, kept: Mapping[str, Any],
                        step: Plan | None = None) -> None:
        """Keep only the counters of kept units (current indexing) after a prune: of the
        writers, and, as ``step`` (the prune's plan) cut them, of the layers whose channels
        follow other layers' (a depthwise convolution: its channels may come from a concat
        of several groups, at other positions)."""
        for key, idx in kept.items():
            for writer in self.writers(key):
                tracker.select(writer, idx)
        for edit in step.edits if step is not None else ():
            if edit.role == ROLE_FEATURES:
                tracker.select(edit.module, list(edit.kept))

    def total_hits(self, tracker: ActivityTracker) -> dict[str, list[int]]:
        """Hits per kept unit since the start, per key."""
        hits = self._summed(tracker, tracker.total_hits)
        return {key: [int(v) for v in h] for key, h in hits.items()}

    def total_examples(self, tracker: ActivityTracker) -> dict[str, int]:
        """Examples seen since the start, per key (the base of :meth:`total_hits`)."""
        return self._summed(tracker, tracker.total_examples)

    def _summed(self, tracker: ActivityTracker, read: Any) -> dict[str, Any]:
        """``read(writer)`` summed over the recorded writers of every prunable key."""
        recorded = set(tracker.keys())
        out = {}
        for key in self._keys:
            sources = [w for w in self.writers(key) if w in recorded]
            if sources:
                out[key] = sum(read(w) for w in sources)
        return out

    # ------------------------------------------------------------------ surgery
    def prune(
        self,
        model: nn.Module,
        kept: Mapping[str, Any],
        *,
        optimizer: Any = None,
        compensate: bool = True,
    ) -> Plan:
        """Shrink ``model`` to ``kept`` (current indexing), update structure and plan."""
        step = make_plan(self.structure, {k: [int(i) for i in v] for k, v in kept.items()})
        means = self.means if compensate and self.means is not None else None
        if means is not None:
            means.all_reduce()
        report = apply_plan(model, step, optimizer=optimizer, compensation=means, configs=False)
        self.structure = restrict(self.structure, step)
        self.plan = self.plan.then(step)
        self.surgery_notes += [n for n in report.notes if n not in self.surgery_notes]
        self.sync_configs(model)
        return step

    def sync_configs(self, model: nn.Module) -> None:
        """Set the FFN widths of the model's Hugging Face configs from the whole plan so far
        (layers that shrank in different windows and then met at one width set it too)."""
        restore_values(model, self._config_values)
        self.config_notes = update_configs(model, self.plan)

    def notes(self) -> list[str]:
        """What the prunes so far could not do (compensation, configs), each once."""
        return self.surgery_notes + self.config_notes

    def reset_means(self) -> None:
        """Start measuring means afresh (a new window)."""
        if self.means is not None:
            self.means.reset()

    def pause_means(self, paused: bool) -> None:
        """Stop (or resume) recording means, e.g. around evaluation."""
        if self.means is not None:
            self.means.enabled = not paused

    def detach_means(self, model: nn.Module | None = None) -> None:
        """Remove every means hook (also those copied into a restored model)."""
        if self.means is not None:
            self.means.close()
        if model is not None:
            _strip_means_hooks(model)

    # ------------------------------------------------------------------ rollback
    def state(self) -> dict[str, Any]:
        """What :meth:`restore` needs to go back to this point."""
        return {"structure": copy.deepcopy(self.structure), "plan": copy.deepcopy(self.plan)}

    def restore(self, state: Mapping[str, Any], model: nn.Module) -> None:
        """Return to ``state``; ``model`` is the restored copy, measured from now on."""
        self.structure = state["structure"]
        self.plan = state["plan"]
        self.sync_configs(model)
        if self.means is not None:
            enabled = self.means.enabled  # a rollback in a normal phase stays unmeasured
            self.means.close()
            _strip_means_hooks(model)
            self.means = self._measure(model)
            self.means.enabled = enabled

    def _measure(self, model: nn.Module) -> ActivationMeans:
        return ActivationMeans(model, self._consumers(model),
                               covariance=self.cfg.compensate == "linear")

    def state_for(self, plan: Plan) -> dict[str, Any]:
        """The :meth:`state` of this run at the point where ``plan`` had been applied."""
        return {"structure": restrict(self.original_structure, plan), "plan": plan}

    def replay(self, model: nn.Module, plan: Plan, *, update: bool = True) -> None:
        """Apply a cumulative ``plan`` to the full-size ``model`` (resuming a run); with
        ``update``, this run's structure and plan become those after ``plan``."""
        notes = apply_plan(model, plan).notes if not plan.is_empty() else []
        if update:
            self.structure = restrict(self.original_structure, plan)
            self.plan = plan
            self.config_notes = notes  # the configs' (no compensation here)

    # ------------------------------------------------------------------ helpers
    def _choose_keys(self) -> list[str]:
        patterns = list(self.cfg.include or [])
        keys = []
        for key, group in self.structure.groups.items():
            if patterns and not any(
                fnmatchcase(key, p) or fnmatchcase(group.module, p) for p in patterns
            ):
                continue
            if group.module == self.cfg.output_layer:  # named: meProp leaves it dense too
                continue
            keys.append(key)
        return keys

    def _consumers(self, model: nn.Module) -> list[str]:
        modules = dict(model.named_modules())
        names = {
            m.module for g in self.structure.groups.values() for m in g.members if m.role == ROLE_IN
        }
        return sorted(n for n in names if measured(modules.get(n)))


def _exclude_notes(model: nn.Module, structure: Structure, patterns: Any) -> list[str]:
    """What an exclude pattern that leaves no layer alone matched: nothing (a typo?), or only
    modules that are no prunable layer (a container, or a BatchNorm or depthwise convolution,
    which follow the layer feeding them)."""
    notes = []
    names = [n for n, _ in model.named_modules() if n]
    keys = {*structure.groups, *(g.module for g in structure.groups.values()),
            *(s.name for s in structure.skipped)}
    for pattern in patterns or ():
        if any(fnmatchcase(key, pattern) for key in keys):
            continue
        matched = [n for n in names if fnmatchcase(n, pattern)]
        if not matched:
            notes.append(f"exclude pattern '{pattern}' matches no module of the model")
        else:
            notes.append(
                f"exclude pattern '{pattern}' matches only {matched[:3]}, no prunable layer: "
                "name the layers ('name.*' for those inside a block), or, for a BatchNorm or "
                "depthwise convolution, the layer whose units it reads")
    return notes


def _layout_notes(model: nn.Module, batch_dim: int) -> list[str]:
    """With batch-first inputs assumed: the first time-major layer (an RNN or transformer
    with batch_first=False), whose inputs, if the model's are too, need batch_dim = 1."""
    if batch_dim != 0:
        return []
    kinds = (nn.RNNBase, nn.Transformer, nn.TransformerEncoderLayer, nn.TransformerDecoderLayer)
    for name, module in model.named_modules():
        if not isinstance(module, kinds):
            continue
        first = getattr(module, "batch_first", getattr(getattr(module, "self_attn", None),
                                                        "batch_first", True))
        if not first:
            return [f"'{name}' ({type(module).__name__}) takes time-major input (batch_first="
                    "False): if the model's inputs are (T, B, ...) too, set batch_dim = 1, so "
                    "that metrics count examples and the ONNX files take any batch size"]
    return []


def _strip_means_hooks(model: nn.Module) -> None:
    for module in model.modules():
        hooks = module._forward_pre_hooks
        for handle_id in [h for h, fn in hooks.items() if _is_means_hook(fn)]:
            del hooks[handle_id]


def _is_means_hook(fn: Any) -> bool:
    return "ActivationMeans._hook" in getattr(fn, "__qualname__", "")


def _brief(widths: Mapping[str, int], limit: int = 4) -> str:
    items = [f"{k}={v}" for k, v in widths.items()]
    return ", ".join(items[:limit]) + (", ..." if len(items) > limit else "")
