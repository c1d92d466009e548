"""Apply a plan: rebuild smaller dense modules in place.

Modules are edited in place, never replaced, so wrappers (meProp layers are subclasses) and
the user's references survive. Each edited Parameter keeps its identity: its ``.data`` (and
``.grad``) is replaced by the kept entries, so an optimizer keeps pointing at it, and its
state is remapped (:mod:`.optimizer`). Everything is checked before anything changes.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
from torch import nn

from ..errors import ConfigError, PlanError, UnsupportedStructureError
from ..events import EventSink, emit
from ..graph import HIDDEN_PREFIX, ROLE_IN
from ..graph.modules import type_name
from ..plan import Edit, Plan
from .compensation import ActivationMeans, Substitute
from .functions import ModulePruner, pruner_for
from .hfconfig import update_configs
from .optimizer import check_optimizer_state, remap_optimizer_state, select


@dataclass
class SurgeryReport:
    """What :func:`apply_plan` did."""

    params_before: int
    params_after: int
    edits: int
    compensated: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


@dataclass
class _Target:
    module: nn.Module
    pruner: ModulePruner
    edits: dict[str, Edit]

    def kept(self, device: torch.device) -> dict[str, torch.Tensor]:
        return {
            role: torch.tensor(e.kept, dtype=torch.long, device=device)
            for role, e in self.edits.items()
        }


def resolve(model: nn.Module, plan: Plan) -> dict[str, _Target]:
    """Check every edit against ``model``; the modules to edit, by name, in plan order."""
    plan.validate()
    modules = dict(model.named_modules())
    targets: dict[str, _Target] = {}
    for edit in plan.edits:
        module = modules.get(edit.module)
        if module is None:
            raise PlanError(f"the plan edits module '{edit.module}', which the model does not have")
        pruner = pruner_for(module)
        if pruner is None:
            raise PlanError(
                f"module '{edit.module}' is a {type(module).__name__}; no pruner for that kind "
                "(supported: Linear, Conv1d, Conv2d, Hugging Face Conv1D, BatchNorm, LSTM)"
            )
        if type_name(module) != edit.kind:
            raise PlanError(
                f"module '{edit.module}' is a {type_name(module)}, the plan expects a {edit.kind}"
            )
        problem = pruner.problem(module)
        if problem:
            raise UnsupportedStructureError(f"module '{edit.module}' cannot be edited: {problem}")
        sizes = pruner.sizes(module)
        if edit.role not in sizes:
            raise PlanError(
                f"module '{edit.module}' has no dimension '{edit.role}' (it has {sorted(sizes)})"
            )
        if sizes[edit.role] != edit.size:
            hint = (" (a plan of a model compressed before applies to that model: rebuild it "
                    "first, e.g. mc.load(mc.load(build(), first_run), second_run))"
                    if sizes[edit.role] > edit.size else "")
            raise PlanError(
                f"module '{edit.module}' ({edit.role}) has size {sizes[edit.role]}, "
                f"the plan expects {edit.size}{hint}"
            )
        target = targets.setdefault(edit.module, _Target(module, pruner, {}))
        target.edits[edit.role] = edit
    return targets


def _device(module: nn.Module) -> torch.device:
    for t in list(module.parameters(recurse=False)) + list(module.buffers(recurse=False)):
        return t.device
    return torch.device("cpu")


def apply_plan(
    model: nn.Module,
    plan: Plan,
    *,
    optimizer: torch.optim.Optimizer | None = None,
    compensation: Mapping[str, torch.Tensor] | None = None,
    sink: EventSink | None = None,
    configs: bool = True,
) -> SurgeryReport:
    """Shrink ``model`` in place as ``plan`` says.

    With ``optimizer``, its per-parameter state follows the kept entries. With
    ``compensation`` (an :class:`ActivationMeans`, or any mapping from consumer module name
    to the mean of its input features), each consumer absorbs its removed inputs'
    contribution: their mean into its bias, and with ``ActivationMeans(covariance=True)``
    also their least-squares prediction from the kept inputs into its weight. With
    ``configs``, the FFN width fields of Hugging Face configs follow (``plan`` must then
    start from the widths the configs hold). Raises PlanError if the plan does not fit the
    model, ConfigError for optimizer state or means that cannot follow, and changes nothing
    in those cases.
    """
    if not isinstance(model, nn.Module):
        raise ConfigError(f"apply_plan needs an nn.Module, got {type(model).__name__}")
    if not isinstance(plan, Plan):
        hint = " (read a plan file with read_plan)" if isinstance(plan, (str, os.PathLike)) else ""
        raise PlanError(f"apply_plan needs a Plan, got {type(plan).__name__}{hint}")
    targets = resolve(model, plan)
    params_before = sum(p.numel() for p in model.parameters())
    work: list[tuple[str, _Target, dict[str, dict[int, torch.Tensor]]]] = []
    owners: dict[int, str] = {}
    for name, target in targets.items():
        per_tensor: dict[str, dict[int, torch.Tensor]] = {}
        for piece in target.pruner.slices(target.module, target.kept(_device(target.module))):
            dims = per_tensor.setdefault(piece.tensor, {})
            if piece.dim in dims:
                raise PlanError(
                    f"module '{name}': tensor '{piece.tensor}' is sliced twice along {piece.dim}"
                )
            dims[piece.dim] = piece.index
            tensor = getattr(target.module, piece.tensor)
            if isinstance(tensor, nn.Parameter):
                other = owners.setdefault(id(tensor), name)
                if other != name:
                    raise PlanError(
                        f"modules '{other}' and '{name}' share a parameter; cannot edit both"
                    )
        work.append((name, target, per_tensor))
    report = SurgeryReport(params_before, params_before, len(plan.edits))
    deltas = _compensation(targets, compensation, report) if compensation is not None else []
    if optimizer is not None:
        check_optimizer_state(
            optimizer,
            [
                getattr(t.module, n)
                for _, t, tensors in work
                for n in tensors
                if isinstance(getattr(t.module, n), nn.Parameter)
            ],
        )
    with torch.no_grad():
        for module, tensor_name, delta in deltas:
            getattr(module, tensor_name).add_(delta)
        for name, target, per_tensor in work:
            for tensor_name, index in per_tensor.items():
                _slice_tensor(target.module, tensor_name, index, optimizer)
            target.pruner.resize(target.module, target.kept(_device(target.module)))
            for role, edit in target.edits.items():
                emit(sink, "surgery", module=name, role=role, before=edit.size, after=edit.width)
    if configs:  # a Hugging Face config's FFN width follows (a run in steps syncs its own)
        report.notes += update_configs(model, plan)
    report.params_after = sum(p.numel() for p in model.parameters())
    for note in report.notes:
        emit(sink, "note", message=note)
    return report


def _slice_tensor(
    module: nn.Module,
    name: str,
    index: dict[int, torch.Tensor],
    optimizer: torch.optim.Optimizer | None,
) -> None:
    tensor = getattr(module, name)
    if isinstance(tensor, nn.Parameter):
        old_shape = tensor.shape
        tensor.data = select(tensor.data, index)
        if tensor.grad is not None and tensor.grad.shape == old_shape:
            tensor.grad = select(tensor.grad, index)
        if optimizer is not None:
            remap_optimizer_state(optimizer, tensor, old_shape, index)
    else:
        setattr(module, name, select(tensor, index))


def _compensation(
    targets: dict[str, _Target], means: Mapping[str, torch.Tensor], report: SurgeryReport
) -> list[tuple[nn.Module, str, torch.Tensor]]:
    deltas = []
    for name, target in targets.items():
        hidden = [role for role in target.edits if role.startswith(HIDDEN_PREFIX)]
        if hidden:
            reason = target.pruner.fold(target.module, hidden[0], None)
            if isinstance(reason, str):
                report.notes.append(f"'{name}' hidden units: {reason}")
        edit = target.edits.get(ROLE_IN)
        if edit is None:
            continue
        mean = means.get(name)
        if mean is None:
            report.notes.append(
                f"no activation means for '{name}': its removed inputs are not compensated"
            )
            continue
        if mean.numel() != edit.size:
            raise ConfigError(
                f"activation means for '{name}' have {mean.numel()} features, "
                f"the module reads {edit.size}: measure them on the model being pruned"
            )
        device = _device(target.module)
        removed = torch.tensor(edit.removed, dtype=torch.long, device=device)
        if isinstance(means, ActivationMeans):
            sub = means.substitute(name, removed)
        else:
            kept = torch.tensor(sorted(set(range(edit.size)) - set(edit.removed)),
                                dtype=torch.long, device=device)
            sub = Substitute(removed, kept, mean.reshape(-1).to(device).index_select(0, removed))
        result = target.pruner.fold(target.module, ROLE_IN, sub)
        if isinstance(result, str):
            report.notes.append(f"'{name}' is not compensated: {result}")
            continue
        deltas += [(target.module, tensor_name, delta) for tensor_name, delta in result.items()]
        report.compensated.append(name)
    return deltas
