"""Row gradients: how a meProp layer hands the k rows it computed to a row-sparse optimizer.

A row-sparse optimizer *claims* its parameters. When a meProp layer's backward finds that
the weight it computed rows for is claimed by a live optimizer, it gives the optimizer
``(rows, values)`` and leaves ``.grad`` alone, so no full-size zero gradient is built.
Otherwise it returns the exact masked dense gradient, which autograd puts in ``.grad`` for
any ordinary optimizer. Claims are weak: they end with the optimizer.
"""

from __future__ import annotations

import weakref
from typing import Any, Protocol

import torch

from . import native


class RowConsumer(Protocol):
    """Anything that accepts row gradients (e.g. :class:`mesimp_compress.optim.RowSparseAdam`)."""

    def add_rows(self, param: torch.Tensor, rows: torch.Tensor, values: torch.Tensor) -> None:
        """Accumulate ``values`` (one per entry of ``rows``) into the gradient of ``param``."""


# id(param) -> (weak param, weak consumer). Looked up on every meProp backward, so a plain
# dict keyed by id (a WeakIdKeyDictionary builds a weak reference per lookup); the entry
# leaves with its parameter, and a lookup checks that the id still names the same object.
_CLAIMS: dict[int, tuple[weakref.ref, weakref.ref]] = {}


def claim(param: torch.Tensor, consumer: RowConsumer) -> None:
    """From now on row gradients of ``param`` go to ``consumer`` (while it lives)."""
    key = id(param)
    collect(param)  # rows waiting in the compiled layer's slot belong to the previous claim

    def forget(_: weakref.ref) -> None:
        entry = _CLAIMS.get(key)
        if entry is not None and entry[0] is gone:
            del _CLAIMS[key]

    def ended(ref: weakref.ref) -> None:  # the consumer is gone: its waiting rows with it
        entry = _CLAIMS.get(key)
        if entry is not None and entry[1] is ref and _SLOTS:
            _mark(key, False, drop=True)

    gone = weakref.ref(param, forget)
    _CLAIMS[key] = (gone, weakref.ref(consumer, ended))
    _mark(key, True)


def release(param: torch.Tensor) -> None:
    """Row gradients of ``param`` go back to ``.grad``."""
    entry = _CLAIMS.get(id(param))
    if entry is not None and entry[0]() is param:
        collect(param)
        del _CLAIMS[id(param)]
        _mark(id(param), False)


def claimed() -> bool:
    """Whether any parameter is claimed now."""
    return bool(_CLAIMS)


def consumer_of(param: torch.Tensor) -> RowConsumer | None:
    """The live consumer that claimed ``param``, if any."""
    entry = _CLAIMS.get(id(param))
    if entry is None or entry[0]() is not param:
        return None
    return entry[1]()


def deliver(param: torch.Tensor, rows: torch.Tensor, values: torch.Tensor,
            node: Any = None) -> torch.Tensor | None:
    """Give ``values`` for ``rows`` of ``param`` to its consumer and return None; without a
    consumer, return the full-size gradient (zero outside ``rows``) for autograd.

    ``node`` is the backward node computing them (a Function's ``ctx``): rows go to the
    consumer only when this backward pass accumulates into ``param``. Under
    ``torch.autograd.grad(..., [param])`` autograd gets the full-size gradient (the caller
    asked for it; the optimizer gets nothing), and when this pass does not touch ``param``
    at all (``autograd.grad`` of other tensors, ``backward(inputs=...)`` without it) nothing
    is handed on.
    """
    consumer = consumer_of(param)
    if consumer is not None:
        use = _use(node, param)
        if use == "accumulate":
            consumer.add_rows(param, rows, values)
            return None
        if use == "unused":
            return None
    grad = values.new_zeros(param.shape)
    grad.index_copy_(0, rows, values)
    return grad


def no_rows(param: torch.Tensor, node: Any = None) -> torch.Tensor | None:
    """:func:`deliver` of an empty row gradient (a batch without examples): nothing for a
    consumer, full-size zeros for autograd."""
    none = torch.zeros(0, dtype=torch.int64, device=param.device)
    return deliver(param, none, param.new_zeros((0, *param.shape[1:])), node)


# The compiled meProp Linear (native.cpp) keeps the rows of a claimed weight in a slot of
# its own instead of calling Python from its backward; the consumer collects them before
# it reads its rows. id(param) -> (weak param, slot handle); a slot is made at the first
# compiled forward of a weight and freed with it. Its "claimed" flag follows _CLAIMS.
_SLOTS: dict[int, tuple[weakref.ref, int]] = {}


def slot(param: torch.Tensor, lib: Any) -> int:
    """The handle of ``param``'s slot in the compiled extension ``lib`` (made on first use)."""
    key = id(param)
    entry = _SLOTS.get(key)
    if entry is not None and entry[0]() is param:
        return entry[1]
    handle = lib.new_slot()

    def free(ref: weakref.ref) -> None:
        current = _SLOTS.get(key)
        if current is not None and current[0] is ref:
            del _SLOTS[key]
        lib.free_slot(handle)

    _SLOTS[key] = (weakref.ref(param, free), handle)
    lib.set_claimed(handle, consumer_of(param) is not None)
    return handle


def collect(param: torch.Tensor) -> None:
    """Hand the rows waiting in ``param``'s compiled slot to its consumer."""
    entry = _SLOTS.get(id(param))
    if entry is None or entry[0]() is not param:
        return
    waiting = native.built().take_rows(entry[1])
    consumer = consumer_of(param)
    if consumer is not None:
        for rows, values in waiting:
            consumer.add_rows(param, rows, values)


def _mark(key: int, claimed: bool, drop: bool = False) -> None:
    entry = _SLOTS.get(key)
    if entry is not None:
        lib = native.built()
        lib.set_claimed(entry[1], claimed)
        if drop:
            lib.take_rows(entry[1])


# asks the running backward pass whether it will run a node (absent in some torch versions)
_WILL_RUN = getattr(torch._C, "_will_engine_execute_node", None)


def _use(node: Any, param: torch.Tensor) -> str:
    """What the running backward pass does with ``param``'s gradient coming out of ``node``:
    "accumulate" (into ``.grad``, as ``backward()`` does), "capture" (``autograd.grad``
    returns it) or "unused"."""
    will_run = _WILL_RUN
    if node is None or will_run is None:
        return "accumulate"
    for fn, _ in node.next_functions:
        if fn is not None and getattr(fn, "variable", None) is param:
            try:
                return "accumulate" if will_run(fn) else "unused"
            except RuntimeError:  # torch refuses to say for a leaf under autograd.grad(),
                return "capture"  # which only reaches leaves it was asked for
    return "accumulate"
