"""Per-layer parameter counts of an ONNX file, and the proof that a compressed file shrank.

Exporters rename, transpose, fuse and repack parameters, so ONNX initializers are attributed
to the PyTorch modules they came from in four passes:

1. **name**: an initializer named like a parameter (``layers.0.weight``) belongs to its
   module (one named like a buffer, e.g. ``running_mean``, is a buffer and counts nowhere);
2. **fold**: a new initializer fed to a node together with a module's named parameters, where
   the node carries the scope of an unrelated module, was created by folding that module into
   it (the bias the dynamo exporter gives a bias-free Conv/Gemm/ConvTranspose when it folds the
   BatchNorm after it, in a node scoped ``.../bn``): it belongs to the module the node computes,
   as the folded weight and bias of a Conv with a bias of its own do;
3. **value**: an initializer holding the same values as a parameter, in any order, belongs
   to the parameter's module (a weight stored transposed for MatMul; a weight the exporter
   de-duplicated with an equal one, which then counts for both), unless it is unclaimed and
   every node consuming it lies in modules unrelated to the parameter's (a folded Conv bias
   that happens to equal a BatchNorm's zero bias is the Conv's, not the BatchNorm's);
4. **scope**: any other float initializer (two or more elements) belongs to the module
   whose graph nodes consume it, read from the dynamo exporter's ``name_scopes`` metadata
   or the TorchScript exporter's node names (``/encoder/layer.0/.../MatMul``): the
   ``W``/``R``/``B`` tensors of an ONNX LSTM, a Conv weight (and bias) with BatchNorm folded in.

A module's count in ONNX must then equal its count in PyTorch (``"match"``; an all-zero
parameter the exporter dropped, such as a zero bias, and one ``forward`` never uses (an
``unused`` name: the exporter leaves it out) count as held: ``dropped``), or be 0 when its
parameters were folded into a neighbour or are unused (``"folded"``). A module may also hold
more than its parameters when a neighbour was folded into it: every parameter is held at its
own size, and the rest are tensors without a PyTorch counterpart, found by the fold pass or
(TorchScript, which renames everything) by scope, and then no more elements than the modules
reported ``"folded"`` have; that is a ``"match"`` whose surplus ``folded_in`` records. A module
may hold fewer elements than in PyTorch where the exporter computed a constant from its
parameters (``"computed"``): a Linear applied only to a parameter (DeBERTa's
relative-position projections), weight normalisation's ``g`` and ``v`` stored as the one
weight they make, a parameter scaled by a constant in ``forward``; that is taken only from a
file of the dynamo exporter (which keeps parameter names) holding none of the module's
parameters by name, or holding by name those it keeps at their sizes and, for the others it
uses, tensors no module holds by name: ones its own nodes consume (weight normalisation's
weight beside the Linear's bias) or, failing those, a tensor of each one's size that no
module holds. Equal parameters of one
module stored once (two zero-initialised offsets) are a ``"match"``. Anything else is a
``"mismatch"`` and a :class:`SizeError`. The compressed PyTorch model is the truth.
"""

from __future__ import annotations

import ast
import hashlib
import os
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils import _pytree as pytree

from .errors import SizeError

MATCH, FOLDED, COMPUTED, MISMATCH = "match", "folded", "computed", "mismatch"
_FLOAT_TYPES = {1, 10, 11, 16}  # FLOAT, FLOAT16, DOUBLE, BFLOAT16
_SCOPES = "pkg.torch.onnx.name_scopes"  # node metadata the dynamo exporter writes


