"""Default loss, metric and distillation, for classifiers and sequence taggers alike.

Outputs of shape (B, C) go with targets (B,); outputs (B, T, C) with targets (B, T), where
positions whose target is ``IGNORE_INDEX`` (-100, PyTorch's convention) are padding and count
nowhere. Class scores along dim 1, as ``F.cross_entropy`` takes them ((B, C, T) with (B, T),
a segmentation's (B, C, H, W) with (B, H, W)), work too; where both layouts fit (C == T),
the classes are read from the last dim. A dict output is read at its ``"logits"`` (as
Hugging Face models return them). A metric returns ``(sum, count)`` so batches of any size
average exactly.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
import torch.utils._pytree as pytree

from .errors import DataError, ShapeError

IGNORE_INDEX = -100

LossFn = Callable[[Any, Any], torch.Tensor]
MetricFn = Callable[[Any, Any], "tuple[float, float] | float"]


def _logits(outputs: Any) -> Any:
    """A dict output's ``"logits"`` (as Hugging Face models return them), else ``outputs``."""
    if isinstance(outputs, Mapping) and isinstance(outputs.get("logits"), torch.Tensor):
        return outputs["logits"]
    return outputs


def _flatten(outputs: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    outputs = _logits(outputs)
    if not isinstance(outputs, torch.Tensor) or not isinstance(targets, torch.Tensor):
        raise ShapeError(
            "the default loss/metric expect a tensor output and tensor targets; "
            f"got {type(outputs).__name__} and {type(targets).__name__} (pass loss= and "
            "metric=; --loss/--metric on the command line)"
        )
    if targets.dim() == 0:
        raise ShapeError(
            "the targets hold one value, not a batch: each batch must hold several examples "
            "(pass a DataLoader over your Dataset, not the Dataset itself)"
        )
    logits = _classes_last(outputs, targets)
    if logits is not None:
        return logits.reshape(-1, logits.shape[-1]), targets.reshape(-1)
    hint = ""
    if targets.is_floating_point():
        hint = "; the targets are floats (a regression?): pass loss= and metric= for it"
    elif targets.dim() == outputs.dim() and targets.dim() > 1 and targets.shape[1] == 1:
        hint = "; the targets have a dim of size 1 after the batch: squeeze it"
    raise ShapeError(
        f"model output {tuple(outputs.shape)} does not fit targets {tuple(targets.shape)}: "
        "expected class scores (B, C) with (B,), (B, T, C) or (B, C, T) with (B, T), "
        f"(B, C, H, W) with (B, H, W){hint}"
    )


def _classes_last(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor | None:
    """``outputs`` with the class scores along the last dim, or None if they do not fit
    ``targets``: (B, ..., C) as given, or (B, C, ...) with dim 1 moved last."""
    if outputs.dim() != targets.dim() + 1:
        return None
    last = outputs.shape[:-1] == targets.shape
    first = outputs.dim() > 2 and outputs.shape[0] == targets.shape[0] and (
        outputs.shape[2:] == targets.shape[1:])
    if first and (not last or outputs.dim() > 3):  # an image's (B, C, H, W), as convolutions
        return outputs.movedim(1, -1)  # give it, also where C == W
    return outputs if last else None


def _classes(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Class targets as int64; ShapeError for float targets or a class the logits lack."""
    if labels.dtype.is_floating_point or labels.is_complex():
        raise ShapeError(
            f"class targets must be integers, got {labels.dtype} (for a regression or another "
            "task, pass loss= and metric=)"
        )
    labels = labels.long()  # int32, uint8, bool, ... as torch's losses want them
    real = labels[labels != IGNORE_INDEX]
    if real.numel() and (int(real.min()) < 0 or int(real.max()) >= logits.shape[-1]):
        bad = int(real.min()) if int(real.min()) < 0 else int(real.max())
        raise ShapeError(
            f"the targets hold class {bad}, but the model gives {logits.shape[-1]} class "
            f"scores (classes 0..{logits.shape[-1] - 1}; {IGNORE_INDEX} marks padding)"
        )
    return logits, labels


def cross_entropy(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy over the non-padding positions (0 for a batch of padding only:
    nothing to learn from, where torch's mean would be 0/0; an empty batch stays NaN, which
    training reports as a batch without examples)."""
    logits, labels = _classes(*_flatten(outputs, targets))
    if labels.numel() and not bool((labels != IGNORE_INDEX).any()):
        return logits.sum() * 0.0
    return F.cross_entropy(logits, labels, ignore_index=IGNORE_INDEX)


@torch.no_grad()
def accuracy(outputs: torch.Tensor, targets: torch.Tensor) -> tuple[float, float]:
    """(correct, counted) over the non-padding positions."""
    logits, labels = _classes(*_flatten(outputs, targets))
    mask = labels != IGNORE_INDEX
    correct = (logits.argmax(-1) == labels) & mask
    return float(correct.sum()), float(mask.sum())


def distillation(student: Any, teacher: Any, targets: Any, temperature: float) -> torch.Tensor:
    """Match the original model's outputs: soft-label KL for logits (the Bernoulli KL of a
    single logit), MSE otherwise.

    Logits are recognised as float outputs whose leading dims match integer targets; padding
    positions (target -100) are skipped. A structured output (tuple, list, dict) is matched
    leaf by leaf: the sum over its floating-point tensors.
    """
    if isinstance(student, torch.Tensor) and isinstance(teacher, torch.Tensor):
        return _distill(student, teacher, targets, temperature)
    mine, theirs = pytree.tree_leaves(student), pytree.tree_leaves(teacher)
    if pytree.tree_structure(student) != pytree.tree_structure(teacher):
        raise ShapeError(
            "distillation matches the model's training outputs with the original's eval "
            f"outputs, and they differ in structure ({len(mine)} vs {len(theirs)} values: "
            "a model that returns more while training); set distill = 0 for this model"
        )
    pairs = [
        (s, t) for s, t in zip(mine, theirs, strict=False)
        if isinstance(s, torch.Tensor) and isinstance(t, torch.Tensor)
        and s.is_floating_point() and s.shape == t.shape
    ]
    if len(mine) != len(theirs) or not pairs:
        raise ShapeError(
            "distillation needs floating-point tensor outputs from the model (a tensor, or "
            "tuples/lists/dicts of them); set distill = 0 for this model"
        )
    return sum(_distill(s, t, targets, temperature) for s, t in pairs)


def _distill(student: torch.Tensor, teacher: torch.Tensor, targets: Any,
             temperature: float) -> torch.Tensor:
    scores = (_classes_last(student, targets) if isinstance(targets, torch.Tensor)
              and not targets.dtype.is_floating_point else None)
    # one output per position is a binary classifier's logit only for 0/1 targets (integer
    # targets such as ages or counts make it a regression)
    is_logits = scores is not None and (scores.shape[-1] > 1 or _binary(targets))
    if not is_logits:
        same = ~teacher.isfinite() & (student == teacher)  # a score masked to -inf in both
        if bool(same.any()):
            student, teacher = student.masked_fill(same, 0.0), teacher.masked_fill(same, 0.0)
        return F.mse_loss(student, teacher)
    s, labels = _flatten(student, targets)
    t = _classes_last(teacher, targets)
    t = t.reshape(-1, t.shape[-1])
    keep = labels != IGNORE_INDEX
    s, t = s[keep], t[keep]
    if s.numel() == 0:
        return student.sum() * 0.0
    if s.shape[-1] == 1:  # one logit (a binary classifier): KL between the two Bernoullis,
        q = torch.sigmoid(t / temperature)  # softmax over one class would be 0 always
        s, t = s / temperature, t / temperature
        kl = (F.binary_cross_entropy_with_logits(s, q, reduction="sum")
              - F.binary_cross_entropy_with_logits(t, q, reduction="sum"))
        return kl / s.shape[0] * temperature**2
    log_p = F.log_softmax(s / temperature, dim=-1)
    if bool(t.isfinite().all()):
        q = F.softmax(t / temperature, dim=-1)
        return F.kl_div(log_p, q, reduction="batchmean") * temperature**2
    log_q = F.log_softmax(t / temperature, dim=-1)
    q = log_q.exp()
    # classes the original gives no probability (scores masked to -inf) add nothing, also
    # where the student masks them too (kl_div gave 0 * (-inf - -inf) = NaN there)
    terms = torch.where(q > 0, q * (log_q - log_p), torch.zeros_like(q))
    return terms.sum() / s.shape[0] * temperature**2


def _binary(targets: torch.Tensor) -> bool:
    real = targets[targets != IGNORE_INDEX]
    return real.numel() == 0 or (int(real.min()) >= 0 and int(real.max()) <= 1)


def causal_lm(model: Any) -> bool:
    """Whether ``model`` is a Hugging Face causal language model (``...ForCausalLM``,
    ``...LMHeadModel``), which shifts its ``labels`` by one itself."""
    return type(model).__name__.endswith(("ForCausalLM", "LMHeadModel"))


def next_token(fn: Callable[[Any, Any], Any]) -> Callable[[Any, Any], Any]:
    """``fn`` (a loss or metric) on the logits of each position against the next
    position's target: ``fn(logits[:, :-1], targets[:, 1:])``."""

    def shifted(outputs: Any, targets: torch.Tensor) -> Any:
        return fn(_logits(outputs)[:, :-1], targets[:, 1:])

    shifted.__name__ = f"next_token_{getattr(fn, '__name__', 'fn')}"
    return shifted


def check_loss(loss: Any, where: str, *, differentiable: bool = True) -> None:
    """DataError naming ``where`` unless ``loss`` is a one-value floating tensor (that
    autograd can differentiate, when ``differentiable``)."""
    if not isinstance(loss, torch.Tensor) or loss.numel() != 1 or not loss.is_floating_point():
        got = (
            f"a {loss.dtype} tensor of shape {tuple(loss.shape)}"
            if isinstance(loss, torch.Tensor) else f"a {type(loss).__name__}"
        )
        raise DataError(f"the loss must return a scalar float tensor; got {got} on {where}")
    if differentiable and not loss.requires_grad:
        raise DataError(
            f"the loss on {where} does not depend on the model's trainable parameters "
            "(detached, computed under no_grad, or nothing is trainable)"
        )


def metric_value(
    result: tuple[float, float] | float | torch.Tensor, batch: int, *, where: str
) -> tuple[float, float]:
    """Normalise a metric's return to (sum, count): a plain number counts as a batch mean.

    DataError naming ``where`` for any other return (None, a string, a vector, a triple) and
    for a value that is not finite.
    """
    if isinstance(result, (tuple, list)):
        if len(result) != 2:
            raise DataError(
                f"the metric returned a {type(result).__name__} of {len(result)} values on "
                f"{where}; return a number (the batch mean) or a pair (sum, count)"
            )
        total, count = _number(result[0], where), _number(result[1], where)
        if count == 0 and not math.isfinite(total):  # a masked mean over nothing (NaN x 0):
            return 0.0, 0.0  # this batch scored no example
    else:
        total, count = _number(result, where) * batch, float(batch)
    if not (math.isfinite(total) and math.isfinite(count)):
        raise DataError(
            f"the metric is not finite on {where} ({total} over {count}); a NaN or infinite "
            "metric would make every comparison (max_drop, the report) meaningless"
        )
    if count < 0:
        raise DataError(
            f"the metric returned a negative count ({count:g}) on {where}; the pair is "
            "(sum, count) with count the number of examples scored"
        )
    return total, count


def mean_of(total: float, count: float, batches: int | None = None) -> float:
    """The metric over the eval data: its summed values over the examples it counted
    (``batches``: how many the data gave this time)."""
    if batches == 0:
        raise DataError(
            "the eval data gave no batches this time (it is read on every evaluation: an "
            "object whose __iter__ returns the same iterator is empty after its first pass); "
            "pass a list or a DataLoader"
        )
    if count <= 0:
        raise DataError(
            f"the metric counted {count:g} examples over the whole eval data (every batch "
            "gave a count of 0?); return a number or a pair (sum, count) with count > 0"
        )
    return total / count


def _number(value: Any, where: str) -> float:
    arrays = (torch.Tensor, np.ndarray)
    if isinstance(value, arrays):
        count = value.numel() if isinstance(value, torch.Tensor) else value.size
        if count == 1:
            return float(value.reshape(-1)[0])
    elif isinstance(value, (int, float, np.number)) or (
        hasattr(value, "__float__") and not isinstance(value, (str, bytes))
    ):
        return float(value)
    shape = f" of shape {tuple(value.shape)}" if isinstance(value, arrays) else ""
    raise DataError(
        f"the metric returned {type(value).__name__}{shape} on {where}; return a number "
        "(the batch mean) or a pair (sum, count)"
    )
