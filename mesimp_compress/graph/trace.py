"""One forward pass of the model under observation: where every unit goes.

The tracer is a ``TorchFunctionMode`` plus forward hooks. Layer modules with a rule in
:mod:`.modules` are atomic (their inner ops are not looked at); every other op of the
forward is seen and handled by :mod:`.ops`. What it records — groups, the module dimensions
reading each unit, blocked units with reasons, coupled units — is assembled into groups
by :mod:`.build`.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from ..errors import DataError, describe
from . import ops
from .labels import AxisLabel, Label, codes_of
from .modules import LSTMRule, ModuleRule, rule_for


@dataclass
class GroupInfo:
    """A producer's units as allocated during tracing (codes ``base .. base+width-1``)."""

    key: str
    kind: str
    module: str
    width: int
    base: int
    lstm: tuple[int, bool] | None = None
    reasons: list[str] = field(default_factory=list)

    def codes(self) -> torch.Tensor:
        return torch.arange(self.base, self.base + self.width)


@dataclass
class MemberRecord:
    """A module dimension that reads labelled positions (``codes`` along it)."""

    module: str
    kind: str
    role: str
    size: int
    attr: str
    codes: torch.Tensor


class Tracer(TorchFunctionMode):
    """Follows units through one forward pass (see module docstring)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.names = {module: name for name, module in model.named_modules()}
        self.labels: dict[int, Label] = {}
        self._alive: list[Any] = []
        self.groups: dict[str, GroupInfo] = {}
        self.module_groups: dict[str, list[GroupInfo]] = {}
        self.next_code = 1
        self.members: list[MemberRecord] = []
        self.recorded: dict[tuple[str, str], MemberRecord] = {}  # the last per (module, role)
        self.blocks: list[tuple[torch.Tensor, str]] = []
        self.couplings: list[tuple[torch.Tensor, torch.Tensor, str, str]] = []
        self.calls: Counter[str] = Counter()
        # (module, role) -> what each call read there: the codes along the axis read (in
        # order), or None (no units)
        self.reads: dict[tuple[str, str], list[torch.Tensor | None]] = {}
        self.misuse: dict[str, str] = {}
        self.explicit_states: set[str] = set()
        self.stack: list[str] = []
        self.depth = 0
        self.busy = False
        self.owned: dict[int, str] = {}  # parameters and buffers of atomic modules -> module
        for name, module in model.named_modules():
            if rule_for(module) is not None:
                for t in [*module.parameters(recurse=False), *module.buffers(recurse=False)]:
                    self.owned[id(t)] = name

    # ----------------------------------------------------------------- labels
    def label(self, t: Any) -> Label | None:
        """The label of tensor ``t`` (None if it carries no unit)."""
        return self.labels.get(id(t)) if isinstance(t, torch.Tensor) else None

    def set_label(self, t: torch.Tensor, label: Label) -> None:
        """Give ``t`` a label (keeps ``t`` alive so its id stays unique)."""
        self.labels[id(t)] = label
        self._alive.append(t)

    def where(self) -> str:
        """The module whose forward is running, for messages."""
        name = self.stack[-1] if self.stack else ""
        return f"'{name}'" if name else f"the forward of {type(self.model).__name__}"

    def block_codes(self, codes: torch.Tensor, reason: str) -> None:
        """Units with these codes cannot be removed."""
        if codes.numel():
            self.blocks.append((codes.reshape(-1).clone(), f"{reason} (in {self.where()})"))

    def block_tensors(self, tensors: list[torch.Tensor], reason: str) -> None:
        """Every unit carried by these tensors cannot be removed."""
        for t in tensors:
            label = self.label(t)
            if label is not None:
                self.block_codes(codes_of(label), reason)

    def couple(self, a: torch.Tensor, b: torch.Tensor, op: str) -> None:
        """Units ``a[i]`` and ``b[i]`` meet elementwise in op ``op`` (a residual add, a gate)."""
        self.couplings.append((a.clone(), b.clone(), f"op '{op}' in {self.where()}", op))

    # ---------------------------------------------------------------- modules
    def consume(
        self, name: str, kind: str, role: str, size: int, attr: str, x: torch.Tensor, axis: int
    ) -> None:
        """Module ``name`` reads ``x`` along ``axis`` as its ``role`` dimension (once per call:
        a module called again reading the same units adds no second record)."""
        label = self.label(x)
        reads = self.reads.setdefault((name, role), [])  # in order: a flip reads other units
        reads.append(None if label is None else
                     label.codes if isinstance(label, AxisLabel) else codes_of(label))
        if label is None:
            return
        if isinstance(label, AxisLabel) and label.axis == axis and label.codes.numel() == size:
            if not self.is_recorded(name, role, label):
                record = MemberRecord(name, kind, role, size, attr, label.codes)
                self.members.append(record)
                self.recorded[(name, role)] = record
        else:
            self.block_codes(
                codes_of(label), f"'{name}' reads the units along an axis that is not its {attr}"
            )

    def is_recorded(self, name: str, role: str, label: AxisLabel) -> bool:
        """Whether the last record of ``name``/``role`` holds exactly ``label``'s codes."""
        record = self.recorded.get((name, role))
        return record is not None and torch.equal(record.codes, label.codes)

    def _allocate(
        self,
        key: str,
        kind: str,
        module: str,
        width: int,
        problem: str | None,
        lstm: tuple[int, bool] | None = None,
    ) -> GroupInfo:
        info = self.groups.get(key)
        if info is None:
            info = GroupInfo(key, kind, module, width, self.next_code, lstm)
            if problem:
                info.reasons.append(problem)
            self.next_code += width
            self.groups[key] = info
            self.module_groups.setdefault(module, []).append(info)
        return info

    def produce(
        self,
        name: str,
        rule: ModuleRule,
        width: int,
        out: torch.Tensor,
        axis: int,
        module: nn.Module,
    ) -> None:
        """Module ``name`` produces ``width`` units along ``axis`` of ``out``."""
        problem = rule.producer_problem(module)
        info = self._allocate(name, rule.kind, name, width, problem)
        if not problem and out.shape[axis] == width:
            self.set_label(out, AxisLabel(axis, info.codes()))

    def produce_lstm(
        self, name: str, module: nn.LSTM
    ) -> dict[tuple[int, int], torch.Tensor] | None:
        """Allocate the LSTM's groups; their codes per (layer, direction), or None if unprunable."""
        problem = LSTMRule().producer_problem(module)
        if problem is None and name in self.explicit_states:
            problem = "it is called with an explicit initial state (h0, c0) that cannot shrink"
        dirs = 2 if module.bidirectional else 1
        codes = {}
        for layer in range(module.num_layers):
            for d in range(dirs):
                key = f"{name}.l{layer}{'_reverse' if d else ''}"
                info = self._allocate(
                    key, "LSTM", name, module.hidden_size, problem, (layer, bool(d))
                )
                if problem and problem not in info.reasons:
                    info.reasons.append(problem)
                codes[(layer, d)] = info.codes()
        return None if problem else codes

    def explicit_state(self, name: str, hx: Any) -> None:
        """LSTM ``name`` got an explicit (h0, c0)."""
        self.explicit_states.add(name)
        self.block_tensors(list(ops.iter_tensors(hx)), f"passed as the initial state of '{name}'")

    # ------------------------------------------------------------------ hooks
    def _pre(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        rule = rule_for(module)
        if self.depth:
            self.depth += rule is not None
            return
        name = self.names.get(module, "?")
        self.stack.append(name)
        self.calls[name] += 1
        if rule is not None:
            self.busy = True
            try:
                rule.before(self, name, module, args, kwargs)
            finally:
                self.busy = False
            self.depth = 1

    def _post(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        rule = rule_for(module)
        if rule is not None:
            self.depth -= 1
        if self.depth:
            return
        name = self.stack[-1] if self.stack else "?"
        if rule is not None:
            self.busy = True
            try:
                rule.after(self, name, module, args, kwargs, output)
            finally:
                self.busy = False
        if self.stack:
            self.stack.pop()

    def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: D105
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if self.busy or self.depth:
            return out
        self.busy = True
        try:
            if any(True for _ in ops.iter_tensors(out)):
                for t in ops.iter_tensors((args, kwargs)):
                    owner = self.owned.get(id(t))
                    if owner is not None:
                        self.misuse.setdefault(
                            owner,
                            f"its parameters or buffers are used directly by op "
                            f"'{ops.op_name(func)}' in {self.where()}",
                        )
            if any(self.label(t) is not None for t in ops.iter_tensors((args, kwargs))):
                ops.handle(self, func, args, kwargs, out)
        finally:
            self.busy = False
        return out

    # ------------------------------------------------------------------ run
    def run(self, example_inputs: Any) -> Any:
        """Run one forward (eval mode, no grad) and return the model's output."""
        flags = {m: m.training for m in self.model.modules()}
        handles = []
        for module in self.model.modules():
            handles.append(module.register_forward_pre_hook(self._pre, with_kwargs=True))
            handles.append(module.register_forward_hook(self._post, with_kwargs=True))
        self.model.eval()
        try:
            with torch.no_grad(), self:
                out = call_model(self.model, example_inputs)
        except Exception as err:
            where = self.stack[-1] if self.stack else type(self.model).__name__
            raise DataError(
                f"the forward pass on the example inputs failed in '{where}' while the "
                f"structure was traced: {describe(err)}"
            ) from err
        finally:
            for h in handles:
                h.remove()
            for m, flag in flags.items():
                m.training = flag
        return out

    def output_codes(self, out: Any) -> torch.Tensor:
        """Codes of every unit that reaches the model output."""
        found = [
            codes_of(self.label(t)) for t in ops.iter_tensors(out, objects=True)
            if self.label(t) is not None
        ]
        return torch.unique(torch.cat(found)) if found else torch.zeros(0, dtype=torch.int64)


def call_model(model: nn.Module, example_inputs: Any) -> Any:
    """Call ``model`` with ``**inputs`` (a mapping), ``*inputs`` (tuple/list) or ``inputs``."""
    if isinstance(example_inputs, Mapping):
        return model(**example_inputs)
    if isinstance(example_inputs, (tuple, list)):
        return model(*example_inputs)
    return model(example_inputs)
