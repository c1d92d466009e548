"""How units flow through functional ops (everything a forward does outside the layer modules).

Each op seen during tracing falls in one family, and each family knows what happens to the
labels of its tensor inputs:

- elementwise: units stay where they are; operands are broadcast, and two operands carrying
  different units at the same position *couple* those units (a residual add, a gate);
- movement: values are only rearranged (view, flatten, permute, indexing, cat, split, pad,
  ...): followed exactly by running the op on a probe (see :mod:`.labels`);
- positional movement (indexing, narrow, split, chunk, roll, ...): as movement, but a fixed
  slice, index or shift of the units blocks them, since it would pick other units once the
  width shrinks (slices of other axes, and slices taking the whole unit axis, pass);
- per-unit ops that work along other axes (pooling, softmax over time, reductions over
  spatial axes): units stay, unless the op works along the unit axis;
- anything else with a labelled input is not understood, and its units are blocked.
"""

from __future__ import annotations

import re
from collections.abc import Callable, ItemsView, Iterator, KeysView, Mapping, ValuesView
from dataclasses import fields, is_dataclass
from typing import TYPE_CHECKING, Any

import torch

from .labels import (
    PAD,
    AxisLabel,
    Label,
    ProbeLabel,
    ProbeMismatch,
    codes_of,
    from_probe,
    to_probe,
)

if TYPE_CHECKING:
    from .trace import Tracer

ELEMENTWISE = frozenset(
    """add radd iadd add_ sub rsub isub sub_ mul rmul imul mul_ div rdiv truediv rtruediv
    itruediv div_ true_divide neg negative abs pow rpow ipow pow_ exp expm1 log log1p log2
    sqrt rsqrt square reciprocal sign sin cos erf erfc clamp clip clamp_ clip_ clamp_min
    clamp_max maximum minimum fmax fmin where masked_fill masked_fill_ lerp addcmul addcdiv
    relu relu_ relu6 gelu silu mish sigmoid sigmoid_ tanh tanh_ hardtanh hardtanh_ hardswish
    hardsigmoid elu elu_ selu celu leaky_relu leaky_relu_ softplus softsign logsigmoid
    tanhshrink threshold threshold_ dropout dropout_ dropout1d dropout2d dropout3d
    alpha_dropout feature_alpha_dropout gt ge lt le eq ne logical_not logical_and logical_or
    isnan isinf isfinite nan_to_num round floor ceil trunc""".split()
)
# Elementwise, but only the first tensor carries data (the rest give a dtype or a device).
CONVERSIONS = frozenset(
    """to type type_as float double half bfloat16 cpu cuda data contiguous clone detach
    detach_ requires_grad_""".split()
)
# The output depends only on the input's shape, dtype or device.
SHAPE_ONLY = frozenset(
    """zeros_like ones_like empty_like full_like rand_like randn_like randint_like new_zeros
    new_ones new_empty new_full""".split()
)
# (In-place ones such as squeeze_ are left out: the input's shape is gone when they are seen.)
MOVEMENT = frozenset(
    """view reshape flatten unflatten permute transpose t T mT unsqueeze squeeze getitem
    narrow select split split_with_sizes chunk unbind tensor_split expand expand_as view_as
    reshape_as repeat tile movedim moveaxis swapaxes swapdims index_select gather
    take_along_dim flip roll pad pad_packed_sequence pack_padded_sequence""".split()
)
# Movement ops that pick positions by fixed offsets, indices or shifts: along a unit axis they
# would pick other units once the width shrinks, so there they must pass the whole axis as it is.
# (So does ``pad`` in a copying mode: reflect, replicate and circular copy units by position.)
POSITIONAL = frozenset(
    """getitem narrow select index_select gather take_along_dim split split_with_sizes chunk
    unbind tensor_split roll""".split()
)
# Movement ops whose first argument is a sequence of tensors.
MOVEMENT_SEQ = frozenset("cat concat concatenate stack hstack vstack dstack column_stack".split())
# Movement ops whose second argument only lends its shape.
SHAPE_SOURCE = frozenset("expand_as view_as reshape_as".split())
# Movement ops with a fill value (argument position, keyword). The probe fills with PAD when the
# fill is a constant 0 (it adds nothing whichever units go), else with 0 (no unit).
FILL_ARG = {"pad": (3, "value"), "pad_packed_sequence": (3, "padding_value")}
# Ops along one axis: (position of `dim`, its default; None = no safe default).
ALONG_AXIS = {
    "softmax": (1, None),
    "log_softmax": (1, None),
    "softmin": (1, None),
    "cumsum": (1, None),
    "cumprod": (1, None),
    "cummax": (1, None),
    "cummin": (1, None),
    "logcumsumexp": (1, None),
    "normalize": (2, 1),
    "sort": (1, -1),
    "argsort": (1, -1),
}
# Reductions: position of `dim` (keepdim follows it).
REDUCTIONS = {
    name: 1
    for name in """sum mean amax amin max min std var logsumexp prod nansum nanmean median
    nanmedian argmax argmin any all count_nonzero var_mean std_mean""".split()
}
REDUCTIONS["norm"] = 2
POOLING = re.compile(r"^(max|avg|adaptive_avg|adaptive_max|lp|fractional_max)_pool([123])d")
RESAMPLING = frozenset("interpolate upsample upsample_nearest upsample_bilinear".split())
NORMALISING = frozenset("layer_norm rms_norm".split())
# Ops that return no tensor but let values escape (or write into a tensor).
ESCAPES = frozenset("item tolist numpy bool float int index iter array complex setitem".split())


