"""The meSimp rule and the cycle plan.

The rule (Sun et al., TKDE 2019): after each window, a unit whose hits (examples in which it
was among the top-k) fall below ``prune_rate * examples_in_window`` is removed for good.
Guards added here: a minimum width, rounding the kept width up to a multiple (ORT's kernels
like aligned widths), frozen layers, and tied layers that must keep equal counts (the layers
and directions of one ``nn.LSTM`` share a single ``hidden_size``).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import torch

from .errors import ConfigError


@dataclass(frozen=True)
class Rule:
    """The meSimp pruning rule with its guards."""

    prune_rate: float = 0.1
    min_width: int = 1
    round_to: int = 1

    def __post_init__(self) -> None:
        if not 0.0 <= self.prune_rate <= 1.0:
            raise ConfigError(f"prune_rate must lie in [0, 1], got {self.prune_rate!r}")
        if self.min_width < 1:
            raise ConfigError(
                f"min_width must be >= 1 (a layer is never emptied), got {self.min_width}"
            )
        if self.round_to < 1:
            raise ConfigError(f"round_to must be >= 1, got {self.round_to}")

    def kept_count(self, hits: torch.Tensor, examples: int) -> int:
        """How many units the rule keeps, after min width and rounding."""
        width = int(hits.numel())
        if examples <= 0:
            return width
        count = int((hits.to(torch.float64) >= self.prune_rate * examples).sum())
        return self._guard(count, width)

    def least(self, width: int) -> int:
        """The fewest units the guards let a layer of ``width`` keep."""
        return self._guard(0, width)

    def _guard(self, count: int, width: int) -> int:
        count = max(count, min(self.min_width, width))
        if self.round_to > 1:
            count = -(-count // self.round_to) * self.round_to
        return min(count, width)


def most_active(hits: torch.Tensor, count: int) -> torch.Tensor:
    """Indices (ascending) of the ``count`` units with the most hits; ties go to lower index."""
    width = hits.numel()
    if count >= width:
        return torch.arange(width)
    # stable: sort by hits descending, then by index ascending
    order = torch.argsort(-hits.to(torch.float64), stable=True)
    return torch.sort(order[:count]).values


def decide(
    hits: Mapping[str, torch.Tensor],
    examples: Mapping[str, int],
    rule: Rule,
    *,
    frozen: Iterable[str] = (),
    tied: Iterable[Iterable[str]] = (),
) -> dict[str, torch.Tensor]:
    """Apply the rule to one window's counters.

    Returns, for each layer key that shrinks, the kept unit indices (ascending, in the
    layer's current indexing). Keys that keep every unit, frozen keys and keys that saw no
    example are left out.
    """
    frozen = set(frozen)
    counts: dict[str, int] = {}
    for key, h in hits.items():
        if key in frozen:
            continue
        counts[key] = rule.kept_count(h, int(examples.get(key, 0)))
    for group in tied:
        members = [k for k in group if k in hits]
        if any(k in frozen for k in members):
            for k in members:
                counts.pop(k, None)
            continue
        if members:
            shared = max(counts.get(k, hits[k].numel()) for k in members)
            for k in members:
                counts[k] = shared
    kept: dict[str, torch.Tensor] = {}
    for key, count in counts.items():
        width = hits[key].numel()
        if count < width:
            kept[key] = most_active(hits[key], count)
    return kept


@dataclass(frozen=True)
class Phase:
    """One stretch of training: ``"prune"`` (meProp + the rule) or ``"normal"`` (no pruning)."""

    kind: str
    epochs: int
    cycle: int


def cycle_plan(cycles: int, epochs: int, recovery_epochs: int = 0) -> list[Phase]:
    """Alternate pruning and normal cycles, then recovery epochs (a final normal phase)."""
    phases: list[Phase] = []
    for c in range(cycles):
        if epochs > 0:
            phases.append(Phase("prune", epochs, c))
            phases.append(Phase("normal", epochs, c))
    if recovery_epochs > 0:
        phases.append(Phase("normal", recovery_epochs, cycles))
    return phases
