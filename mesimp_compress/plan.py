"""The plan: which units each layer key keeps, and the module edits that realise it.

A plan is plain data and serialises to JSON, so it replays on a freshly built model without
tracing it again. ``kept[key]`` is the sorted list of unit indices a layer key keeps;
``edits`` lists, per module dimension, the indices kept along it (``role`` says which
dimension: ``"out"`` rows of a Linear/Conv, ``"in"`` its input columns, ``"features"`` of a
BatchNorm, ``"hidden:l0"`` ... of an LSTM) and the shape attribute that records its length.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from .errors import PlanError, UnsupportedStructureError
from .graph import Structure

PLAN_FORMAT = "mesimp-plan"
PLAN_VERSION = 1


@dataclass(frozen=True)
class Edit:
    """Keep ``kept`` (sorted indices) of the ``size`` entries of one module dimension."""

    module: str
    kind: str
    role: str
    size: int
    kept: tuple[int, ...]
    attr: str

    @property
    def width(self) -> int:
        """Length of the dimension after the edit."""
        return len(self.kept)

    @property
    def attrs(self) -> dict[str, int]:
        """The module's new shape attribute, e.g. ``{"in_features": 30}``."""
        return {self.attr: self.width}

    @property
    def removed(self) -> tuple[int, ...]:
        """Indices the edit removes."""
        keep = set(self.kept)
        return tuple(i for i in range(self.size) if i not in keep)


@dataclass
class Plan:
    """Kept units per layer key (``widths`` gives each key's width before the plan) and edits."""

    kept: dict[str, list[int]]
    widths: dict[str, int]
    edits: list[Edit]

    def new_widths(self) -> dict[str, int]:
        """Width of every planned key after the plan."""
        return {key: len(units) for key, units in self.kept.items()}

    def removed(self) -> dict[str, list[int]]:
        """Removed unit indices per planned key."""
        out = {}
        for key, units in self.kept.items():
            keep = set(units)
            out[key] = [u for u in range(self.widths[key]) if u not in keep]
        return out

    def is_empty(self) -> bool:
        """True when the plan removes nothing."""
        return not self.edits

    def validate(self) -> None:
        """Check internal consistency; raise PlanError naming the first problem."""
        for key, units in self.kept.items():
            if key not in self.widths:
                raise PlanError(f"plan keeps units of '{key}' but gives no width for it")
            _check_indices(units, self.widths[key], f"layer key '{key}'")
        seen = set()
        for edit in self.edits:
            where = f"module '{edit.module}' ({edit.role})"
            if (edit.module, edit.role) in seen:
                raise PlanError(f"{where} is edited twice in one plan")
            seen.add((edit.module, edit.role))
            _check_indices(edit.kept, edit.size, where)
            if edit.role == "out" and edit.module in self.kept and (
                list(edit.kept) != list(self.kept[edit.module])
            ):  # a Linear/Conv key is its module: its own rows must be the kept units
                raise PlanError(
                    f"{where} keeps {list(edit.kept)[:8]}... but the plan keeps "
                    f"{list(self.kept[edit.module])[:8]}... of layer key '{edit.module}'"
                )

    # ------------------------------------------------------------------ JSON
    def to_dict(self) -> dict[str, Any]:
        """The plan as JSON-ready data."""
        return {
            "format": PLAN_FORMAT,
            "version": PLAN_VERSION,
            "kept": {k: list(v) for k, v in self.kept.items()},
            "widths": dict(self.widths),
            "edits": [
                {
                    "module": e.module,
                    "kind": e.kind,
                    "role": e.role,
                    "size": e.size,
                    "kept": list(e.kept),
                    "attrs": e.attrs,
                }
                for e in self.edits
            ],
        }

    def to_json(self) -> str:
        """The plan as a JSON string."""
        return json.dumps(self.to_dict(), indent=1)

    @classmethod
    def from_dict(cls, data: Any) -> Plan:
        """Read a plan from :meth:`to_dict` data; PlanError if it is malformed."""
        if not isinstance(data, Mapping) or data.get("format") != PLAN_FORMAT:
            raise PlanError(f"not a mesimp plan: expected format '{PLAN_FORMAT}'")
        version = data.get("version")
        if isinstance(version, bool) or version != PLAN_VERSION:  # True == 1
            raise PlanError(
                f"plan version {data.get('version')!r} is not supported (expected {PLAN_VERSION})"
            )
        try:
            kept = {str(k): [_as_index(i) for i in v] for k, v in data["kept"].items()}
            widths = {str(k): _as_index(v) for k, v in data["widths"].items()}
            edits = []
            for e in data["edits"]:
                attrs = e["attrs"]
                if not isinstance(attrs, Mapping) or len(attrs) != 1:
                    raise PlanError(f"edit of '{e['module']}' needs exactly one shape attribute")
                ((attr, width),) = attrs.items()
                _as_name(attr)
                edit = Edit(
                    _as_name(e["module"]),
                    _as_name(e["kind"]),
                    _as_name(e["role"]),
                    _as_index(e["size"]),
                    tuple(_as_index(i) for i in e["kept"]),
                    str(attr),
                )
                if _as_index(width) != edit.width:
                    raise PlanError(
                        f"edit of '{edit.module}': {attr}={width} but {edit.width} kept"
                    )
                edits.append(edit)
        except (KeyError, TypeError, AttributeError, ValueError) as err:
            raise PlanError(f"malformed plan: {type(err).__name__}: {err}") from err
        plan = cls(kept, widths, edits)
        plan.validate()
        return plan

    @classmethod
    def from_json(cls, text: str) -> Plan:
        """Read a plan from a JSON string; PlanError if it is malformed."""
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise PlanError(f"plan is not valid JSON: {err}") from err
        except TypeError:
            raise PlanError(f"a plan is JSON text, got {type(text).__name__}") from None
        except RecursionError:
            raise PlanError("plan is not a plan.json (JSON nested too deeply)") from None
        return cls.from_dict(data)

    # ---------------------------------------------------------- composition
    def then(self, later: Plan) -> Plan:
        """One plan equal to applying ``self`` and then ``later`` (built on the smaller model)."""
        kept = {k: list(v) for k, v in self.kept.items()}
        widths = dict(self.widths)
        for key, units in later.kept.items():
            if key in kept:
                if later.widths[key] != len(kept[key]):
                    raise PlanError(
                        f"layer key '{key}': the later plan expects width {later.widths[key]}, "
                        f"the earlier one leaves {len(kept[key])}"
                    )
                kept[key] = [kept[key][u] for u in units]
            else:
                kept[key] = list(units)
                widths[key] = later.widths[key]
        edits = {(e.module, e.role): e for e in self.edits}
        for e in later.edits:
            first = edits.get((e.module, e.role))
            if first is None:
                edits[(e.module, e.role)] = e
                continue
            if e.size != first.width or e.kind != first.kind:
                raise PlanError(
                    f"module '{e.module}' ({e.role}): the later plan expects size {e.size}, "
                    f"the earlier one leaves {first.width}"
                )
            edits[(e.module, e.role)] = Edit(
                e.module, e.kind, e.role, first.size, tuple(first.kept[i] for i in e.kept), e.attr
            )
        plan = Plan(kept, widths, list(edits.values()))
        plan.validate()
        return plan


