"""The last step of :func:`find_groups`: check that the model really follows a smaller width.

The trace sees one forward pass at the original widths. Code that writes a width down as
numbers (``x.view(-1, 16 * 4 * 4)``, ``h.view(B, T, 3, 4)``, ``unflatten(-1, (3, 4))``) looks
like plain movement there, yet fails or scrambles the units once a layer loses some. So each
group is shrunk on a copy of the model, and the copy must give the outputs of the original with
the removed units' reads zeroed (the masked twin), and in train mode outputs of the same shapes
(a training-only head that reads a hidden layer is invisible to the eval-mode trace); a group
that does not is left alone, with what went wrong as its reason. Groups of one width lose
different numbers of units (2, 3, ..., then 1), taken from both ends first (a one-sided reflect
pad or a shift shows at one end only): groups whose widths the model ties together without
mixing their units (branches concatenated along the batch, stacked then split, ``view_as``) or
whose units it mixes by position (a channel shuffle after a concat) then fail. All groups are
shrunk together, so a model that follows every width pays for one check (one per round, and
one more, when a width has more groups than counts); when the model does not follow, halves
are checked until the groups that fail alone are found.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn
from torch.utils import _pytree as pytree

from ..errors import MesimpError
from .structure import Skipped, Structure
from .trace import call_model


def followed(model: nn.Module, example_inputs: Any, structure: Structure) -> Structure:
    """``structure`` without the groups the model does not follow when they shrink."""
    units = _units(structure)
    if not units:
        return structure
    gone, rounds = _removals(structure, units)
    failures: dict[tuple[str, ...], str] = {}
    for entries in rounds:
        failures.update(_failing(model, example_inputs, structure, entries, gone))
    if len(rounds) > 1:  # the rounds together, for what only their union shows
        survivors = [keys for keys in units if keys not in failures]
        failures.update(_failing(model, example_inputs, structure, survivors, gone))
    skipped = list(structure.skipped)
    dropped: set[str] = set()
    for keys, failure in failures.items():
        dropped.update(keys)
        skipped += [Skipped(key, failure) for key in keys]
    groups = {k: g for k, g in structure.groups.items() if k not in dropped}
    return Structure(groups, skipped)


def _failing(model: nn.Module, example_inputs: Any, structure: Structure,
             entries: list[tuple[str, ...]], gone: dict[str, set[int]]
             ) -> dict[tuple[str, ...], str]:
    """The entries to leave alone, with why: shrunk together they must be followed; when
    they are not, halves are checked (so one failing group among n costs about 2 log n
    checks, not n), then the rest together again."""
    found: dict[tuple[str, ...], str] = {}
    while entries:
        failure = _failure(model, example_inputs, structure, entries, gone)
        if failure is None:
            break
        bad = _bisect(model, example_inputs, structure, entries, gone, failure)
        found.update(bad)
        entries = [keys for keys in entries if keys not in bad]
    return found


def _bisect(model: nn.Module, example_inputs: Any, structure: Structure,
            entries: list[tuple[str, ...]], gone: dict[str, set[int]], failure: str,
            along: tuple[tuple[str, ...], ...] = ()) -> dict[tuple[str, ...], str]:
    """A small set of ``entries`` that fails (with ``along`` shrunk too; together they fail
    with ``failure``): a failing half is searched alone; when each half is followed and
    only both fail, the part of each half that fails with the other is searched."""
    if len(entries) == 1:
        return {entries[0]: failure}
    half = len(entries) // 2
    left, right = entries[:half], entries[half:]
    for part in (left, right):
        problem = _failure(model, example_inputs, structure, [*along, *part], gone)
        if problem is not None:
            return _bisect(model, example_inputs, structure, part, gone, problem, along)
    found = _bisect(model, example_inputs, structure, right, gone, failure, (*along, *left))
    found.update(_bisect(model, example_inputs, structure, left, gone, failure,
                         (*along, *found)))
    together = _failure(model, example_inputs, structure,
                        [keys for keys in entries if keys in found], gone)
    return {keys: together or failure for keys in found}  # the reason names just them


def _units(structure: Structure) -> list[tuple[str, ...]]:
    """The keys to shrink, each tied set (one nn.LSTM's layers) as one entry."""
    units: dict[tuple[str, ...], None] = {}
    for key, group in structure.groups.items():
        keys = tuple(group.tied) or (key,)
        if all(structure.groups[k].width >= 2 for k in keys if k in structure.groups):
            units.setdefault(keys, None)
    return list(units)


def _removals(structure: Structure, units: list[tuple[str, ...]]
              ) -> tuple[dict[str, set[int]], list[list[tuple[str, ...]]]]:
    """The units each key loses in the check, and the rounds to check: entries of one width
    lose different counts within a round (a width has width - 1 counts: more entries of it
    than that spill into further rounds, as a tie between two entries that lose the same
    units would not show)."""
    gone: dict[str, set[int]] = {}
    seen: dict[int, int] = {}
    rounds: list[list[tuple[str, ...]]] = []
    for keys in units:
        width = next(structure.groups[k].width for k in keys if k in structure.groups)
        index = seen.get(width, 0)
        seen[width] = index + 1
        counts = [*range(2, width), 1]  # 2, 3, ..., width - 1, then 1: one unit always stays
        lost = set(_from_both_ends(width)[: counts[index % len(counts)]])
        gone.update({k: lost for k in keys})
        round_no = index // len(counts)
        while len(rounds) <= round_no:
            rounds.append([])
        rounds[round_no].append(keys)
    return gone, rounds


def _from_both_ends(width: int) -> list[int]:
    """0, width - 1, 1, width - 2, ...: every unit once, the ends first."""
    order: list[int] = []
    for lo in range((width + 1) // 2):
        order += [lo] if lo == width - 1 - lo else [lo, width - 1 - lo]
    return order


def _failure(model: nn.Module, example_inputs: Any, structure: Structure,
             units: list[tuple[str, ...]], gone: dict[str, set[int]]) -> str | None:
    """What goes wrong when every key of ``units`` loses its units of ``gone``, or None."""
    from ..plan import make_plan
    from ..surgery import apply_plan, zero_removed

    kept = {k: [u for u in range(structure.groups[k].width) if u not in gone[k]]
            for keys in units for k in keys if k in structure.groups}
    plan = make_plan(structure, kept)
    try:
        masked, shrunk = copy.deepcopy(model).eval(), copy.deepcopy(model).eval()
    except Exception:  # noqa: BLE001 - a model that cannot be copied is not checked here
        return None
    named = ", ".join(f"'{k}'" for k in kept)
    verb = "loses" if len(kept) == 1 else "lose"
    try:
        zero_removed(masked, plan)  # refuses a member it cannot edit (a parametrized weight)
        apply_plan(shrunk, plan)
        expected, got = _run(masked, example_inputs), _run(shrunk, example_inputs)
    except MesimpError as exc:  # surgery refused a member
        return f"{named} cannot shrink: {exc}"
    except Exception as exc:  # noqa: BLE001 - whatever the user's forward raises
        return f"the model fails once {named} {verb} units ({_quote(exc)})"
    problem = _difference(expected, got)
    if problem is None:
        problem = _in_training(masked, shrunk, example_inputs)
    return None if problem is None else f"the model does not follow a smaller {named}: {problem}"


def _in_training(masked: nn.Module, shrunk: nn.Module, example_inputs: Any) -> str | None:
    """What goes wrong in train mode, which the eval-mode trace does not see (a training-
    only head reading a hidden layer): same output shapes required, values may differ
    (dropout, batch statistics). A model that fails in train mode on this batch anyway
    (BatchNorm on one example) is not judged here."""
    try:
        expected = _run(masked.train(), example_inputs)
    except Exception:  # noqa: BLE001
        return None
    try:
        got = _run(shrunk.train(), example_inputs)
    except Exception as exc:  # noqa: BLE001 - whatever the user's forward raises
        return f"its train-mode forward fails ({_quote(exc)})"
    if [e.shape for e in expected] != [g.shape for g in got]:
        return "its train-mode outputs change shape"
    return None


def _quote(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {' '.join(str(exc).split())[:160]}"


def _run(model: nn.Module, example_inputs: Any) -> list[torch.Tensor]:
    with torch.no_grad(), torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        out = call_model(model, example_inputs)
    return [x for x in pytree.tree_leaves(out) if isinstance(x, torch.Tensor)]


def _difference(expected: list[torch.Tensor], got: list[torch.Tensor]) -> str | None:
    if len(expected) != len(got):
        return f"{len(got)} outputs instead of {len(expected)}"
    for i, (e, g) in enumerate(zip(expected, got, strict=True)):
        if e.shape != g.shape:
            return f"output {i} has shape {tuple(g.shape)} instead of {tuple(e.shape)}"
        if e.is_floating_point():
            gap = _gap(e, g)
            finite = e[e.isfinite()]
            scale = 1.0 + float(finite.abs().max()) if finite.numel() else 1.0
            if not gap <= 1e-4 * scale:
                return f"output {i} moved by {gap:.3g} (its units were reordered or mixed)"
        elif not torch.equal(e, g):
            return f"output {i} changed"
    return None


def _gap(e: torch.Tensor, g: torch.Tensor) -> float:
    """The largest |e - g| by the parity check's rule for non-finite values (equal ones
    agree, any other non-finite pair is an infinite gap)."""
    from ..verify import differences

    if not e.numel():
        return 0.0
    diff, mismatch = differences(e.detach().double().cpu().numpy(),
                                 g.detach().double().cpu().numpy())
    return float("inf") if mismatch else float(diff.max())
