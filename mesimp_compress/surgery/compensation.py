"""Compensation (beyond the paper): fold removed inputs' mean contribution into a bias.

When units are removed, the layers reading them lose ``W[:, removed] @ x[removed]``. Replacing
that by its mean over the data seen in the window, ``bias += W[:, removed] @ mean[removed]``,
keeps the expected pre-activation of the consumer. :class:`ActivationMeans` measures the
mean of each consumer's input features with forward pre-hooks; pass it to
``apply_plan(..., compensation=means)``.

Where it is exact in expectation: Linear consumers (also after Conv→Flatten, where each input
feature is one channel at one position) and the input of an nn.LSTM. Conv2d consumers use
per-channel means: exact away from zero-padded borders, approximate on them. Not done: the
recurrent and inter-layer inputs of removed LSTM hidden units (not observable from outside
nn.LSTM), and consumers without a bias.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import torch
from torch import nn
from torch.nn.utils.rnn import PackedSequence

from ..errors import ConfigError

_KINDS = (nn.Linear, nn.Conv2d, nn.LSTM)


class ActivationMeans(Mapping[str, torch.Tensor]):
    """Running mean of the input features of consumer layers, keyed by module name.

    Measures every nn.Linear, nn.Conv2d and nn.LSTM of ``model`` (or only ``names``). Means
    are per input feature for Linear and LSTM, per input channel for Conv2d. A module whose
    input width changes (after surgery) starts a fresh mean. Use as a context manager, or
    call :meth:`close` to remove the hooks.
    """

    def __init__(self, model: nn.Module, names: Iterable[str] | None = None) -> None:
        modules = dict(model.named_modules())
        if names is None:
            chosen = [n for n, m in modules.items() if isinstance(m, _KINDS)]
        else:
            chosen = list(names)
            for name in chosen:
                if name not in modules:
                    raise ConfigError(f"no module named '{name}' to measure")
                if not isinstance(modules[name], _KINDS):
                    raise ConfigError(
                        f"'{name}' is a {type(modules[name]).__name__}; "
                        "expected Linear, Conv2d or LSTM"
                    )
        self.enabled = True  # set False to pause recording (e.g. around evaluation)
        self._sums: dict[str, torch.Tensor] = {}
        self._counts: dict[str, int] = {}
        self._handles = [
            modules[name].register_forward_pre_hook(self._hook(name)) for name in chosen
        ]

    def _hook(self, name: str):
        def hook(module: nn.Module, args: tuple) -> None:
            if not self.enabled or not args:
                return
            x = args[0].data if isinstance(args[0], PackedSequence) else args[0]
            if not isinstance(x, torch.Tensor):
                return
            with torch.no_grad():
                x = x.detach()
                if isinstance(module, nn.Conv2d):
                    x = x.movedim(1 if x.dim() == 4 else 0, -1)
                flat = x.reshape(-1, x.shape[-1]).to(torch.float64)
                total = flat.sum(dim=0)
                previous = self._sums.get(name)
                if previous is None or previous.shape != total.shape:
                    self._sums[name] = total
                    self._counts[name] = flat.shape[0]
                else:
                    self._sums[name] = previous + total
                    self._counts[name] += flat.shape[0]

        return hook

    def __getitem__(self, name: str) -> torch.Tensor:
        count = self._counts.get(name, 0)
        if count == 0:
            raise KeyError(name)
        return (self._sums[name] / count).to(torch.float32)

    def __iter__(self) -> Iterator[str]:
        return iter([n for n, c in self._counts.items() if c > 0])

    def __len__(self) -> int:
        return sum(1 for c in self._counts.values() if c > 0)

    def reset(self) -> None:
        """Forget every mean (start a new window)."""
        self._sums.clear()
        self._counts.clear()

    def all_reduce(self) -> None:
        """Sum the running sums and counts over torch.distributed ranks (no-op when not
        initialised), so every rank compensates with the same means."""
        from ..distributed import all_reduce_means

        all_reduce_means(self._sums, self._counts)

    def close(self) -> None:
        """Remove the hooks; the means measured so far stay readable."""
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def __enter__(self) -> ActivationMeans:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
