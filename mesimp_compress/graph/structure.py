"""What the structure analysis finds: groups of coupled units and the layers left alone.

A *group* is one prunable set of units (a layer key) together with every module edit that
removing a unit implies. Each edit is a :class:`Member`: one dimension of one module and, for
every unit of the group, the positions along that dimension that belong to the unit (one
position for a plain Linear input, a block of ``H*W`` input features after a Flatten, the
four gate rows of an LSTM hidden unit are handled by the LSTM member itself).
"""

from __future__ import annotations

from dataclasses import dataclass, field

# Roles a member can play. LSTM hidden units use f"hidden:l{layer}" / f"hidden:l{layer}_reverse".
ROLE_OUT = "out"  # the producer's own output units (rows of a Linear/Conv2d weight, bias)
ROLE_IN = "in"  # a consumer's input features / channels (columns of its weight)
ROLE_FEATURES = "features"  # a per-unit pass-through module (BatchNorm)
HIDDEN_PREFIX = "hidden:"


def hidden_role(layer: int, reverse: bool) -> str:
    """The member role of one LSTM layer/direction's hidden units."""
    return f"{HIDDEN_PREFIX}l{layer}{'_reverse' if reverse else ''}"


def parse_hidden_role(role: str) -> tuple[int, bool]:
    """Inverse of :func:`hidden_role`: ``(layer, reverse)``; ValueError if ``role`` is not one."""
    if not role.startswith(HIDDEN_PREFIX + "l"):
        raise ValueError(f"not an LSTM hidden role: {role!r}")
    body = role[len(HIDDEN_PREFIX) + 1 :]
    reverse = body.endswith("_reverse")
    digits = body[: -len("_reverse")] if reverse else body
    if not digits.isdigit():
        raise ValueError(f"not an LSTM hidden role: {role!r}")
    return int(digits), reverse


@dataclass(frozen=True)
class Member:
    """One module dimension that shrinks with a group.

    ``positions[u]`` lists the indices along that dimension that belong to unit ``u`` of the
    group; ``size`` is the current length of the dimension and ``attr`` the module attribute
    that records it (``in_features``, ``out_channels``, ``num_features``, ``hidden_size``...).
    """

    module: str
    kind: str
    role: str
    size: int
    attr: str
    positions: tuple[tuple[int, ...], ...]


@dataclass(frozen=True)
class Group:
    """A prunable set of units under one layer key, and every edit removing a unit implies.

    ``tied`` lists the keys (this one included) that must keep equal unit counts, each with
    its own index set (the layers and directions of one ``nn.LSTM``); it is empty otherwise.
    ``writers`` lists the producer keys that share this group's index set: just the key,
    unless residual streams were allowed (``find_groups(allow_residual=True)``), where every
    layer writing to the stream is a writer and unit ``u`` is unit ``u`` of each of them.
    """

    key: str
    kind: str
    module: str
    width: int
    members: tuple[Member, ...]
    tied: tuple[str, ...] = ()
    writers: tuple[str, ...] = ()


@dataclass(frozen=True)
class Skipped:
    """A layer key (or module) that is left unpruned, and why."""

    name: str
    reason: str


@dataclass
class Structure:
    """The result of :func:`mesimp_compress.graph.find_groups`."""

    groups: dict[str, Group] = field(default_factory=dict)
    skipped: list[Skipped] = field(default_factory=list)

    def widths(self) -> dict[str, int]:
        """Current width (unit count) of every prunable key."""
        return {key: group.width for key, group in self.groups.items()}

    def tied_sets(self) -> list[tuple[str, ...]]:
        """Each set of keys that must keep equal unit counts (once each)."""
        seen: dict[tuple[str, ...], None] = {}
        for group in self.groups.values():
            if group.tied:
                seen.setdefault(group.tied, None)
        return list(seen)

    def reason(self, name: str) -> str | None:
        """Why ``name`` was left unpruned, or None if it was not skipped."""
        for entry in self.skipped:
            if entry.name == name:
                return entry.reason
        return None
