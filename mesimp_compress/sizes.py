"""Per-layer parameter counts of an ONNX file, and the proof that a compressed file shrank.

Exporters rename, transpose, fuse and repack parameters, so ONNX initializers are attributed
to the PyTorch modules they came from in three passes:

1. **name**: an initializer named like a parameter (``layers.0.weight``) belongs to its
   module (one named like a buffer, e.g. ``running_mean``, is a buffer and counts nowhere);
2. **value**: an initializer holding the same values as a parameter, in any order, belongs
   to the parameter's module (a weight stored transposed for MatMul; a weight the exporter
   de-duplicated with an equal one, which then counts for both);
3. **scope**: any other float initializer (two or more elements) belongs to the module
   whose graph nodes consume it, read from the dynamo exporter's ``name_scopes`` metadata
   or the TorchScript exporter's node names (``/encoder/layer.0/.../MatMul``): the
   ``W``/``R``/``B`` tensors of an ONNX LSTM, a Conv weight with BatchNorm folded in.

A module's count in ONNX must then equal its count in PyTorch (``"match"``), or be 0 when its
parameters were folded into a neighbour or are unused (``"folded"``); anything else is a
``"mismatch"`` and a :class:`SizeError`. The compressed PyTorch model is the truth.
"""

from __future__ import annotations

import ast
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from torch import nn

from .errors import SizeError

MATCH, FOLDED, MISMATCH = "match", "folded", "mismatch"
_FLOAT_TYPES = {1, 10, 11, 16}  # FLOAT, FLOAT16, DOUBLE, BFLOAT16


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

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready fields."""
        return asdict(self)


def onnx_layer_sizes(
    onnx_path: str | os.PathLike[str], model: nn.Module, *, strict: bool = True
) -> list[LayerSize]:
    """Parameter elements per module (modules with parameters of their own) in PyTorch and in
    the ONNX file; with ``strict``, SizeError when a module's counts disagree."""
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
    owner: dict[str, set[str]] = {}  # initializer -> modules it counts for
    found: set[str] = set()  # parameters accounted for

    for name in arrays:  # 1. by name
        if name in params:
            owner.setdefault(name, set()).add(params[name][0])
            found.add(name)
    free = [n for n in arrays if n not in owner and n not in buffers]
    sorted_cache: dict[str, np.ndarray] = {}
    for pname, (module_name, param) in params.items():  # 2. by value
        if pname in found:
            continue
        values = np.sort(param.detach().cpu().float().numpy(), axis=None)
        # unclaimed initializers first, then claimed ones (an exporter may share equal tensors)
        for iname in [n for n in free if n not in owner] + list(owner):
            array = arrays[iname]
            if array.size != values.size:
                continue
            if iname not in sorted_cache:
                sorted_cache[iname] = np.sort(array.astype(np.float32), axis=None)
            if np.array_equal(sorted_cache[iname], values):
                owner.setdefault(iname, set()).add(module_name)
                found.add(pname)
                break
    waiting = {params[p][0] for p in params if p not in found}
    if waiting:  # 3. by the scope of the consuming nodes
        for iname, scope in _consumer_scopes(proto).items():
            if iname in owner or iname in buffers or iname not in arrays or arrays[iname].size < 2:
                continue
            module_name = _enclosing(scope, waiting)
            if module_name is not None:
                owner.setdefault(iname, set()).add(module_name)

    per_module: dict[str, dict[str, list[int]]] = {}
    for iname, modules in owner.items():
        for m in modules:
            per_module.setdefault(m, {})[iname] = list(arrays[iname].shape)
    sizes = []
    for module_name, module in model.named_modules():
        own = dict(_own_params(module_name, module))
        if not own:
            continue
        count = sum(p.numel() for p in own.values())
        shapes = per_module.get(module_name, {})
        in_onnx = sum(int(np.prod(s)) for s in shapes.values())
        status = MATCH if in_onnx == count else FOLDED if in_onnx == 0 else MISMATCH
        sizes.append(
            LayerSize(
                name=module_name,
                kind=type(module).__name__,
                params=count,
                onnx_params=in_onnx,
                status=status,
                shapes={n.rsplit(".", 1)[-1]: list(p.shape) for n, p in own.items()},
                onnx_shapes=shapes,
            )
        )
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
) -> list[LayerSize]:
    """Prove that the compressed ONNX file holds exactly the compressed model, that the model
    has the widths ``plan`` gives, and that every layer the plan shrinks (and the file as a
    whole) is smaller than in the original; SizeError naming the first layer that is not."""
    sizes = onnx_layer_sizes(onnx_path, model)
    edited = _check_plan(model, plan) if plan is not None else set()
    before = {}
    if original_model is not None:
        if original_onnx is not None:
            before = {s.name: s for s in onnx_layer_sizes(original_onnx, original_model)}
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
        if s.onnx_params_before and s.onnx_params >= s.onnx_params_before:
            raise SizeError(
                f"module '{s.name}' ({s.kind}) did not shrink in ONNX: {s.onnx_params:,} elements "
                f"vs {s.onnx_params_before:,} in the original file"
            )
    if shrunk and original_onnx is not None:
        after_total, before_total = _float_elements(onnx_path), _float_elements(original_onnx)
        if after_total >= before_total:
            raise SizeError(
                f"{Path(onnx_path).name} holds {after_total:,} weights, not fewer than the "
                f"original's {before_total:,}"
            )
    return sizes


# ---------------------------------------------------------------------- helpers
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


def _consumer_scopes(proto: Any) -> dict[str, str]:
    """Module scope (``a.b.c``) of the first node consuming each value."""
    scopes: dict[str, str] = {}
    for node in proto.graph.node:
        scope = _node_scope(node)
        if scope is None:
            continue
        for name in node.input:
            scopes.setdefault(name, scope)
    return scopes


def _node_scope(node: Any) -> str | None:
    for prop in node.metadata_props:
        if prop.key == "pkg.torch.onnx.name_scopes":
            try:
                scopes = ast.literal_eval(prop.value)
            except (ValueError, SyntaxError):
                return None
            return str(scopes[-2]) if isinstance(scopes, list) and len(scopes) >= 2 else ""
    if node.name.startswith("/"):
        return ".".join(node.name.strip("/").split("/")[:-1])
    return None


def _enclosing(scope: str, modules: set[str]) -> str | None:
    while True:
        if scope in modules:
            return scope
        if not scope:
            return None
        scope = scope.rpartition(".")[0]


def _float_elements(path: str | os.PathLike[str]) -> int:
    import onnx

    total = 0
    for init in onnx.load(str(path), load_external_data=False).graph.initializer:
        if init.data_type in _FLOAT_TYPES:
            total += int(np.prod(init.dims)) if init.dims else 1
    return total


def _raise_mismatches(file: str, sizes: list[LayerSize]) -> None:
    bad = [s for s in sizes if s.status == MISMATCH]
    if bad:
        text = "; ".join(
            f"'{s.name}' ({s.kind}) {s.params:,} in PyTorch vs {s.onnx_params:,} in ONNX"
            for s in bad[:3]
        )
        more = f" (+{len(bad) - 3} more)" if len(bad) > 3 else ""
        raise SizeError(f"{file} does not hold the model's layers: {text}{more}")


__all__ = ["LayerSize", "check_shrunk", "onnx_layer_sizes", "MATCH", "FOLDED", "MISMATCH"]
