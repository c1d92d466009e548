"""Row-sparse optimizer steps: only the rows that got a gradient move, at a cost that scales with k.

A meProp layer gives these optimizers its weight gradient as ``(rows, values)`` (see
:mod:`mesimp_compress.meprop.rowgrad`) instead of a full-size ``.grad`` that is zero outside
k rows. Parameters with an ordinary ``.grad`` (biases by default, layers that are not
wrapped, the output layer) get the ordinary dense update. Both dense and row gradients of
one parameter are summed.

How the row step differs from dense Adam / SGD with momentum (the "lazy" semantics):

- At the first step, rows that got a gradient move exactly as under the dense optimizer,
  and rows that got none stay put (dense Adam would not move them either: their moments
  are zero).
- Later, a row that gets no gradient in a step keeps its parameters *and* its moments
  unchanged. Dense Adam would decay its moments (m *= beta1, v *= beta2) and still move it
  by the decayed momentum; dense SGD would move it by ``momentum * buffer``. Here the
  momentum of a row is only applied, and only decays, in steps where the row is selected.
- Adam's bias correction uses the parameter's step count (steps in which any of its rows
  got a gradient), as dense Adam does, not a per-row count.
- Weight decay (L2, added to the gradient) applies to the updated rows only.

State per parameter is param-shaped (``exp_avg``, ``exp_avg_sq`` / ``momentum_buffer``)
plus a scalar ``step`` (a 0-dim tensor for Adam, as in torch.optim.Adam), so surgery can
remap it like any dense optimizer state.

Note: while one of these optimizers lives, the ``.grad`` of a wrapped layer's weight stays
None (its gradient is pending as rows: see :meth:`RowSparseOptimizer.row_grad`); utilities
that read ``.grad`` (e.g. gradient clipping) do not see it. Only a backward pass that
accumulates into the weight hands rows on: ``torch.autograd.grad(loss, [weight])`` returns the
masked gradient as usual, and ``autograd.grad`` of other tensors or ``backward(inputs=...)``
without the weight hands nothing to the optimizer. Pending rows are dropped by this
optimizer's ``zero_grad`` and ``step``, not by ``model.zero_grad()``: to throw a backward
away, call the optimizer's ``zero_grad``. When another optimizer steps a weight one of
these claimed (a switch to a plain optimizer while the old one is still referenced, say
by its LR scheduler), the claim ends there: the pending rows go into ``.grad`` for that
step and later backward passes fill ``.grad`` again.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch.optim.adam import adam

from .errors import ConfigError
from .meprop import rowgrad


class RowSparseOptimizer(torch.optim.Optimizer):
    """Base: claims its parameters' row gradients, collects them, and pairs them with .grad."""

    # torch.amp.GradScaler cannot unscale row gradients (they never reach .grad), so these
    # optimizers take the scale from it, as torch's fused optimizers do: the scaler then sets
    # ``grad_scale`` and ``found_inf`` on the optimizer for the step (see _unscale).
    _step_supports_amp_scaling = True

    def __init__(self, params: Iterable[Any], defaults: dict[str, Any]) -> None:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            raise ConfigError(
                f"{type(self).__name__} keeps row gradients out of .grad, so DDP would not "
                "average them across ranks; use a dense optimizer under torch.distributed"
            )
        self._rows: dict[torch.Tensor, list[tuple[torch.Tensor, torch.Tensor]]] = {}
        try:
            super().__init__(params, defaults)
        except (TypeError, ValueError) as exc:  # no parameters, a non-tensor, a repeat
            raise ConfigError(f"{type(self).__name__}: {exc}") from exc
        _watch_other_steps()

    def add_param_group(self, param_group: dict[str, Any]) -> None:  # noqa: D102
        super().add_param_group(param_group)
        for param in self.param_groups[-1]["params"]:
            rowgrad.claim(param, self)

    def __setstate__(self, state: dict[str, Any]) -> None:  # noqa: D105
        super().__setstate__(state)
        # load_state_dict comes through here too: rows a backward left pending stay for
        # the next step, as torch's optimizers leave .grad alone; an unpickled copy has none
        self._rows = getattr(self, "_rows", {})
        for group in self.param_groups:
            for param in group["params"]:
                rowgrad.claim(param, self)
        _watch_other_steps()

    def add_rows(self, param: torch.Tensor, rows: torch.Tensor, values: torch.Tensor) -> None:
        """Accumulate a row gradient of ``param`` until the next step (no rows: nothing).

        Values are kept in ``param``'s dtype, as autograd keeps ``.grad``: rows computed
        under autocast are summed and unscaled in full precision, not in float16/bfloat16
        (where a GradScaler's unscale would flush small gradients to zero)."""
        if rows.numel():
            if values.dtype != param.dtype:  # (a no-op .to costs a call on every backward)
                values = values.to(param.dtype)
            self._rows.setdefault(param, []).append((rows, values))

    def row_grad(self, param: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The pending row gradient of ``param`` as (unique rows, summed values), if any."""
        rowgrad.collect(param)
        pending = self._rows.get(param)
        if not pending:
            return None
        rows, values = _coalesce(pending)
        self._rows[param] = [(rows, values)]
        return rows, values

    def zero_grad(self, set_to_none: bool = True) -> None:  # noqa: D102
        super().zero_grad(set_to_none)
        self._collect()
        self._rows.clear()

    def release(self) -> None:
        """Stop claiming row gradients: wrapped layers fill ``.grad`` again."""
        for group in self.param_groups:
            for param in group["params"]:
                if rowgrad.consumer_of(param) is self:
                    rowgrad.release(param)

    def hand_back(self, param: torch.Tensor) -> None:
        """Stop claiming ``param``: its pending rows are added into ``.grad``, and later
        backward passes fill ``.grad``."""
        if rowgrad.consumer_of(param) is self:
            rowgrad.release(param)  # (collects the rows the compiled layers hold)
        pending = self._rows.pop(param, None)
        if pending:
            rows, values = _coalesce(pending)
            with torch.no_grad():
                if param.grad is None:
                    param.grad = torch.zeros_like(param)
                param.grad.index_add_(0, rows, values.to(param.grad.dtype))

    def _collect(self) -> None:
        """Take the rows that compiled meProp layers hold for these parameters."""
        for group in self.param_groups:
            for param in group["params"]:
                rowgrad.collect(param)

    def _gradients(self, group: dict[str, Any]):
        """For each parameter of ``group`` with a gradient: (param, dense grad, rows, values).

        A parameter with only a row gradient (or rows and an all-zero ``.grad``, as
        ``zero_grad(set_to_none=False)`` leaves one) has ``grad`` None; one with both has
        the rows folded into its dense ``grad`` and ``rows`` None. Pending rows are consumed.
        """
        for param in group["params"]:
            pending = self._rows.pop(param, None)
            grad = param.grad
            if pending is None:
                if grad is not None:
                    yield param, grad, None, None
                continue
            rows, values = _coalesce(pending)
            if grad is None or not bool(grad.any()):  # a .grad zeroed in place is no dense
                yield param, None, rows, values  # part: the step stays a row step
            else:
                yield param, grad.index_add(0, rows, values.to(grad.dtype)), None, None

    def _run(self, closure: Callable[[], Any] | None) -> Any:
        if closure is None:
            return None
        with torch.enable_grad():
            return closure()

    def _unscale(self) -> bool:
        """Under ``torch.amp.GradScaler.step``: divide the dense and row gradients by the
        scale and say whether to step (False: a gradient is not finite; the step is skipped
        and its rows dropped, as the scaler skips a dense optimizer's step). A non-finite
        value only in row gradients skips the step but, unseen by the scaler, does not lower
        its scale. Without a scaler: True."""
        self._collect()
        found_inf = getattr(self, "found_inf", None)
        if found_inf is None:
            return True
        scale = getattr(self, "grad_scale", None)
        values = [v for pending in self._rows.values() for _, v in pending]
        if scale is None and values:
            raise ConfigError(
                f"{type(self).__name__} holds row gradients that GradScaler.unscale_ cannot "
                "reach (they are not in .grad); call scaler.step(optimizer) without "
                "scaler.unscale_(optimizer) first"
            )
        if bool(found_inf) or not all(bool(v.isfinite().all()) for v in values):
            self._rows.clear()
            return False
        if scale is not None:
            inv = scale.double().reciprocal().float()
            for group in self.param_groups:
                for p in group["params"]:
                    if p.grad is not None:
                        p.grad.mul_(inv.to(p.grad.device, p.grad.dtype))
            # out of place: one values tensor may be pending for two parameters (an LSTM's
            # bias_ih and bias_hh get the same rows), and must be unscaled once for each
            for pending in self._rows.values():
                pending[:] = [(r, v * inv.to(v.device, v.dtype)) for r, v in pending]
        return True


class RowSparseAdam(RowSparseOptimizer):
    """Adam whose step touches only the rows that got a gradient (lazy moments; see module doc).

    All updates of a parameter group (whole tensors and gathered rows) run in one call of
    torch's functional Adam, fused where the device and dtype allow.
    """

    def __init__(self, params: Iterable[Any], lr: float = 1e-3,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.0) -> None:
        _check(_number(lr) and lr >= 0.0, f"lr must be a finite number >= 0; got {lr!r}")
        _check(isinstance(betas, (tuple, list)) and len(betas) == 2
               and all(_number(b) and 0.0 <= b < 1.0 for b in betas),
               f"betas must be two numbers in [0, 1); got {betas!r}")
        _check(_number(eps) and eps >= 0.0, f"eps must be a finite number >= 0; got {eps!r}")
        _check(_number(weight_decay) and weight_decay >= 0.0,
               f"weight_decay must be a finite number >= 0; got {weight_decay!r}")
        super().__init__(params, {"lr": lr, "betas": tuple(betas), "eps": eps,
                                  "weight_decay": weight_decay})

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """Update every parameter that got a gradient (rows or dense) since the last step."""
        loss = self._run(closure)
        if not self._unscale():
            return loss
        for group in self.param_groups:
            params, grads, exp_avgs, exp_avg_sqs, steps, write_back = [], [], [], [], [], []
            for param, grad, rows, values in self._gradients(group):
                state = self.state[param]
                if not state:
                    state["step"] = torch.tensor(0.0)
                    state["exp_avg"] = torch.zeros_like(param, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(param,
                                                           memory_format=torch.preserve_format)
                m, v = state["exp_avg"], state["exp_avg_sq"]
                if rows is not None:
                    full = (param, m, v)
                    param, m, v = (t.index_select(0, rows) for t in full)
                    grad = values
                    write_back.append((rows, full, (param, m, v)))
                params.append(param)
                grads.append(grad)
                exp_avgs.append(m)
                exp_avg_sqs.append(v)
                steps.append(state["step"])
            if not params:
                continue
            beta1, beta2 = group["betas"]
            adam(params, grads, exp_avgs, exp_avg_sqs, [], steps,
                 fused=True if all(_fusable(p) for p in params) else None,
                 amsgrad=False, beta1=beta1, beta2=beta2, lr=group["lr"],
                 weight_decay=group["weight_decay"], eps=group["eps"], maximize=False)
            for rows, full, gathered in write_back:
                for target, value in zip(full, gathered, strict=True):
                    target.index_copy_(0, rows, value)
        self._rows.clear()
        return loss


class RowSparseSGD(RowSparseOptimizer):
    """SGD (optionally with momentum) whose step touches only the rows that got a gradient."""

    def __init__(self, params: Iterable[Any], lr: float = 1e-2, momentum: float = 0.0,
                 weight_decay: float = 0.0, nesterov: bool = False) -> None:
        _check(_number(lr) and lr >= 0.0, f"lr must be a finite number >= 0; got {lr!r}")
        _check(_number(momentum) and 0.0 <= momentum < 1.0,
               f"momentum must be a number in [0, 1); got {momentum!r}")
        _check(_number(weight_decay) and weight_decay >= 0.0,
               f"weight_decay must be a finite number >= 0; got {weight_decay!r}")
        _check(not nesterov or momentum > 0, "nesterov needs momentum > 0")
        super().__init__(params, {"lr": lr, "momentum": momentum,
                                  "weight_decay": weight_decay, "nesterov": bool(nesterov)})

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """Update every parameter that got a gradient (rows or dense) since the last step."""
        loss = self._run(closure)
        if not self._unscale():
            return loss
        for group in self.param_groups:
            for param, grad, rows, values in self._gradients(group):
                state = self.state[param]
                if not state:
                    state["step"] = 0
                    if group["momentum"]:
                        state["momentum_buffer"] = torch.zeros_like(
                            param, memory_format=torch.preserve_format)
                state["step"] += 1
                buf = state.get("momentum_buffer")
                if rows is None:
                    _sgd(param, grad, buf, group)
                    continue
                p_rows = param.index_select(0, rows)
                buf_rows = None if buf is None else buf.index_select(0, rows)
                _sgd(p_rows, values, buf_rows, group)
                param.index_copy_(0, rows, p_rows)
                if buf is not None:
                    buf.index_copy_(0, rows, buf_rows)
        self._rows.clear()
        return loss


def _sgd(p, grad, buf, group):
    if group["weight_decay"]:
        grad = grad.add(p, alpha=group["weight_decay"])
    if buf is not None:
        buf.mul_(group["momentum"]).add_(grad)
        grad = grad.add(buf, alpha=group["momentum"]) if group["nesterov"] else buf
    p.add_(grad, alpha=-group["lr"])


_WATCHING: list[bool] = [False]


def _watch_other_steps() -> None:
    """Once per process: before any other optimizer steps, end the claims on its weights."""
    if not _WATCHING[0]:
        from torch.optim.optimizer import register_optimizer_step_pre_hook

        register_optimizer_step_pre_hook(_hand_back_claimed)
        _WATCHING[0] = True


def _hand_back_claimed(optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
    """A step pre-hook of every optimizer: a weight a live row-sparse optimizer claimed,
    stepped by another one, goes back to ``.grad`` (its rows would otherwise wait, unseen,
    in the first optimizer, and the second would skip the weight as gradient-free)."""
    if isinstance(optimizer, RowSparseOptimizer) or not rowgrad.claimed():
        return
    for group in optimizer.param_groups:
        for param in group["params"]:
            owner = rowgrad.consumer_of(param)
            if isinstance(owner, RowSparseOptimizer):
                owner.hand_back(param)


def _coalesce(
    pending: list[tuple[torch.Tensor, torch.Tensor]],
) -> tuple[torch.Tensor, torch.Tensor]:
    if len(pending) == 1:
        return pending[0]
    rows = torch.cat([r for r, _ in pending])
    values = torch.cat([v for _, v in pending])
    unique, inverse = torch.unique(rows, return_inverse=True)
    summed = values.new_zeros((unique.shape[0], *values.shape[1:]))
    summed.index_add_(0, inverse, values)
    return unique, summed


def _fusable(tensor: torch.Tensor) -> bool:
    return tensor.device.type in ("cpu", "cuda") and tensor.dtype in (
        torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _number(value: Any) -> bool:
    """A finite real number or one-element tensor (a bool is not one)."""
    if isinstance(value, torch.Tensor):
        if value.numel() != 1 or value.is_complex():
            return False
        value = value.item()
    return (isinstance(value, numbers.Real) and not isinstance(value, bool)
            and math.isfinite(value))


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)
