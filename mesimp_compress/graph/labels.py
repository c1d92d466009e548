"""Unit labels: which unit of which group each position of a traced tensor carries.

Every unit of every prunable group gets a positive integer *code*; 0 means "no unit". A
tensor that carries units along one axis has an :class:`AxisLabel` (the axis and one code
per position along it: a Linear output, a Flatten of a Conv output, a concatenation). A
tensor whose codes vary along several axes (an LSTM's ``h_n``, units split into heads) has
a :class:`ProbeLabel` holding the full code tensor; such a tensor can be indexed or
reshaped back into an axis label, but any other use blocks its units.

Data-movement ops (view, flatten, permute, indexing, cat, split, ...) are followed exactly by
running the op on a *probe*: a float64 tensor of the same shape holding the codes. Zero
padding (``F.pad``, ``pad_packed_sequence`` with fill 0) fills the probe with :data:`PAD`:
such positions hold a constant 0 whichever units are removed, so they agree with any code.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class AxisLabel:
    """Units along one axis: ``codes[i]`` is the code at position ``i`` of ``axis``."""

    axis: int
    codes: torch.Tensor  # int64, 1-D


@dataclass
class ProbeLabel:
    """Codes that vary along more than one axis (full tensor of codes, int64)."""

    probe: torch.Tensor


Label = AxisLabel | ProbeLabel
PAD = -1  # probe value of zero padding: compatible with every code


class ProbeMismatch(Exception):
    """A probe result is not a rearrangement of the codes that went in (internal)."""


def to_probe(label: Label, shape: torch.Size) -> torch.Tensor:
    """A float64 tensor of ``shape`` holding the codes of ``label``."""
    if isinstance(label, ProbeLabel):
        return label.probe.to(torch.float64).reshape(shape)
    view = [1] * len(shape)
    view[label.axis] = shape[label.axis]
    return label.codes.to(torch.float64).reshape(view).expand(shape).contiguous()


def codes_of(label: Label) -> torch.Tensor:
    """The distinct non-zero codes a label carries."""
    raw = label.probe if isinstance(label, ProbeLabel) else label.codes
    flat = raw.reshape(-1)
    return torch.unique(flat[flat > 0])


def from_probe(probe: torch.Tensor, allowed: torch.Tensor) -> Label | None:
    """Read a probe back into a label (None when it carries no unit).

    ``allowed`` holds the codes that went into the op; anything else in the result means
    the op did not merely move values around, and :class:`ProbeMismatch` is raised.
    """
    if probe.numel() == 0:
        return None
    codes = probe.round()
    if not torch.equal(codes, probe):
        raise ProbeMismatch("non-integral probe values")
    codes = codes.to(torch.int64)
    units = codes[codes > 0]
    if units.numel() == 0:
        return None
    if not torch.isin(units, allowed).all() or bool((codes < PAD).any()):
        raise ProbeMismatch("codes that did not go in came out")
    for axis in range(codes.dim()):
        n = codes.shape[axis]
        if n < 2:
            continue
        rows = codes.movedim(axis, -1).reshape(-1, n)
        ref = rows.max(dim=0).values.clamp(min=0)
        if bool((ref == ref[0]).all()):
            continue
        if bool(((rows == ref) | (rows == PAD)).all()):
            return AxisLabel(axis, ref.clone())
    return ProbeLabel(codes)


def aligned_axis(label: AxisLabel, ndim: int, out_ndim: int) -> int:
    """The axis of ``label`` (on an ``ndim`` tensor) after broadcasting to ``out_ndim`` dims."""
    return label.axis + (out_ndim - ndim)