def op_name(func: Callable[..., Any]) -> str:
    """A short, normalised name for a torch function, method or property getter."""
    name = getattr(func, "__name__", None) or type(func).__name__
    if name == "__get__":
        name = getattr(getattr(func, "__self__", None), "__name__", "get")
    if name.startswith("__") and name.endswith("__") and len(name) > 4:
        name = name[2:-2]
    return name.lstrip("_") or name


def iter_tensors(obj: Any, _depth: int = 0, *, objects: bool = False,
                 _seen: set[int] | None = None) -> Iterator[torch.Tensor]:
    """Every tensor inside nested tuples, lists, sets, dicts (and their views) and
    dataclasses; with ``objects``, also inside other objects' attributes (a model may return
    a plain result class or a SimpleNamespace)."""
    if isinstance(obj, torch.Tensor):
        yield obj
        return
    if _depth > 8 or obj is None or isinstance(obj, (str, bytes, int, float, complex, type)):
        return
    seen = set() if _seen is None else _seen
    if id(obj) in seen:
        return
    seen.add(id(obj))
    if isinstance(obj, Mapping):
        items: Any = obj.values()
    elif isinstance(obj, (list, tuple, set, frozenset, KeysView, ValuesView, ItemsView)):
        items = obj
    elif is_dataclass(obj):
        items = [getattr(obj, f.name, None) for f in fields(obj)]
    elif objects and not isinstance(obj, torch.nn.Module):
        slots = [n for c in type(obj).__mro__ for n in getattr(c, "__slots__", ())]
        items = [*getattr(obj, "__dict__", {}).values(),
                 *(getattr(obj, n, None) for n in slots if isinstance(n, str))]
    else:
        return
    for item in items:
        yield from iter_tensors(item, _depth + 1, objects=objects, _seen=seen)


def _arg(args: tuple, kwargs: dict, pos: int, key: str, default: Any) -> Any:
    if key in kwargs:
        return kwargs[key]
    return args[pos] if len(args) > pos else default


def _dims(dim: Any, ndim: int) -> list[int] | None:
    if dim is None or isinstance(dim, bool):
        return None
    if isinstance(dim, int):
        dim = [dim]
    if not isinstance(dim, (list, tuple)) or not all(isinstance(d, int) for d in dim):
        return None
    return [d % ndim if ndim else 0 for d in dim]