@dataclass
class LayerSize:
    """Parameter elements of one module in PyTorch and in an ONNX file (before and after)."""

    name: str
    kind: str
    params: int
    onnx_params: int
    status: str
    shapes: dict[str, list[int]] = field(default_factory=dict)
    onnx_shapes: dict[str, list[int]] = field(default_factory=dict)
    params_before: int | None = None
    onnx_params_before: int | None = None
    # elements of onnx_params beyond the module's own parameters: tensors created by folding a
    # neighbour (reported "folded") into it, e.g. the bias BatchNorm gives a bias-free Conv
    folded_in: int = 0
    # elements of parameters the file does not hold: all-zero ones (the exporter drops a Gemm's
    # or Conv's all-zero bias, as freshly built Hugging Face models have) and unused ones
    dropped: int = 0

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready fields."""
        return asdict(self)


def onnx_layer_sizes(
    onnx_path: str | os.PathLike[str], model: nn.Module, *, strict: bool = True,
    unused: frozenset[str] | set[str] = frozenset(),
) -> list[LayerSize]:
    """Parameter elements per module (modules with parameters of their own) in PyTorch and in
    the ONNX file; with ``strict``, SizeError when a module's counts disagree. ``unused``:
    names of parameters the exported forward does not use (:func:`unused_params`)."""
    import onnx
    from onnx import numpy_helper

    proto = onnx.load(str(onnx_path))
    arrays = {
        init.name: numpy_helper.to_array(init)
        for init in proto.graph.initializer
        if init.data_type in _FLOAT_TYPES
    }
    params = {
        name: (module_name, param)
        for module_name, module in model.named_modules()
        for name, param in _own_params(module_name, module)
    }
    buffers = {name for name, _ in model.named_buffers()}
    consumers = _consumer_scopes(proto)
    # the dynamo exporter keeps parameter names: a parameter it does not hold by name is gone
    # from the file (TorchScript renames them all, so absence by name tells nothing there)
    keeps_names = any(
        prop.key == _SCOPES for node in proto.graph.node for prop in node.metadata_props
    )
    owner: dict[str, set[str]] = {}  # initializer -> modules it counts for
    held: dict[str, set[str]] = {}  # module -> initializers holding its parameters (name, value)
    found: dict[str, str] = {}  # parameter -> the initializer holding it (by name or value)

    for name in arrays:  # 1. by name
        if name in params:
            owner.setdefault(name, set()).add(params[name][0])
            held.setdefault(params[name][0], set()).add(name)
            found[name] = name
    named = set(found)
    products = _fold_products(proto, arrays, owner, buffers)  # 2. created by folding
    for iname, module_name in products.items():
        owner[iname] = {module_name}
    free = [n for n in arrays if n not in owner and n not in buffers]
    sorted_cache: dict[str, np.ndarray] = {}
    for pname, (module_name, param) in params.items():  # 3. by value
        if pname in found:
            continue
        values = np.sort(param.detach().cpu().float().numpy(), axis=None)
        # unclaimed initializers first, then claimed ones (an exporter may share equal tensors)
        unclaimed = [n for n in free if n not in owner]
        for iname in unclaimed + [n for n in owner if n not in products]:
            array = arrays[iname]
            if array.size != values.size:
                continue
            if iname in unclaimed and not _used_by(consumers.get(iname), module_name):
                continue  # another module's tensor, equal by chance (the scope pass takes it)
            if iname not in sorted_cache:
                sorted_cache[iname] = np.sort(array.astype(np.float32), axis=None)
            if np.array_equal(sorted_cache[iname], values):
                owner.setdefault(iname, set()).add(module_name)
                held.setdefault(module_name, set()).add(iname)
                found[pname] = iname
                break
    waiting = {params[p][0] for p in params if p not in found}
    if waiting:  # 4. by the scope of the consuming nodes
        for iname, scopes in consumers.items():
            if iname in owner or iname in buffers or iname not in arrays or arrays[iname].size < 2:
                continue
            module_name = _enclosing(scopes[0], waiting)
            if module_name is not None:
                owner.setdefault(iname, set()).add(module_name)

    # float tensors of the file no module holds: constants computed from parameters
    unowned = Counter(int(a.size) for n, a in arrays.items() if n not in owner and n not in buffers)
    per_module: dict[str, dict[str, list[int]]] = {}
    for iname, modules in owner.items():
        for m in modules:
            per_module.setdefault(m, {})[iname] = list(arrays[iname].shape)
    sizes = []
    surplus: dict[str, tuple[int, int]] = {}  # module -> (fold-pass, scope-pass) extra elements
    for module_name, module in model.named_modules():
        own = dict(_own_params(module_name, module))
        if not own:
            continue
        count = sum(p.numel() for p in own.values())
        shapes = per_module.get(module_name, {})
        in_onnx = sum(int(np.prod(s)) for s in shapes.values())
        status = MATCH if in_onnx == count else FOLDED if in_onnx == 0 else MISMATCH
        dropped = 0
        if status == MISMATCH:
            dropped = sum(p.numel() for n, p in own.items()
                          if n not in found and (n in unused or _zero(p)))
            if dropped and in_onnx + dropped == count:
                status = MATCH
            else:
                dropped = 0
        if status == MISMATCH and in_onnx > count:
            # a module called more than once: an exporter may build its tensors per call
            # (a shared nn.LSTM's W and R), each copy equal to the first
            distinct = _distinct_elements(shapes, arrays)
            if distinct == count:
                status, in_onnx = MATCH, distinct
        if status == MISMATCH and in_onnx < count and _held_once(own, found, shapes):
            # equal parameters of one module (two zero-initialised offsets, a learned h0 and
            # c0) stored once: every parameter is in the file
            status, in_onnx = MATCH, count
        if status == MISMATCH:
            extra = _surplus(own, found, shapes, held.get(module_name, set()), products)
            if extra is not None:
                status, surplus[module_name] = MATCH, extra
        by_name = named & own.keys()
        if status == MISMATCH and in_onnx < count and keeps_names and (
            not by_name or _computed_from(own, by_name, shapes, unowned, unused)
        ):
            # the exporter computed constants from parameters it did not keep (found by value,
            # if at all, only by chance: a zero bias equal to another's, weight_norm's v), or
            # from some of them, holding the rest by name at their own sizes (an offset
            # scaled by a constant in forward, folded into one new tensor)
            status = COMPUTED
        sizes.append(
            LayerSize(
                name=module_name,
                kind=type(module).__name__,
                params=count,
                onnx_params=in_onnx,
                status=status,
                shapes={n.rsplit(".", 1)[-1]: list(p.shape) for n, p in own.items()},
                onnx_shapes=shapes,
                folded_in=sum(surplus.get(module_name, (0, 0))),
                dropped=dropped,
            )
        )
    # a surplus found only by scope must fit in what the folded modules had
    budget = sum(s.params for s in sizes if s.status == FOLDED)
    if sum(by_scope for _, by_scope in surplus.values()) > budget:
        for s in sizes:
            if surplus.get(s.name, (0, 0))[1]:
                s.status, s.folded_in = MISMATCH, 0
    if strict:
        _raise_mismatches(Path(onnx_path).name, sizes)
    return sizes


def check_shrunk(
    onnx_path: str | os.PathLike[str],
    model: nn.Module,
    *,
    original_onnx: str | os.PathLike[str] | None = None,
    original_model: nn.Module | None = None,
    plan: Any = None,
    original_sizes: list[LayerSize] | None = None,
    unused: frozenset[str] | set[str] = frozenset(),
) -> list[LayerSize]:
    """Prove that the compressed ONNX file holds exactly the compressed model, that the model
    has the widths ``plan`` gives, and that every layer the plan shrinks (and the file as a
    whole) is smaller than in the original; SizeError naming the first layer that is not.
    ``original_sizes``: :func:`onnx_layer_sizes` of the original file, if already taken;
    ``unused``: names of parameters forward does not use (:func:`unused_params`)."""
    sizes = onnx_layer_sizes(onnx_path, model, unused=unused)
    edited = _check_plan(model, plan) if plan is not None else set()
    before = {}
    if original_model is not None:
        if original_onnx is not None:
            if original_sizes is None:
                original_sizes = onnx_layer_sizes(original_onnx, original_model, unused=unused)
            before = {s.name: s for s in original_sizes}
        else:
            before = {
                n: LayerSize(
                    n, type(m).__name__, sum(p.numel() for _, p in _own_params(n, m)), 0, MATCH
                )
                for n, m in original_model.named_modules()
            }
    for s in sizes:
        if s.name in before:
            s.params_before = before[s.name].params
            s.onnx_params_before = before[s.name].onnx_params if original_onnx is not None else None
    if not before:
        return sizes
    shrunk = edited or {
        s.name for s in sizes if s.params_before is not None and s.params < s.params_before
    }
    for s in sizes:
        if s.name not in shrunk or s.params_before is None:
            continue
        if s.params >= s.params_before:
            raise SizeError(
                f"module '{s.name}' ({s.kind}) should have shrunk but has {s.params:,} parameters, "
                f"the original {s.params_before:,}"
            )
        # the module's own elements: a bias created by folding may be in one file only (the
        # exporter drops an all-zero one, as folding an untrained BatchNorm gives)
        own_before = (s.onnx_params_before or 0) - before[s.name].folded_in + before[s.name].dropped
        if s.onnx_params_before and s.onnx_params - s.folded_in + s.dropped >= own_before:
            raise SizeError(
                f"module '{s.name}' ({s.kind}) did not shrink in ONNX: {s.onnx_params:,} elements "
                f"vs {s.onnx_params_before:,} in the original file"
            )
    if shrunk and original_onnx is not None:
        before_names = _float_names(original_onnx)
        # a model tensor the original file lacks was folded away there at its default value
        # (a fresh LayerNorm's ones, a BatchNorm's unused statistics): fine-tuning made it
        # real, so it is not surplus of the compressed file
        made_real = set(model.state_dict()) - set(before_names)
        after_total = sum(n for name, n in _float_names(onnx_path).items() if name not in made_real)
        # the exporter stores equal tensors once: layers deep-copied at construction share
        # the original's initializers, fine-tuned apart they no longer do
        before_total = sum(before_names.values()) + _duplicates(original_model)
        if after_total >= before_total:
            raise SizeError(
                f"{Path(onnx_path).name} holds {after_total:,} weights, not fewer than the "
                f"original's {before_total:,}"
            )
    return sizes


def unused_params(model: nn.Module, inputs: tuple[Any, ...]) -> frozenset[str]:
    """Names of the floating-point parameters ``model``'s forward on ``inputs`` does not use
    (a spare head, a parameter kept for checkpoints): the exporter leaves them out of the
    file. Found from the autograd graph of one forward; frozen parameters are unfrozen for it."""
    params = {id(p): n for n, p in model.named_parameters() if p.is_floating_point()}
    frozen = [p for p in model.parameters() if p.is_floating_point() and not p.requires_grad]
    used: set[int] = set()
    try:
        for p in frozen:
            p.requires_grad_(True)
        with torch.enable_grad():
            outputs = model(*inputs)
        stack = [t.grad_fn for t in pytree.tree_leaves(outputs)
                 if isinstance(t, torch.Tensor) and t.grad_fn is not None]
        seen: set[int] = set()
        while stack:
            fn = stack.pop()
            if id(fn) in seen:
                continue
            seen.add(id(fn))
            variable = getattr(fn, "variable", None)
            if variable is not None:
                used.add(id(variable))
            stack.extend(f for f, _ in fn.next_functions if f is not None)
    finally:
        for p in frozen:
            p.requires_grad_(False)
    return frozenset(n for i, n in params.items() if i not in used)


# ---------------------------------------------------------------------- helpers
def _computed_from(own: dict[str, Any], by_name: set[str], shapes: dict[str, list[int]],
                   unowned: Counter, unused: frozenset[str] | set[str]) -> bool:
    """Whether a module holding ``by_name`` by name has them at their own sizes and the
    parameters it uses but lacks by name were computed into other tensors: ones the module's
    own nodes consume, or else a tensor of each one's size that no module holds (computed
    from it elementwise: scaled, negated; each such tensor taken once)."""
    if not all(shapes[n] == list(own[n].shape) for n in by_name):
        return False
    lacking = [p for n, p in own.items() if n not in by_name and n not in unused]
    if set(shapes) - by_name:
        return True
    left = Counter(unowned)
    for param in lacking:
        if left[param.numel()] == 0:
            return False
        left[param.numel()] -= 1
    return True


def _held_once(own: dict[str, Any], found: dict[str, str], shapes: dict[str, list[int]]) -> bool:
    """Whether every parameter of a module is held, some of them by one initializer the
    exporter kept for several equal ones, and the module holds nothing else."""
    holders = [found.get(name) for name in own]
    return None not in holders and set(holders) == set(shapes) and len(shapes) < len(holders)


def _zero(param: Any) -> bool:
    return param.numel() > 0 and not bool(param.detach().any())


def _own_params(module_name: str, module: nn.Module) -> list[tuple[str, Any]]:
    prefix = f"{module_name}." if module_name else ""
    return [(prefix + n, p) for n, p in module.named_parameters(recurse=False)]


def _check_plan(model: nn.Module, plan: Any) -> set[str]:
    edited = set()
    for edit in plan.edits:
        try:
            module = model.get_submodule(edit.module)
        except AttributeError:
            raise SizeError(
                f"the plan edits module '{edit.module}', which the model lacks"
            ) from None
        value = getattr(module, edit.attr, None)
        if value != edit.width:
            raise SizeError(
                f"module '{edit.module}' ({type(module).__name__}): the plan sets "
                f"{edit.attr}={edit.width}, the model has {edit.attr}={value}"
            )
        edited.add(edit.module)
    return edited


def _consumer_scopes(proto: Any) -> dict[str, list[str]]:
    """Module scopes (``a.b.c``) of the nodes consuming each value, in graph order."""
    scopes: dict[str, list[str]] = {}
    for node in proto.graph.node:
        scope = _node_scope(node)
        if scope is None:
            continue
        for name in node.input:
            scopes.setdefault(name, []).append(scope)
    return scopes


def _related(scope: str, module_name: str) -> bool:
    """Whether a node scope lies in the module, or the module in the scope (a parent's node)."""
    return _within(scope, module_name) or _within(module_name, scope)


def _within(inner: str, outer: str) -> bool:
    return not outer or inner == outer or inner.startswith(outer + ".")


def _used_by(scopes: list[str] | None, module_name: str) -> bool:
    """Whether an initializer may hold a parameter of the module: some node of the module (or
    of a parent) consumes it, or no consumer tells its scope."""
    return not scopes or any(_related(scope, module_name) for scope in scopes)


def _fold_products(
    proto: Any, arrays: dict[str, np.ndarray], owner: dict[str, set[str]], buffers: set[str]
) -> dict[str, str]:
    """Initializers created by folding one module into another: unclaimed float tensors fed to
    a node together with initializers of exactly one module, where the node carries the scope
    of an unrelated module (the one folded away), mapped to the module the node computes."""
    products: dict[str, str] = {}
    for node in proto.graph.node:
        scope = _node_scope(node)
        if scope is None:
            continue
        modules = {m for name in node.input for m in owner.get(name, ())}
        if len(modules) != 1:
            continue
        (module_name,) = modules
        if _related(scope, module_name):
            continue
        for name in node.input:
            if (
                name in arrays
                and name not in owner
                and name not in buffers
                and arrays[name].size >= 2
            ):
                products.setdefault(name, module_name)
    return products


def _surplus(
    own: dict[str, Any],
    found: set[str],
    shapes: dict[str, list[int]],
    held: set[str],
    products: dict[str, str],
) -> tuple[int, int] | None:
    """Elements a module holds in ONNX beyond its own parameters, split into fold-pass and
    scope-pass tensors, when every parameter is held at its own size and the rest have no
    PyTorch counterpart; None when the counts cannot be explained so."""
    numel = {n: int(np.prod(s)) for n, s in shapes.items()}
    if sum(numel[n] for n in held if n in numel) != sum(
        p.numel() for name, p in own.items() if name in found
    ):
        return None  # a named or value-matched tensor of the wrong size: a real mismatch
    need = Counter(p.numel() for name, p in own.items() if name not in found)
    by_fold = by_scope = 0
    # tensors found by scope may hold parameters (TorchScript renames folded weights)
    for name in sorted(n for n in numel if n not in held):
        if name not in products and need[numel[name]] > 0:
            need[numel[name]] -= 1
        elif name in products:
            by_fold += numel[name]
        else:
            by_scope += numel[name]
    if +need or not by_fold + by_scope:
        return None
    return by_fold, by_scope


def _node_scope(node: Any) -> str | None:
    for prop in node.metadata_props:
        if prop.key == _SCOPES:
            try:
                scopes = ast.literal_eval(prop.value)
            except (ValueError, SyntaxError):
                return None
            return str(scopes[-2]) if isinstance(scopes, list) and len(scopes) >= 2 else ""
    if node.name.startswith("/"):
        return ".".join(node.name.strip("/").split("/")[:-1])
    return None


def _enclosing(scope: str, modules: set[str]) -> str | None:
    """The module of ``modules`` a node scope lies in: the scope or its nearest parent, else
    the one module whose name ends with the scope (TorchScript names a member of a
    ModuleDict or ModuleList by its key alone: ``fc`` for ``m.fc``)."""
    path = scope
    while True:
        if path in modules:
            return path
        if not path:
            break
        path = path.rpartition(".")[0]
    if not scope:
        return None
    ends = [m for m in modules if m.endswith("." + scope)]
    return ends[0] if len(ends) == 1 else None


def _distinct_elements(shapes: dict[str, list[int]], arrays: dict[str, np.ndarray]) -> int:
    """Elements of the initializers ``shapes`` names, each distinct content counted once."""
    seen: set[tuple[tuple[int, ...], str, bytes]] = set()
    total = 0
    for iname in shapes:
        array = np.ascontiguousarray(arrays[iname])
        key = (array.shape, array.dtype.str, hashlib.sha1(array.tobytes()).digest())
        if key not in seen:
            seen.add(key)
            total += array.size
    return total


def _duplicates(model: nn.Module | None) -> int:
    """Elements of ``model``'s floating tensors equal in value to an earlier one."""
    if model is None:
        return 0
    seen: dict[tuple[Any, ...], list[torch.Tensor]] = {}
    extra = 0
    for tensor in model.state_dict().values():
        if not tensor.is_floating_point() or tensor.numel() < 2:
            continue
        key = (tuple(tensor.shape), tensor.dtype, float(tensor.double().sum()))
        same = seen.setdefault(key, [])
        if any(torch.equal(tensor, other) for other in same):
            extra += tensor.numel()
        else:
            same.append(tensor)
    return extra


def _float_names(path: str | os.PathLike[str]) -> dict[str, int]:
    """Elements of each float initializer of an ONNX file, by name."""
    import onnx

    return {
        init.name: int(np.prod(init.dims)) if init.dims else 1
        for init in onnx.load(str(path), load_external_data=False).graph.initializer
        if init.data_type in _FLOAT_TYPES
    }


def _raise_mismatches(file: str, sizes: list[LayerSize]) -> None:
    bad = [s for s in sizes if s.status == MISMATCH]
    if bad:
        text = "; ".join(
            f"'{s.name}' ({s.kind}) {s.params:,} in PyTorch vs {s.onnx_params:,} in ONNX"
            for s in bad[:3]
        )
        more = f" (+{len(bad) - 3} more)" if len(bad) > 3 else ""
        raise SizeError(f"{file} does not hold the model's layers: {text}{more}")


__all__ = [
    "LayerSize", "check_shrunk", "onnx_layer_sizes", "MATCH", "FOLDED", "COMPUTED", "MISMATCH"
]
