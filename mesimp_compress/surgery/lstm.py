"""nn.LSTM hidden units: the four gate rows of W_ih, W_hh and both biases, the W_hh column,
and the next layer's input columns (both directions' halves when bidirectional).

Roles: ``"in"`` (input features of layer 0) and ``hidden:l{layer}[_reverse]`` (one per layer
and direction). nn.LSTM has one ``hidden_size``, so hidden roles are edited all together and
keep equal counts, each with its own index set.
"""

from __future__ import annotations

import torch
from torch import nn

from ..errors import PlanError
from ..graph import ROLE_IN, hidden_role, parse_hidden_role
from .functions import ModulePruner, Slice, fold_inputs, register_pruner

GATES = 4  # input, forget, cell, output: rows [g*H, (g+1)*H) of W_ih, W_hh, b_ih, b_hh


def _suffixes(module: nn.LSTM) -> list[str]:
    return ["", "_reverse"] if module.bidirectional else [""]


@register_pruner
class LSTMPruner(ModulePruner):
    """nn.LSTM (proj_size=0): hidden units per layer/direction, and layer-0 input features."""

    kinds = (nn.LSTM,)

    def expected_parameters(self, module):
        return set(module._flat_weights_names)

    def problem(self, module):
        if module.proj_size > 0:
            return "nn.LSTM with proj_size > 0 is not supported"
        return super().problem(module)

    def sizes(self, module):
        sizes = {ROLE_IN: module.input_size}
        for layer in range(module.num_layers):
            for d in range(len(_suffixes(module))):
                sizes[hidden_role(layer, bool(d))] = module.hidden_size
        return sizes

    def _units(self, module, kept) -> dict[tuple[int, int], torch.Tensor] | None:
        dirs = len(_suffixes(module))
        roles = {
            (layer, d): hidden_role(layer, bool(d))
            for layer in range(module.num_layers)
            for d in range(dirs)
        }
        given = {k: kept[r] for k, r in roles.items() if r in kept}
        if not given:
            return None
        if len(given) != len(roles):
            missing = sorted(r for k, r in roles.items() if k not in given)
            raise PlanError(
                f"nn.LSTM hidden units must be edited for every layer and direction together; "
                f"missing {missing}"
            )
        counts = {len(v) for v in given.values()}
        if len(counts) != 1:
            raise PlanError(
                f"nn.LSTM keeps one hidden_size; the plan keeps counts {sorted(counts)}"
            )
        return given

    def slices(self, module, kept):
        H = module.hidden_size
        units = self._units(module, kept)
        out = []
        for layer in range(module.num_layers):
            for d, sfx in enumerate(_suffixes(module)):
                name = f"l{layer}{sfx}"
                if units is not None:
                    u = units[(layer, d)]
                    rows = torch.cat([g * H + u for g in range(GATES)])
                    out += [
                        Slice(f"weight_ih_{name}", 0, rows),
                        Slice(f"weight_hh_{name}", 0, rows),
                        Slice(f"weight_hh_{name}", 1, u),
                    ]
                    if module.bias:
                        out += [
                            Slice(f"bias_ih_{name}", 0, rows),
                            Slice(f"bias_hh_{name}", 0, rows),
                        ]
                if layer == 0 and ROLE_IN in kept:
                    out.append(Slice(f"weight_ih_{name}", 1, kept[ROLE_IN]))
                elif layer > 0 and units is not None:
                    below = [
                        units[(layer - 1, dd)] + dd * H for dd in range(len(_suffixes(module)))
                    ]
                    out.append(Slice(f"weight_ih_{name}", 1, torch.cat(below)))
        return out

    def reads(self, module, role, removed):
        if role == ROLE_IN:
            return [Slice(f"weight_ih_l0{sfx}", 1, removed) for sfx in _suffixes(module)]
        layer, reverse = parse_hidden_role(role)
        sfx = "_reverse" if reverse else ""
        out = [Slice(f"weight_hh_l{layer}{sfx}", 1, removed)]
        if layer + 1 < module.num_layers:
            shift = module.hidden_size if reverse else 0
            out += [
                Slice(f"weight_ih_l{layer + 1}{s}", 1, removed + shift) for s in _suffixes(module)
            ]
        return out

    def fold(self, module, role, sub):
        if role != ROLE_IN:
            return (
                "the recurrent and inter-layer inputs of removed LSTM units are not "
                "compensated (their means are not observable outside nn.LSTM)"
            )
        if not module.bias:
            return "it has no bias to fold the removed inputs into"
        deltas: dict[str, torch.Tensor] = {}
        for sfx in _suffixes(module):
            weight = getattr(module, f"weight_ih_l0{sfx}")
            deltas |= fold_inputs(weight, f"bias_ih_l0{sfx}", f"weight_ih_l0{sfx}", sub)
        return deltas

    def resize(self, module, kept):
        units = self._units(module, kept)
        if units is not None:
            module.hidden_size = len(next(iter(units.values())))
        if ROLE_IN in kept:
            module.input_size = len(kept[ROLE_IN])
        if any(p.is_cuda for p in module.parameters()):
            module.flatten_parameters()