def handle(tracer: Tracer, func: Callable[..., Any], args: tuple, kwargs: dict, out: Any) -> None:
    """Update labels for one op whose inputs include labelled tensors."""
    name = op_name(func)
    inputs = [t for t in iter_tensors((args, kwargs)) if tracer.label(t) is not None]
    outputs = list(iter_tensors(out))
    if not outputs:
        if name in ESCAPES:
            tracer.block_tensors(inputs, f"op '{name}' reads unit values out of the graph")
        return
    if name in SHAPE_ONLY:
        return
    if name in CONVERSIONS:
        first = next(iter_tensors(args[:1]), None)
        if first is not None and tracer.label(first) is not None:
            for t in outputs:
                tracer.set_label(t, tracer.label(first))
        return
    if name in MOVEMENT or name in MOVEMENT_SEQ:
        _movement(tracer, name, func, args, kwargs, out, inputs)
        return
    if name in ("max", "min") and len(args) > 1 and isinstance(args[1], torch.Tensor):
        name = "maximum"
    if name in ELEMENTWISE:
        _elementwise(tracer, name, args, kwargs, outputs)
        return
    first = args[0] if args and isinstance(args[0], torch.Tensor) else None
    label = tracer.label(first) if first is not None else None
    others = [t for t in inputs if t is not first]
    if not isinstance(label, AxisLabel) or others:
        tracer.block_tensors(inputs, _not_understood(name))
        return
    ndim = first.dim()
    axis = label.axis
    pool = POOLING.match(name)
    if pool or name in RESAMPLING or name in NORMALISING:
        if pool:
            spatial = int(pool.group(2))
        elif name in RESAMPLING:
            spatial = ndim - 2
        else:
            shape = _arg(args, kwargs, 1, "normalized_shape", ())
            spatial = 1 if isinstance(shape, int) else len(shape)
        if axis >= ndim - spatial:
            verb = "normalises" if name in NORMALISING else "pools or resamples"
            tracer.block_tensors(inputs, f"op '{name}' {verb} across the units")
            return
        for t in outputs:
            if t.dim() == ndim:
                tracer.set_label(t, AxisLabel(axis, label.codes))
        return
    if name in ALONG_AXIS:
        pos, default = ALONG_AXIS[name]
        dims = _dims(_arg(args, kwargs, pos, "dim", default), ndim)
        if dims is None or axis in dims:
            tracer.block_tensors(inputs, f"op '{name}' mixes values across the units")
            return
        for t in outputs:
            if t.dim() == ndim:
                tracer.set_label(t, AxisLabel(axis, label.codes))
        return
    if name in REDUCTIONS:
        pos = REDUCTIONS[name]
        dims = _dims(_arg(args, kwargs, pos, "dim", None), ndim)
        keepdim = bool(_arg(args, kwargs, pos + 1, "keepdim", False))
        if dims is None or axis in dims:
            tracer.block_tensors(inputs, f"op '{name}' reduces across the units")
            return
        new_axis = axis if keepdim else axis - sum(1 for d in set(dims) if d < axis)
        for t in outputs:
            if t.dim() > new_axis and t.shape[new_axis] == first.shape[axis]:
                tracer.set_label(t, AxisLabel(new_axis, label.codes))
        return
    tracer.block_tensors(inputs, _not_understood(name))


def _not_understood(name: str) -> str:
    if "attention" in name:
        return f"op '{name}' mixes the units in attention (attention projections are not prunable)"
    return f"op '{name}' is not understood"


def _elementwise(tracer: Tracer, name: str, args: tuple, kwargs: dict, outputs: list) -> None:
    operands = list(iter_tensors((args, kwargs)))
    out = outputs[0]
    n = out.dim()
    tracked = [(t, tracer.label(t)) for t in operands if tracer.label(t) is not None]
    if any(isinstance(lab, ProbeLabel) for _, lab in tracked):
        tracer.block_tensors([t for t, _ in tracked], f"op '{name}' on units spread over axes")
        return
    axes = {lab.axis + (n - t.dim()) for t, lab in tracked}
    if len(axes) != 1:
        tracer.block_tensors(
            [t for t, _ in tracked], f"op '{name}' combines units on different axes"
        )
        return
    axis = axes.pop()
    for t in operands:
        if tracer.label(t) is not None:
            continue
        j = axis - (n - t.dim())
        if j >= 0 and t.shape[j] != 1:
            tracer.block_tensors(
                [t for t, _ in tracked],
                f"op '{name}' combines the units with a tensor of the same width that no "
                "prunable layer produces (the model input, a parameter, or a normalised "
                "residual stream)",
            )
            return
    base = tracked[0][1].codes
    for _, lab in tracked[1:]:
        other = lab.codes
        if other.shape != base.shape:
            tracer.block_codes(torch.cat([base, other]), f"op '{name}' broadcasts units")
            return
        if torch.equal(other, base):
            continue
        both = (base != 0) & (other != 0)
        lone = (base != 0) ^ (other != 0)
        if bool(lone.any()):
            tracer.block_codes(
                torch.cat([base[lone], other[lone]]),
                f"op '{name}' combines units with positions that carry none",
            )
        differ = both & (base != other)
        if bool(differ.any()):
            tracer.couple(base[differ], other[differ], name)
    for t in outputs:
        if t.dim() == n and t.shape[axis] == base.numel():
            tracer.set_label(t, AxisLabel(axis, base))