def make_plan(structure: Structure, kept: Mapping[str, Iterable[int]]) -> Plan:
    """Build the plan that keeps ``kept[key]`` units of each given layer key.

    Keys not given keep all their units. Raises UnsupportedStructureError for a key that
    ``structure`` left alone (naming why), PlanError for an unknown key, an index out of
    range, a duplicate, an empty kept set, or unequal counts over tied keys (one nn.LSTM).
    """
    plan_kept: dict[str, list[int]] = {}
    widths: dict[str, int] = {}
    for key, units in kept.items():
        group = structure.groups.get(key)
        if group is None:
            reason = structure.reason(key)
            if reason is not None:
                raise UnsupportedStructureError(f"'{key}' cannot be pruned: {reason}")
            known = ", ".join(sorted(structure.groups)) or "none"
            raise PlanError(f"unknown layer key '{key}'; prunable keys: {known}")
        try:
            values = [_as_index(u) for u in units]
        except (TypeError, ValueError) as err:
            raise PlanError(f"layer key '{key}': {err}") from err
        _check_indices(values, group.width, f"layer key '{key}'", sort_ok=True)
        plan_kept[key] = sorted(values)
        widths[key] = group.width
    for tied in structure.tied_sets():
        counts = {
            k: len(plan_kept[k]) if k in plan_kept else structure.groups[k].width for k in tied
        }
        if len(set(counts.values())) > 1:
            raise PlanError(
                f"tied keys must keep equal unit counts (one nn.LSTM has one hidden_size): {counts}"
            )
    removed: dict[tuple[str, str], set[int]] = {}
    info: dict[tuple[str, str], tuple[str, int, str]] = {}
    for key, units in plan_kept.items():
        group = structure.groups[key]
        gone = sorted(set(range(group.width)) - set(units))
        for member in group.members:
            slot = (member.module, member.role)
            spec = (member.kind, member.size, member.attr)
            if info.setdefault(slot, spec) != spec:
                raise PlanError(
                    f"module '{member.module}' ({member.role}) is described inconsistently"
                )
            positions = removed.setdefault(slot, set())
            for u in gone:
                positions.update(member.positions[u])
    edits = []
    for slot, positions in removed.items():
        if not positions:
            continue
        kind, size, attr = info[slot]
        keep = tuple(i for i in range(size) if i not in positions)
        if not keep:
            raise PlanError(f"module '{slot[0]}' ({slot[1]}) would keep nothing")
        edits.append(Edit(slot[0], kind, slot[1], size, keep, attr))
    return Plan(plan_kept, widths, edits)


def _as_name(value: Any) -> str:
    """A name field of a plan file (a module, a kind, a role, an attribute)."""
    if not isinstance(value, str):
        raise TypeError(f"expected a name, got {value!r}")
    return value


def _as_index(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        if hasattr(value, "item") and not isinstance(value, bool):
            try:
                value = value.item()
            except (RuntimeError, ValueError):  # an array of several: a nested index list
                raise ValueError(f"expected an int index, found {value!r}") from None
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"expected an int index, found {value!r}")
    return int(value)


def _check_indices(units: Iterable[int], size: int, where: str, sort_ok: bool = False) -> None:
    units = list(units)
    if not units:
        raise PlanError(f"{where}: the kept set is empty (at least one unit must stay)")
    bad = [u for u in units if not 0 <= u < size]
    if bad:
        raise PlanError(f"{where}: indices {bad[:5]} out of range 0..{size - 1}")
    if len(set(units)) != len(units):
        dupes = sorted({u for u in units if units.count(u) > 1})
        raise PlanError(f"{where}: duplicate indices {dupes[:5]}")
    if not sort_ok and units != sorted(units):
        raise PlanError(f"{where}: indices must be sorted")
