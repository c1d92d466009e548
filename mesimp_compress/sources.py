"""Where training data comes from: a user's `file.py:function` or a built-in name."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from .errors import USER_FAILURES, DataError, SpecError, describe


def load_data(spec: str) -> tuple[Iterable[Any], Iterable[Any]]:
    """Resolve ``spec`` to ``(train, eval)``: ``file.py:function`` / ``pkg.mod:function``
    (called with no arguments), or a built-in data set name."""
    if ":" in spec:
        from .spec import load_object

        function = load_object(spec, what="data function")
        if not callable(function):
            raise SpecError(f"{spec} is not callable (expected a function returning (train, eval))")
        try:
            result = function()
        except USER_FAILURES as exc:  # user code: report it in one line
            raise SpecError(f"{spec}() raised {describe(exc)}") from None
    else:
        from .datasets import load_builtin

        result = load_builtin(spec)
    if not isinstance(result, (tuple, list)) or len(result) != 2:
        size = f" of {len(result)} items" if isinstance(result, (tuple, list)) else ""
        raise DataError(f"{spec} must return (train, eval), got a {type(result).__name__}{size}")
    train, eval_data = result
    for name, part in (("train", train), ("eval", eval_data)):
        if not hasattr(part, "__iter__"):
            raise DataError(f"{spec}: {name} data is not iterable ({type(part).__name__})")
    return train, eval_data

