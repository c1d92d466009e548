"""Batches as users give them: ``(inputs, targets)`` where inputs is a tensor or a tuple, or
dicts of named inputs and targets (:class:`KeywordBatches`)."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import torch
import torch.utils._pytree as pytree

from .errors import USER_FAILURES, DataError, MesimpError, describe, interrupted
from .inputs import batch_axis

TARGET_KEYS = ("labels", "label", "targets", "target")  # where a dict batch keeps its targets


def split_batch(batch: Any, *, where: str = "data") -> tuple[tuple[Any, ...], Any]:
    """Return ``(inputs_tuple, targets)`` from one batch; DataError when it has another form."""
    if isinstance(batch, Mapping):
        raise DataError(
            f"{where}: batches must be (inputs, targets) pairs, "
            f"got a dict with keys {sorted(batch)}"
        )
    if not isinstance(batch, (tuple, list)) or len(batch) != 2:
        kind = type(batch).__name__
        size = f" of length {len(batch)}" if isinstance(batch, (tuple, list)) else ""
        raise DataError(f"{where}: batches must be (inputs, targets) pairs, got a {kind}{size}")
    inputs, targets = batch
    if isinstance(inputs, torch.Tensor):
        inputs = (inputs,)
    elif isinstance(inputs, (tuple, list)) and inputs:
        inputs = tuple(inputs)
    else:
        raise DataError(
            f"{where}: inputs must be a tensor or a tuple of tensors, got {type(inputs).__name__}"
        )
    return inputs, targets


class KeywordBatches:
    """Batches given as dicts, as Hugging Face collators make them (``{"input_ids": ...,
    "attention_mask": ..., "labels": ...}``), read as ``(inputs, targets)`` pairs: the targets
    are the entry under one of :data:`TARGET_KEYS`, the inputs the other entries in the order
    of the model's ``forward`` parameters (the model is called, traced and exported with
    positional inputs). Other batches pass unchanged. ``len()`` and attributes (a
    DataLoader's ``dataset``) are the data's own."""

    def __init__(self, data: Iterable[Any], order: list[str], where: str,
                 keys: dict[str, Any] | None = None) -> None:
        self.data, self.order, self.where = data, order, where
        # the keys of the first dict batch read, shared by the train and eval data's wrappers
        self.keys = keys if keys is not None else {}

    def __iter__(self) -> Iterator[Any]:
        for i, batch in enumerate(self.data):
            if not isinstance(batch, Mapping):
                yield batch
                continue
            where = f"{self.where} batch {i + 1}"
            pair = keyword_pair(batch, self.order, where)
            given = sorted(k for k in batch if k not in TARGET_KEYS and batch[k] is not None)
            first = self.keys.setdefault("inputs", (given, where))
            if first[0] != given:
                raise DataError(
                    f"{where} gives the inputs {given}, {first[1]} gave {first[0]}: every "
                    "batch must give the same ones (the model is exported with one signature)"
                )
            yield pair

    def __len__(self) -> int:
        return len(self.data)  # type: ignore[arg-type]

    def __getattr__(self, name: str) -> Any:
        if name == "data":  # not set yet (copying): no recursion
            raise AttributeError(name)
        return getattr(self.data, name)


def keyword_pair(batch: Mapping[str, Any], order: list[str], where: str) -> tuple[Any, Any]:
    """``(inputs, targets)`` of a dict batch (see :class:`KeywordBatches`); DataError naming
    what does not fit the model's ``forward``."""
    key = next((k for k in TARGET_KEYS if k in batch), None)
    if key is None:
        raise DataError(
            f"{where}: a dict batch keeps its targets under 'labels' (or 'label', 'targets', "
            f"'target'); got keys {sorted(batch)}"
        )
    given = {k: v for k, v in batch.items() if k != key and v is not None}
    if not given:
        raise DataError(f"{where}: a dict batch holds no inputs besides its targets '{key}'")
    unknown = [k for k in given if k not in order]
    if unknown:
        raise DataError(
            f"{where}: batch key '{unknown[0]}' is not a parameter of the model's forward "
            f"({', '.join(order) or 'none by name'})"
        )
    used = order[: 1 + max(order.index(k) for k in given)]
    missing = [n for n in used if n not in given]
    if missing:
        raise DataError(
            f"{where}: the batches give {sorted(given)} but not '{missing[0]}', which the "
            "model's forward takes before them: inputs are passed by position as tensors, so "
            "wrap the model in a module whose forward takes just these and passes them on by "
            f"name, or drop the keys after '{missing[0]}' (or give it as a tensor, if it is one)"
        )
    return tuple(given[n] for n in used), batch[key]


@contextmanager
def user_code(what: str, where: str) -> Iterator[None]:
    """Run user code (the model, its loss or metric) on one batch: a failure becomes a
    DataError that names what failed and on which batch (the original stays chained as
    ``__cause__``); the library's own errors and interrupts pass through unchanged."""
    try:
        yield
    except DataError as exc:  # ours (the default loss or metric): named with the batch
        if where in str(exc):
            raise
        raise type(exc)(f"{where}: {exc}") from exc
    except MesimpError:
        raise
    except USER_FAILURES as exc:
        if interrupted(exc):
            raise KeyboardInterrupt from exc
        raise DataError(f"{what} failed on {where}: {describe(exc)}") from exc


def iterate(data: Iterable[Any], *, where: str) -> Iterator[Any]:
    """The batches of ``data``; an exception raised by the data itself (a dataset's
    ``__getitem__``, a collate function, a generator) becomes a DataError naming the batch."""
    i = 0
    try:
        it = iter(data)
    except USER_FAILURES as exc:
        raise DataError(f"{where} cannot be iterated: {describe(exc)}") from exc
    while True:
        try:
            batch = next(it)
        except StopIteration:
            return
        except MesimpError:
            raise
        except USER_FAILURES as exc:
            raise DataError(f"{where} failed while reading batch {i + 1}: {describe(exc)}") from exc
        yield batch
        i += 1


def to_device(value: Any, device: torch.device | str, *, where: str = "a batch") -> Any:
    """Move tensors (nested in tuples/lists/dicts) to ``device``; DataError naming ``where``
    for a tensor on the meta device."""
    if isinstance(value, torch.Tensor):
        if value.is_meta:
            raise DataError(f"{where} holds a tensor on the meta device (it has no values)")
        return value.to(device, non_blocking=True)
    if isinstance(value, (tuple, list)):
        return type(value)(to_device(v, device, where=where) for v in value)
    if isinstance(value, dict):
        return {k: to_device(v, device, where=where) for k, v in value.items()}
    return value


def has_nan(value: Any) -> bool:
    """Whether a floating-point tensor in ``value`` (nested tuples, lists, dicts) holds NaN."""
    return any(isinstance(t, torch.Tensor) and t.is_floating_point() and bool(t.isnan().any())
               for t in pytree.tree_leaves(value))


def nan_input(inputs: tuple[Any, ...]) -> int | None:
    """The index of the first input holding NaN (an infinity may be meant: an additive
    -inf mask), or None."""
    return next((i for i, x in enumerate(inputs) if has_nan(x)), None)


def batch_size(inputs: tuple[Any, ...], batch_dim: int = 0) -> int:
    """Examples in a batch: the size of dim ``batch_dim`` of the first tensor input (dim 0 of
    a 1-D one)."""
    for x in inputs:
        if isinstance(x, torch.Tensor) and x.dim() > 0:
            return int(x.shape[batch_axis(x, batch_dim)])
    return 1


def check_reiterable(data: Iterable[Any], *, where: str) -> None:
    """DataError for a one-shot iterator (a generator): the data is read once per epoch and
    once per evaluation, so it must be re-iterable. Decided from the type alone: making an
    iterator of a DataLoader would start its workers and draw from the random generator."""
    if not isinstance(data, Iterable) and not hasattr(data, "__getitem__"):
        raise DataError(
            f"{where}: expected an iterable of (inputs, targets) batches (a DataLoader or a "
            f"list), got {type(data).__name__}"
        )
    if isinstance(data, Iterator):
        raise DataError(
            f"{where}: data must be re-iterable (a DataLoader or a list), got a one-shot iterator"
        )


def count_batches(data: Iterable[Any], *, where: str, limit: int | None = None
                  ) -> tuple[int, str]:
    """Batches per epoch and where that number comes from: ``len(data)``, one counting
    pass over data without a length, or ``limit`` (``epoch_batches``: no pass is counted,
    so an endless stream works; a longer pass is cut there). The data must be re-iterable."""
    check_reiterable(data, where=where)
    try:
        n, source = len(data), "its len()"  # type: ignore[arg-type]
    except Exception:  # noqa: BLE001 - no length (or a failing one)
        if limit is not None:
            return limit, "epoch_batches"
        n, source = sum(1 for _ in iterate(data, where=where)), "its first pass"
    if n == 0:
        raise DataError(f"{where}: no batches")
    if limit is not None and limit < n:
        return limit, "epoch_batches"
    return n, source


def first_batch(data: Iterable[Any], *, where: str) -> tuple[tuple[Any, ...], Any]:
    """The first batch, split; DataError if there is none."""
    for batch in iterate(data, where=where):
        return split_batch(batch, where=where)
    raise DataError(f"{where}: no batches")