def _movement(
    tracer: Tracer,
    name: str,
    func: Callable[..., Any],
    args: tuple,
    kwargs: dict,
    out: Any,
    inputs: list[torch.Tensor],
) -> None:
    if not args:
        tracer.block_tensors(inputs, f"op '{name}' called without positional data")
        return
    data = list(args[0]) if name in MOVEMENT_SEQ else [args[0]]
    if not all(isinstance(t, torch.Tensor) for t in data):
        tracer.block_tensors(inputs, f"op '{name}' on non-tensor data")
        return
    rest = args[1:]
    if name in SHAPE_SOURCE:
        rest_tracked: list[torch.Tensor] = []
    else:
        rest_tracked = [t for t in iter_tensors((rest, kwargs)) if tracer.label(t) is not None]
    if rest_tracked:
        tracer.block_tensors(inputs, f"op '{name}' uses units as indices or sizes")
        return
    probes = []
    for t in data:
        label = tracer.label(t)
        if label is None:
            probes.append(torch.zeros(t.shape, dtype=torch.float64, device=t.device))
        else:
            probes.append(to_probe(label, t.shape).to(t.device))
    probe_args = list(args)
    probe_args[0] = probes if name in MOVEMENT_SEQ else probes[0]
    probe_kwargs = dict(kwargs)
    mode = _arg(args, kwargs, 2, "mode", "constant") if name == "pad" else "constant"
    if name in FILL_ARG:
        pos, key = FILL_ARG[name]
        value = _arg(args, kwargs, pos, key, None)
        fill = float(PAD) if mode == "constant" and not value else 0.0
        if key in probe_kwargs or len(probe_args) <= pos:
            probe_kwargs[key] = fill
        else:
            probe_args[pos] = fill
    allowed = torch.unique(torch.cat([codes_of(tracer.label(t)) for t in inputs]))
    try:
        with torch.no_grad():
            probe_out = func(*probe_args, **probe_kwargs)
        real = list(iter_tensors(out))
        probed = list(iter_tensors(probe_out))
        if len(real) != len(probed):
            raise ProbeMismatch("the op returned a different structure")
        labels = []
        for r, p in zip(real, probed, strict=True):
            if p.dtype != torch.float64:
                labels.append(None)  # lengths, batch sizes, indices: not data
                continue
            if p.shape != r.shape:
                raise ProbeMismatch("the probe took another shape")
            labels.append(from_probe(p.cpu(), allowed.cpu()))
    except (ProbeMismatch, RuntimeError, TypeError, ValueError, IndexError) as err:
        tracer.block_tensors(inputs, f"op '{name}' could not be followed ({err})")
        return
    positional = name in POSITIONAL or (name == "pad" and mode != "constant")
    source = tracer.label(data[0]) if positional else None
    if source is not None and not all(
        _passes_whole(tracer, source, label)
        for r, label in zip(real, labels, strict=True)
        if r.numel()
    ):
        tracer.block_tensors(
            inputs,
            f"op '{name}' takes a fixed slice, index or shift of the units (it cannot follow "
            "a pruned width)",
        )
    for r, label in zip(real, labels, strict=True):
        if label is not None:
            tracer.set_label(r, label)


def _passes_whole(tracer: Tracer, source: Label, taken: Label | None) -> bool:
    """Whether a positional op hands on the units of ``source`` whole.

    Along a unit axis only the whole axis may pass, as it is. Where codes vary along several
    axes (an LSTM's ``h_n``: layers along the first), a group may be left out but not cut.
    """
    if isinstance(source, AxisLabel):
        return isinstance(taken, AxisLabel) and torch.equal(taken.codes, source.codes)
    kept = codes_of(taken) if taken is not None else torch.zeros(0, dtype=torch.int64)
    codes = codes_of(source)
    bases = torch.tensor([info.base for info in tracer.groups.values()], dtype=torch.int64)
    groups = torch.searchsorted(bases, codes, right=True)
    touched = torch.isin(groups, torch.searchsorted(bases, kept, right=True))
    return bool(torch.isin(codes[touched], kept).all())
