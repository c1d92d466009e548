"""Activity: how many examples selected each unit, per layer key, per window and in total.

A wrapped meProp layer reports every backward pass to an :class:`ActivityTracker`. The
tracker keeps, for each layer key, an int64 hit counter per unit and a count of examples,
for the current window and in total. Counters have a fixed size per key (its width), so
memory does not grow with the number of steps.

Window counters stay on the device the counts came from (no host sync per step); they
move to the CPU when read and when the window is folded into the totals by
:meth:`ActivityTracker.reset_window`. Totals always live on the CPU.

Unified meProp reports a list of selected units per backward pass. Adding each into its
counter costs a few tensor calls on the backward path, so such selections are queued and
added in batches (one ``index_add_`` per :data:`FOLD_EVERY` passes, or sooner when anything
is read); counts are exact either way. The compiled meProp Linear adds its hits itself, into a
counter pair per key from :meth:`ActivityTracker.native_counter` that is folded in the same
way.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from .errors import ConfigError, ShapeError

FOLD_EVERY = 64
"""Queued selections of one layer key are added to its counter at most this many at a time."""


class _Queue(list):
    """Selections ``(units or None, examples)`` of one key not yet added to its window."""

    def __init__(self, width: int, device: torch.device) -> None:
        super().__init__()
        self.width, self.device = width, device


class ActivityTracker:
    """Hit counters (int64 per unit) and examples seen, per layer key, per window and in total."""

    def __init__(self) -> None:
        self._window: dict[str, torch.Tensor] = {}
        self._total: dict[str, torch.Tensor] = {}
        self._window_examples: dict[str, int] = {}
        self._total_examples: dict[str, int] = {}
        self._ones_cache: dict[torch.device, torch.Tensor] = {}
        self._queue: dict[str, _Queue] = {}
        # key -> (hits, examples): CPU int64 counters the compiled backward adds into
        self._native: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    # ------------------------------------------------------------------ recording
    def record(self, key: str, counts: torch.Tensor, examples: int) -> None:
        """Add one backward pass: ``counts[u]`` examples selected unit ``u`` of ``key``."""
        counts = counts.detach()
        if counts.dim() != 1:
            raise ShapeError(
                f"activity counts for '{key}' must be 1-D (one per unit); got shape "
                f"{tuple(counts.shape)}"
            )
        window = self._counter(key, counts.shape[0], counts.device)
        window.add_(counts.to(torch.int64))
        self._window_examples[key] += int(examples)

    def record_selected(
        self, key: str, units: torch.Tensor | None, examples: int, width: int
    ) -> None:
        """Add one backward pass in which all ``examples`` selected ``units`` (None: every unit).

        ``units`` must not repeat; ``width`` is the layer's current number of units.
        """
        queue = self._queue.get(key)
        if queue is None or queue.width != width or (
            units is not None and units.device != queue.device
        ):
            window = self._counter(key, width, None if units is None else units.device)
            queue = self._queue[key] = _Queue(width, window.device)
        queue.append((units, examples))
        self._window_examples[key] += examples
        if len(queue) >= FOLD_EVERY:
            self._fold(key)

    def native_counter(self, key: str, width: int) -> tuple[torch.Tensor, torch.Tensor]:
        """CPU int64 counters ``(hits per unit, examples (one entry))`` of ``key`` that the
        compiled meProp backward adds into; they are folded into the window like queued
        selections. Raises ShapeError if ``width`` differs from the key's counters."""
        pair = self._native.get(key)
        if pair is not None and pair[0].shape[0] == width:
            return pair
        self._fold(key)
        existing = self._window.get(key)
        existing = self._total.get(key) if existing is None else existing
        if existing is not None and existing.shape[0] != width:
            raise ShapeError(self._width_message(key, existing.shape[0], width))
        pair = (torch.zeros(width, dtype=torch.int64), torch.zeros(1, dtype=torch.int64))
        self._native[key] = pair
        return pair

    def _fold(self, key: str) -> None:
        """Add the queued selections and native counts of ``key`` to its window counter."""
        native = self._native.get(key)
        if native is not None and int(native[1][0]):
            hits, seen = native
            counts, examples = hits.clone(), int(seen[0])
            hits.zero_()
            seen.zero_()
            window = self._counter(key, counts.shape[0], None)
            window.add_(counts.to(window.device))
            self._window_examples[key] += examples
        queue = self._queue.get(key)
        if not queue:
            return
        window = self._window[key]
        everything = 0
        by_examples: dict[int, list[torch.Tensor]] = {}
        for units, examples in queue:
            if units is None:
                everything += examples
            else:
                by_examples.setdefault(examples, []).append(units)
        if everything:
            window.add_(everything)
        for examples, parts in by_examples.items():
            index = parts[0] if len(parts) == 1 else torch.cat(parts)
            window.index_add_(0, index, self._ones(index), alpha=examples)
        queue.clear()

    def _fold_all(self) -> None:
        for key in [*self._queue, *self._native]:
            self._fold(key)

    def _ones(self, units: torch.Tensor) -> torch.Tensor:
        ones = self._ones_cache.get(units.device)
        if ones is None or ones.shape[0] < units.shape[0]:
            ones = torch.ones(max(units.shape[0], 64), dtype=torch.int64, device=units.device)
            self._ones_cache[units.device] = ones
        return ones[: units.shape[0]]

    def _counter(self, key: str, width: int, device: torch.device | None) -> torch.Tensor:
        self._fold(key)
        self._queue.pop(key, None)  # the window may move or be replaced below
        window = self._window.get(key)
        if window is None:
            total = self._total.get(key)
            if total is not None and total.shape[0] != width:
                raise ShapeError(self._width_message(key, total.shape[0], width))
            window = torch.zeros(width, dtype=torch.int64, device=device)
            self._window[key] = window
            self._window_examples.setdefault(key, 0)
            self._total_examples.setdefault(key, 0)
            if total is None:
                self._total[key] = torch.zeros(width, dtype=torch.int64)
        elif window.shape[0] != width:
            raise ShapeError(self._width_message(key, window.shape[0], width))
        elif device is not None and window.device != device:
            window = self._window[key] = window.to(device)
        return window

    @staticmethod
    def _width_message(key: str, expected: int, found: int) -> str:
        return (
            f"activity for '{key}' has {found} units but its counters have {expected}; "
            "call select() after surgery"
        )

    # ------------------------------------------------------------------ reading
    def keys(self) -> list[str]:
        """Layer keys that have counters, in the order they were first recorded."""
        if self._native:
            self._fold_all()
        return list(self._total)

    def window_hits(self, key: str) -> torch.Tensor:
        """Hits per unit of ``key`` in the current window (CPU int64, a copy)."""
        self._check(key)
        self._fold(key)
        window = self._window.get(key)
        if window is None:
            return torch.zeros_like(self._total[key])
        return window.to("cpu", copy=True)

    def window_examples(self, key: str) -> int:
        """Examples seen by ``key`` in the current window."""
        self._check(key)
        self._fold(key)
        return self._window_examples[key]

    def total_hits(self, key: str) -> torch.Tensor:
        """Hits per unit of ``key`` since the last :meth:`reset` (CPU int64, a copy)."""
        self._check(key)
        self._fold(key)
        window = self._window.get(key)
        total = self._total[key].clone()
        if window is not None:
            total += window.cpu()
        return total

    def total_examples(self, key: str) -> int:
        """Examples seen by ``key`` since the last :meth:`reset`."""
        self._check(key)
        self._fold(key)
        return self._total_examples[key] + self._window_examples[key]

    def _check(self, key: str) -> None:
        if key not in self._total:
            self._fold(key)  # native counts not folded yet
        if key not in self._total:
            raise ConfigError(
                f"no activity recorded for layer key '{key}'; recorded keys: {self.keys()}"
            )

    # ------------------------------------------------------------------ windows
    def reset_window(self) -> None:
        """Fold the current window into the totals and start a new, empty window."""
        self._fold_all()
        self._queue.clear()
        for key, window in self._window.items():
            self._total[key] += window.cpu()
            self._total_examples[key] += self._window_examples[key]
            self._window_examples[key] = 0
        self._window.clear()

    def reset(self) -> None:
        """Forget every counter, window and total."""
        for hits, seen in self._native.values():  # kept: a backward still to come (its
            hits.zero_()  # forward took these counters) counts afresh
            seen.zero_()
        self._queue.clear()
        self._window.clear()
        self._total.clear()
        self._window_examples.clear()
        self._total_examples.clear()

    def select(self, key: str, kept_indices: Sequence[int] | torch.Tensor) -> None:
        """Keep only the counters of the kept units of ``key`` (after surgery)."""
        self._fold(key)  # compiled counts not read yet
        if key not in self._total:
            return
        index = torch.as_tensor(kept_indices, dtype=torch.int64).reshape(-1)
        width = self._total[key].shape[0]
        if index.numel() and (int(index.min()) < 0 or int(index.max()) >= width):
            raise ShapeError(
                f"kept units of '{key}' must lie in [0, {width}); got "
                f"[{int(index.min())}, {int(index.max())}]"
            )
        self._fold(key)
        self._queue.pop(key, None)
        self._native.pop(key, None)  # the next compiled forward makes counters of the new width
        self._total[key] = self._total[key].index_select(0, index)
        window = self._window.get(key)
        if window is not None:
            self._window[key] = window.index_select(0, index.to(window.device))

    # ------------------------------------------------------------------ persistence
    def state_dict(self) -> dict[str, Any]:
        """Plain tensors (CPU int64) and ints; the current window is kept apart from totals."""
        self._fold_all()
        return {
            "window_hits": {k: self.window_hits(k) for k in self.keys()},
            "total_hits": {k: self._total[k].clone() for k in self.keys()},
            "window_examples": dict(self._window_examples),
            "total_examples": dict(self._total_examples),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Replace every counter with those of ``state`` (from :meth:`state_dict`)."""
        try:
            total = {k: torch.as_tensor(v, dtype=torch.int64).clone() for k, v in
                     state["total_hits"].items()}
            window = {k: torch.as_tensor(v, dtype=torch.int64).clone() for k, v in
                      state["window_hits"].items()}
            window_examples = {k: int(v) for k, v in state["window_examples"].items()}
            total_examples = {k: int(v) for k, v in state["total_examples"].items()}
        except (KeyError, TypeError, ValueError, AttributeError) as err:
            raise ConfigError(f"not an ActivityTracker state: {err!r}") from err
        for key, hits in window.items():
            if key not in total or hits.shape != total[key].shape:
                raise ConfigError(f"activity state for '{key}': window and total disagree")
        self.reset()
        self._total = total
        self._window = window
        self._window_examples = {k: window_examples.get(k, 0) for k in total}
        self._total_examples = {k: total_examples.get(k, 0) for k in total}

    # ------------------------------------------------------------------ distributed
    def all_reduce(self, group: Any = None) -> None:
        """Sum the window counters over all torch.distributed ranks (no-op when not initialised).

        Every rank must hold the same keys with the same widths.
        """
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()):
            return
        keys = sorted(self.keys())
        if not keys:
            return
        device = torch.device("cpu")
        if dist.get_backend(group) == "nccl":
            device = torch.device("cuda", torch.cuda.current_device())
        parts = [self.window_hits(k) for k in keys]
        parts.append(torch.tensor([self._window_examples[k] for k in keys], dtype=torch.int64))
        flat = torch.cat(parts).to(device)
        dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=group)
        flat = flat.cpu()
        self._queue.clear()  # emptied by window_hits; the windows are replaced below
        offset = 0
        for key in keys:
            width = self._total[key].shape[0]
            self._window[key] = flat[offset : offset + width].clone()
            offset += width
        for i, key in enumerate(keys):
            self._window_examples[key] = int(flat[offset + i])
