"""Compensation (beyond the paper): fold removed inputs' contribution into what is kept.

When units are removed, the layers reading them lose ``W[:, removed] @ x[removed]``. Two
replacements, measured on the data seen in the window:

- ``mean``: ``x[removed]`` by its mean, ``bias += W[:, removed] @ mean[removed]``: keeps the
  expected pre-activation of the consumer.
- ``linear``: ``x[removed]`` by its least-squares prediction from the kept inputs,
  ``x_R ≈ offset + mix @ x_K`` with ``mix = C_RK (C_KK + ridge)^-1`` (C: the covariance of
  the consumer's inputs), so ``W[:, kept] += W[:, removed] @ mix`` and ``bias += W[:, removed]
  @ offset``. It keeps the part of the removed units that the kept ones explain (units that
  fire together), and reduces to ``mean`` when they explain nothing. It costs a (d x d)
  float64 covariance per consumer of d inputs and one solve per surgery; consumers of more
  than ``MAX_COVARIANCE`` inputs (a Linear after Conv -> Flatten) get ``mean`` instead, and
  so do consumers measured on fewer than ``FIT_ROWS`` rows per kept input (a window of one
  small batch): such a fit is noise, and layer after layer it compounds.

:class:`ActivationMeans` measures each consumer's input features with forward pre-hooks
(``covariance=True`` for ``linear``); pass it to ``apply_plan(..., compensation=means)``.

Where it is exact in expectation: Linear consumers (also after Conv→Flatten, where each input
feature is one channel at one position) and the input of an nn.LSTM. Conv1d/Conv2d consumers use
per-channel means: exact away from zero-padded borders, approximate on them. Not done: the
recurrent and inter-layer inputs of removed LSTM hidden units (not observable from outside
nn.LSTM), and consumers without a bias.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.nn.utils.rnn import PackedSequence

from ..errors import ConfigError
from ..hfconv1d import is_conv1d

_KINDS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.LSTM)


def measured(module: nn.Module | None) -> bool:
    """Whether ``module`` is a consumer kind whose input features are measured (Linear,
    Conv1d/2d, LSTM, Hugging Face's Conv1D)."""
    return isinstance(module, _KINDS) or (module is not None and is_conv1d(module))
RIDGE = 1e-3  # of the mean variance of the kept inputs: keeps the solve well posed
FIT_ROWS = 2  # linear needs this many measured rows per kept input, else mean is used
GRAM_ROWS = 1024  # second moments from at most this many rows (strided) of a batch
MAX_COVARIANCE = 4096  # wider consumer inputs (e.g. Conv -> Flatten) get mean compensation


@dataclass(frozen=True)
class Substitute:
    """What stands in for a consumer's removed inputs: ``x[removed] ≈ offset + mix @ x[kept]``.

    ``mix`` is None for mean compensation (``offset`` is then the removed inputs' mean)."""

    removed: torch.Tensor
    kept: torch.Tensor
    offset: torch.Tensor
    mix: torch.Tensor | None = None


class ActivationMeans(Mapping[str, torch.Tensor]):
    """Running mean (and, with ``covariance``, second moments) of the input features of
    consumer layers, keyed by module name.

    Measures every nn.Linear, nn.Conv1d, nn.Conv2d and nn.LSTM of ``model`` (or only
    ``names``). Means are per input feature for Linear and LSTM, per input channel for a
    convolution (its covariance
    is across channels, over every position). A module whose input width changes (after
    surgery) starts afresh. Use as a context manager, or call :meth:`close` to remove the
    hooks. :meth:`substitute` gives what replaces removed inputs.
    """

    def __init__(
        self, model: nn.Module, names: Iterable[str] | None = None, *, covariance: bool = False
    ) -> None:
        modules = dict(model.named_modules())
        if names is None:
            chosen = [n for n, m in modules.items() if measured(m)]
        else:
            chosen = list(names)
            for name in chosen:
                if name not in modules:
                    raise ConfigError(f"no module named '{name}' to measure")
                if not measured(modules[name]):
                    raise ConfigError(
                        f"'{name}' is a {type(modules[name]).__name__}; "
                        "expected Linear, Conv1d, Conv2d, LSTM or Hugging Face's Conv1D"
                    )
        self.enabled = True  # set False to pause recording (e.g. around evaluation)
        self.covariance = covariance
        self._sums: dict[str, torch.Tensor] = {}
        self._grams: dict[str, torch.Tensor] = {}
        self._counts: dict[str, int] = {}
        self._fitted: dict[str, int] = {}  # rows the second moments were measured on
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
            if x.is_nested:  # nn.TransformerEncoder's fast path in eval: the real tokens only
                x = torch.cat([t.reshape(-1, t.shape[-1]) for t in x.detach().unbind()])
            if x.numel() == 0:  # an empty batch adds nothing
                return
            with torch.no_grad():
                x = x.detach()
                if isinstance(module, (nn.Conv1d, nn.Conv2d)):  # batched: (n, c, *positions)
                    x = x.movedim(1 if x.dim() == module.weight.dim() else 0, -1)
                rows = x.reshape(-1, x.shape[-1])
                flat = rows.to(torch.float64)
                total = flat.sum(dim=0)
                gram = None
                if self.covariance and rows.shape[-1] <= MAX_COVARIANCE:
                    # a batch's moments in float32 (fast) about its own mean, so that units
                    # with a large mean and a small spread keep their variance; summed
                    # about zero in float64
                    rows = rows[:: -(-rows.shape[0] // GRAM_ROWS)].to(torch.float64)
                    centre = rows.mean(dim=0)
                    centred = (rows - centre).float()
                    gram = (centred.t() @ centred).to(torch.float64)
                    gram += rows.shape[0] * torch.outer(centre, centre)
                    gram *= flat.shape[0] / rows.shape[0]
                previous = self._sums.get(name)
                if previous is None or previous.shape != total.shape:
                    self._sums[name] = total
                    self._counts[name] = flat.shape[0]
                    if gram is not None:
                        self._grams[name] = gram
                        self._fitted[name] = rows.shape[0]
                else:
                    self._sums[name] = previous + total
                    self._counts[name] += flat.shape[0]
                    if gram is not None:
                        self._grams[name] += gram
                        self._fitted[name] += rows.shape[0]

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

    def substitute(self, name: str, removed: torch.Tensor) -> Substitute:
        """What replaces inputs ``removed`` of consumer ``name``: their mean, or with
        ``covariance`` their least-squares prediction from the kept inputs."""
        mean = self._sums[name] / self._counts[name]
        index = removed.to(mean.device)
        keep = torch.ones(mean.numel(), dtype=torch.bool, device=mean.device)
        keep[index] = False
        kept = keep.nonzero().squeeze(1)
        gram = self._grams.get(name)
        if gram is None or kept.numel() == 0 or self._fitted[name] < FIT_ROWS * kept.numel():
            # too few rows to fit one weight per kept input (the covariance would be
            # singular and the fit noise, amplified layer after layer): mean compensation
            return Substitute(removed, kept.to(removed.device), mean[index].float())
        cov = gram / self._counts[name] - torch.outer(mean, mean)
        c_kk = cov[kept][:, kept]
        ridge = RIDGE * float(c_kk.diagonal().mean().clamp(min=1e-12))
        c_kk = c_kk + ridge * torch.eye(kept.numel(), dtype=cov.dtype, device=cov.device)
        mix = torch.linalg.solve(c_kk, cov[kept][:, index]).t()  # (removed, kept)
        offset = mean[index] - mix @ mean[kept]
        return Substitute(removed, kept.to(removed.device), offset.float(), mix.float())

    def reset(self) -> None:
        """Forget every measurement (start a new window)."""
        self._sums.clear()
        self._grams.clear()
        self._counts.clear()
        self._fitted.clear()

    def all_reduce(self) -> None:
        """Sum the running sums, second moments and counts over torch.distributed ranks
        (no-op when not initialised), so every rank compensates alike."""
        from ..distributed import all_reduce_means

        all_reduce_means(self._sums, self._counts)
        if self._grams:
            all_reduce_means(self._grams, self._fitted)

    def close(self) -> None:
        """Remove the hooks; the means measured so far stay readable."""
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def __enter__(self) -> ActivationMeans:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
