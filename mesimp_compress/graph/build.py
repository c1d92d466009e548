"""Assemble a trace into groups: apply the policies, merge or block coupled units.

Policies (each blocked key lands in ``Structure.skipped`` with every reason found):
the output layer is never pruned; a module holding a parameter shared with another module is
left alone, and so is every group it reads; a module called more than once prunes like any
other, but the units it reads only where every call reads the same ones; units of two
layers multiplied elementwise (a gate: GLU/SwiGLU FFNs, squeeze-and-excitation) form one
group sharing one index set; units on a residual stream (added to another layer's units) are
left alone unless ``allow_residual``, in which case all writers of the stream form one group
too; the layers and directions of one nn.LSTM keep equal widths, so if one is left alone all
are.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import nn

from .modules import depthwise, producer, unsupported
from .shrink import followed
from .structure import ROLE_OUT, Group, Member, Skipped, Structure, hidden_role
from .trace import GroupInfo, MemberRecord, Tracer

_OUT_ATTR = {"Linear": "out_features", "Conv1d": "out_channels", "Conv2d": "out_channels",
             "Conv1D": "nf"}
OUTPUT_REASON = "its units reach the model output (the output layer is never pruned)"
# elementwise products: units meeting in one are a gate (one group), not a residual stream
GATES = frozenset({"mul", "rmul", "imul", "mul_"})


def find_groups(
    model: nn.Module,
    example_inputs: Any,
    *,
    exclude: Iterable[str] = (),
    allow_residual: bool = False,
) -> Structure:
    """Find the groups of units of ``model`` that can be removed, and everything they couple.

    ``example_inputs`` is passed as ``model(**x)`` for a mapping, ``model(*x)`` for a tuple or
    list, else ``model(x)``; one forward runs in eval mode without grad, and the training flags
    are restored afterwards. ``exclude`` holds module names or keys (fnmatch patterns) to leave
    alone. Raises DataError if the forward fails on the example inputs. Last, the groups are
    shrunk on a copy of the model, which must then match the masked original
    (:mod:`.shrink`): a width written down as numbers leaves its layer alone.
    """
    tracer = Tracer(model)
    out = tracer.run(example_inputs)
    structure = _Assembler(model, tracer, out, list(exclude), allow_residual).structure()
    del tracer, out  # every traced activation: not kept through the shrink check's copies
    return followed(model, example_inputs, structure)


class _Assembler:
    def __init__(
        self, model: nn.Module, tracer: Tracer, out: Any, exclude: list[str], allow_residual: bool
    ) -> None:
        self.model = model
        self.tracer = tracer
        self.infos: list[GroupInfo] = list(tracer.groups.values())
        self.bases = torch.tensor([info.base for info in self.infos], dtype=torch.int64)
        self.reasons: list[list[str]] = [list(info.reasons) for info in self.infos]
        self.parent = list(range(len(self.infos)))
        self.streams: set[int] = set()  # groups coupled by a residual add (not only gates)
        self.allow_residual = allow_residual
        self.exclude = exclude
        self.out = out

    # ------------------------------------------------------------ helpers
    def gids(self, codes: torch.Tensor) -> torch.Tensor:
        codes = codes.reshape(-1)
        return torch.searchsorted(self.bases, codes[codes != 0], right=True) - 1

    def block(self, gid: int, reason: str) -> bool:
        if reason in self.reasons[gid]:
            return False
        self.reasons[gid].append(reason)
        return True

    def block_codes(self, codes: torch.Tensor, reason: str) -> None:
        for gid in torch.unique(self.gids(codes)).tolist():
            self.block(gid, reason)

    def find(self, gid: int) -> int:
        while self.parent[gid] != gid:
            self.parent[gid] = self.parent[self.parent[gid]]
            gid = self.parent[gid]
        return gid

    def excluded(self, info: GroupInfo) -> bool:
        return any(
            fnmatch.fnmatchcase(info.key, pat) or fnmatch.fnmatchcase(info.module, pat)
            for pat in self.exclude
        )

    # ------------------------------------------------------------ policies
    def module_problem(self, name: str) -> str | None:
        if name in self.tied:
            return self.tied[name]
        if name in self.tracer.misuse:
            return self.tracer.misuse[name]
        return None

    def apply_policies(self) -> None:
        self.tied = _tied_modules(self.model)
        for gid, info in enumerate(self.infos):
            problem = self.module_problem(info.module)
            if problem:
                self.block(gid, f"'{info.module}' {problem}")
            if info.width < 2:
                self.block(gid, "width 1: no unit can be removed")
            if self.excluded(info):
                self.block(gid, "excluded by name")
        for codes, reason in self.tracer.blocks:
            self.block_codes(codes, reason)
        self.block_codes(self.tracer.output_codes(self.out), OUTPUT_REASON)
        for record in self.tracer.members:
            problem = self.module_problem(record.module)
            if problem:
                self.block_codes(record.codes, f"read by '{record.module}', which {problem}")

    def canonical(self, codes: torch.Tensor | None) -> torch.Tensor | None:
        """``codes`` with each unit of a merged set written as the same unit of its root
        group (writers of one stream or gate share one index set)."""
        if codes is None:
            return None
        units = codes > 0  # 0: no unit; a probe's padding is negative
        gids = torch.searchsorted(self.bases, codes[units], right=True) - 1
        roots = torch.tensor([self.find(g) for g in gids.tolist()], dtype=torch.int64)
        out = codes.clone()
        out[units] = codes[units] - self.bases[gids] + self.bases[roots]
        return out

    def apply_shared_reads(self) -> None:
        """A module called more than once (weight sharing: a siamese encoder, a layer applied
        in a loop) is one set of weights: the units it reads at a dimension can be removed
        only when every call reads the same units there (after couplings: a looped block's
        residual ``blk(h) + h`` reads the stream's units written by another writer)."""
        for (name, _), reads in self.tracer.reads.items():
            if len(reads) < 2:  # called once
                continue
            first = self.canonical(reads[0])
            if all(_same(first, self.canonical(other)) for other in reads[1:]):
                continue
            calls = self.tracer.calls.get(name, len(reads))
            reason = (f"read by '{name}', which is called {calls} times and does not read "
                      "the same units on every call")
            for codes in reads:
                if codes is not None:
                    self.block_codes(codes, reason)

    def apply_couplings(self) -> None:
        for a, b, where, op in self.tracer.couplings:
            gate = op in GATES
            ga, gb = self.gids(a), self.gids(b)
            pairs = torch.unique(torch.stack([ga, gb], dim=1), dim=0).tolist()
            for i, j in pairs:
                key_i, key_j = self.infos[i].key, self.infos[j].key
                if i == j:
                    self.block(i, f"units of '{key_i}' are combined with each other ({where})")
                    continue
                if not gate:
                    self.streams.update((i, j))
                if not gate and not self.allow_residual:
                    for g, other in ((i, key_j), (j, key_i)):
                        self.block(
                            g,
                            f"on a residual stream: its units meet those of '{other}' ({where}); "
                            "every layer writing to the stream would have to shrink with it "
                            "(allow_residual=True)",
                        )
                    continue
                sel = (ga == i) & (gb == j)
                same_units = torch.equal(a[sel] - self.bases[i], b[sel] - self.bases[j])
                lstm = self.infos[i].lstm is not None or self.infos[j].lstm is not None
                if not same_units or self.infos[i].width != self.infos[j].width or lstm:
                    why = "LSTM units" if lstm else "units that do not correspond one to one"
                    what = "gate" if gate else "residual stream"
                    for g in (i, j):
                        self.block(g, f"its {what} couples {why} ({where})")
                self.parent[self.find(i)] = self.find(j)

    def propagate(self) -> None:
        sets: dict[Any, list[int]] = {}
        for gid, info in enumerate(self.infos):
            sets.setdefault(("union", self.find(gid)), []).append(gid)
            if info.lstm is not None:
                sets.setdefault(("lstm", info.module), []).append(gid)
        changed = True
        while changed:
            changed = False
            for (kind, _), gids in sets.items():
                for g in gids:
                    if not self.reasons[g]:
                        continue
                    for other in gids:
                        if other == g or self.reasons[other]:
                            continue
                        verb = (
                            "is tied in width to"
                            if kind == "lstm"
                            else "shares a residual stream with"
                            if g in self.streams or other in self.streams
                            else "is gated together with"
                        )
                        changed |= self.block(
                            other, f"{verb} '{self.infos[g].key}', which is left alone"
                        )

    # ------------------------------------------------------------ output
    def readers(self) -> dict[int, list[int]]:
        """Group id -> indices of the member records that read its units (made once per
        structure: scanning every record for every group was quadratic in the depth)."""
        index: dict[int, list[int]] = {}
        for r, record in enumerate(self.tracer.members):
            for gid in torch.unique(self.gids(record.codes)).tolist():
                if gid >= 0:
                    index.setdefault(gid, []).append(r)
        return index

    def members_of(self, gids: Sequence[int], width: int,
                   readers: dict[int, list[int]]) -> tuple[Member, ...]:
        members = []
        for gid in gids:
            info = self.infos[gid]
            identity = tuple((u,) for u in range(width))
            if info.lstm is not None:
                role = hidden_role(*info.lstm)
                members.append(Member(info.module, "LSTM", role, width, "hidden_size", identity))
            else:
                attr = _OUT_ATTR[info.kind]
                members.append(Member(info.module, info.kind, ROLE_OUT, width, attr, identity))
        for r in sorted({r for gid in gids for r in readers.get(gid, ())}):
            record = self.tracer.members[r]
            positions = _positions(record, [self.infos[g] for g in gids], width)
            if positions is None:
                continue
            member = Member(record.module, record.kind, record.role, record.size, record.attr,
                            positions)
            if member not in members:  # calls that read one stream through other writers
                members.append(member)
        return tuple(members)

    def structure(self) -> Structure:
        self.apply_policies()
        self.apply_couplings()
        self.apply_shared_reads()
        self.propagate()
        result = Structure()
        sets: dict[int, list[int]] = {}
        for gid in range(len(self.infos)):
            sets.setdefault(self.find(gid), []).append(gid)
        lstm_keys: dict[str, list[str]] = {}
        for info in self.infos:
            if info.lstm is not None:
                lstm_keys.setdefault(info.module, []).append(info.key)
        readers = self.readers()
        for gids in sorted(sets.values(), key=lambda g: g[0]):
            if any(self.reasons[g] for g in gids):
                continue
            first = self.infos[gids[0]]
            tied = tuple(lstm_keys[first.module]) if first.lstm is not None else ()
            result.groups[first.key] = Group(
                key=first.key,
                kind=first.kind,
                module=first.module,
                width=first.width,
                members=self.members_of(gids, first.width, readers),
                tied=tied,
                writers=tuple(self.infos[g].key for g in gids),
            )
        result.skipped = self.skipped(result.groups)
        return result

    def skipped(self, groups: dict[str, Group]) -> list[Skipped]:
        entries = []
        followers = {m.module for g in groups.values() for m in g.members}
        by_module: dict[str, list[int]] = {}
        for gid, info in enumerate(self.infos):
            by_module.setdefault(info.module, []).append(gid)
        parents = {id(c): mod for mod in self.model.modules() for c in mod.children()}
        for name, module in self.model.named_modules():
            if name in by_module:
                for gid in by_module[name]:
                    if self.reasons[gid]:
                        entries.append(Skipped(self.infos[gid].key, "; ".join(self.reasons[gid])))
            elif producer(module):
                if name in followers:  # a depthwise convolution pruned with what it reads
                    continue
                if isinstance(parents.get(id(module)), nn.MultiheadAttention):
                    reason = (
                        "attention projection inside nn.MultiheadAttention: not a prunable unit"
                    )
                elif name in self.tracer.misuse:
                    reason = self.tracer.misuse[name]
                elif depthwise(module) and self.tracer.calls.get(name):
                    reason = ("depthwise convolution: no units of its own; its channels follow "
                              "what feeds it, and no prunable layer's units reach it here (the "
                              "layer feeding it, if any, is left alone: see its reason)")
                else:
                    reason = "not called as a module in the forward pass"
                entries.append(Skipped(name, reason))
            elif unsupported(module):
                entries.append(
                    Skipped(name, f"layer kind {type(module).__name__} is not supported")
                )
        return entries


def _positions(
    record: MemberRecord, infos: list[GroupInfo], width: int
) -> tuple[tuple[int, ...], ...] | None:
    per_unit: list[list[int]] = [[] for _ in range(width)]
    found = False
    for info in infos:
        units = record.codes - info.base
        mask = (units >= 0) & (units < info.width)
        if not bool(mask.any()):
            continue
        found = True
        positions = torch.nonzero(mask).reshape(-1)
        for pos, unit in zip(positions.tolist(), units[positions].tolist(), strict=True):
            per_unit[unit].append(pos)
    if not found:
        return None
    return tuple(tuple(sorted(p)) for p in per_unit)


def _same(a: torch.Tensor | None, b: torch.Tensor | None) -> bool:
    if a is None or b is None:
        return a is b
    return a.shape == b.shape and torch.equal(a, b)


def _tied_modules(model: nn.Module) -> dict[str, str]:
    """Modules holding a parameter that another module also holds. One module registered
    under two names (``self.b = self.a``, ``nn.ModuleList([block] * 2)``) is one module
    called twice, not a tie."""
    holders: dict[int, dict[int, str]] = {}  # parameter -> module object -> one full name
    for mod_name, module in model.named_modules(remove_duplicate=False):
        for p_name, p in module._parameters.items():
            if p is not None:
                full = f"{mod_name}.{p_name}" if mod_name else p_name
                holders.setdefault(id(p), {}).setdefault(id(module), full)
    tied: dict[str, str] = {}
    for mod_name, module in model.named_modules():
        for p_name, p in module._parameters.items():
            if p is None:
                continue
            others = [full for owner, full in holders[id(p)].items() if owner != id(module)]
            if others:
                tied.setdefault(mod_name, f"has its parameter '{p_name}' tied to '{others[0]}'")
    return tied
