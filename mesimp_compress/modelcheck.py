"""What a model handed to :func:`mesimp_compress.compress` must be, checked before any work.

The run fine-tunes a copy of the model, rebuilds its layers and exports it: a wrapper
(``torch.compile``, ``nn.DataParallel``) is looked through to the model it wraps; what can be
neither fine-tuned nor rebuilt (TorchScript, uninitialised lazy layers, weights without
values, ``torch.nn.utils.prune`` masks, half-precision weights) is refused by name, with
what to do instead.
"""

from __future__ import annotations

import itertools

import torch
from torch import nn

from .errors import ConfigError
from .events import EventSink, emit

_HALF = (torch.float16, torch.bfloat16)


def unwrap(model: nn.Module, sink: EventSink | None = None) -> nn.Module:
    """The model inside a ``torch.compile`` or data-parallel wrapper (a note says so)."""
    while True:
        if _compiled(model):
            inner, what = model._orig_mod, "torch.compile"
        elif isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
            inner, what = model.module, type(model).__name__
        else:
            return model
        emit(sink, "note", message=f"compressing the model inside its {what} wrapper; the "
                                   "result is a plain nn.Module")
        model = inner


def check_model(model: nn.Module) -> None:
    """ConfigError naming the first part of ``model`` the run cannot work with."""
    for name, module in model.named_modules():
        if name and _compiled(module):
            raise ConfigError(
                f"'{name}' is compiled with torch.compile inside the model: the structure is "
                "traced op by op, which compiled code hides; compile after compressing"
            )
        if isinstance(module, torch.jit.ScriptModule):
            where = f"'{name}'" if name else "the model"
            raise ConfigError(
                f"{where} is a TorchScript module (torch.jit.script/trace): it can be neither "
                "fine-tuned under meProp nor rebuilt smaller; pass the nn.Module it was made from"
            )
        for hook in module._forward_pre_hooks.values():
            _check_hook(name, hook)
    params = {id(p) for p in model.parameters()}
    for name, tensor in itertools.chain(model.named_parameters(), model.named_buffers()):
        if isinstance(tensor, nn.parameter.UninitializedTensorMixin):
            raise ConfigError(
                f"the model's '{name}' belongs to a lazy layer that has not run yet: call the "
                "model once on an example batch before compressing it"
            )
        if tensor.is_meta:
            raise ConfigError(
                f"the model's '{name}' is on the meta device (it holds no values): build the "
                "model with real weights, or load them (--weights) before compressing"
            )
        if id(tensor) not in params or not tensor.is_floating_point():
            continue  # (buffers may hold infinities: a causal -inf mask is common)
        if tensor.dtype in _HALF:
            raise ConfigError(
                f"the model's '{name}' is {str(tensor.dtype).removeprefix('torch.')}: "
                "fine-tuning and the onnxruntime proof need float32 (or float64) weights; "
                "call model.float() first"
            )
        if not bool(torch.isfinite(tensor).all()):
            raise ConfigError(f"the model's '{name}' holds NaN or infinite values")


def _compiled(module: nn.Module) -> bool:
    """Whether ``module`` is torch.compile's wrapper (without importing torch._dynamo)."""
    kind = type(module)
    return kind.__name__ == "OptimizedModule" and kind.__module__.startswith("torch._dynamo")


def copy_failed(exc: BaseException) -> ConfigError:
    """The error for a model that ``copy.deepcopy`` refuses."""
    detail = " ".join(str(exc).split())[:200]
    hint = ""
    if "weight_norm" in detail:
        hint = (" (old-style torch.nn.utils.weight_norm: use "
                "torch.nn.utils.parametrizations.weight_norm)")
    return ConfigError(
        f"the model cannot be copied ({type(exc).__name__}: {detail}); the run works on "
        f"copies and leaves yours unchanged{hint}"
    )


def _check_hook(name: str, hook: object) -> None:
    from torch.nn.utils import prune

    if isinstance(hook, prune.BasePruningMethod):
        where = f"module '{name}'" if name else "the model"
        raise ConfigError(
            f"{where} carries a torch.nn.utils.prune mask on '{hook._tensor_name}': make it "
            f"permanent first with torch.nn.utils.prune.remove(module, '{hook._tensor_name}')"
        )
