"""Progress events: the library reports progress by calling a sink, never by printing."""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Event:
    """One progress event. ``kind`` names it (e.g. ``"window"``, ``"prune"``, ``"epoch_start"``)."""

    kind: str
    data: dict[str, Any] = field(default_factory=dict)


EventSink = Callable[[Event], None]


def null_sink(event: Event) -> None:
    """Drop every event (the default when no sink is given)."""


def emit(sink: EventSink | None, kind: str, **data: Any) -> None:
    """Send one event to ``sink`` if there is one. The sink gets its own copy of the data
    (plain values), so what it does with them cannot reach the run's history or report."""
    if sink is not None:
        sink(Event(kind, copy.deepcopy(data)))


class NoteRecorder:
    """A sink that keeps the message of every ``note`` event (once each, in order) and
    passes every event on to ``sink``: notes raised anywhere in a run reach its report."""

    def __init__(self, sink: EventSink | None) -> None:
        self.sink = sink
        self.notes: list[str] = []

    def __call__(self, event: Event) -> None:
        if event.kind == "note":
            message = str(event.data.get("message", ""))
            if message and message not in self.notes:
                self.notes.append(message)
        if self.sink is not None:
            self.sink(event)
