"""Keep a Hugging Face config's FFN width in step with the layers a plan shrank.

A transformers config holds one FFN width for every layer, under a name of the model
family's choosing. After a plan, each such field is set to the new width when every layer
it sizes has that width; otherwise it keeps its value and a note says why. Layers the plan
shrank that no field sizes (BERT's pooler, DistilBERT's pre-classifier) get a note too:
``from_pretrained`` cannot rebuild them, ``load_compressed`` (plan.json + weights) can.
"""

from __future__ import annotations

import fnmatch
import re
from typing import Any

from torch import nn

from ..hfconv1d import is_conv1d
from ..hfconv1d import widths as conv1d_widths
from ..plan import Plan

# config fields holding the one FFN width of a model family (BERT/RoBERTa/ViT/Llama...,
# DistilBERT, T5, OPT and BART-like encoder/decoder pairs, GPT-2-like)
FIELDS = ("intermediate_size", "hidden_dim", "d_ff", "ffn_dim", "encoder_ffn_dim",
          "decoder_ffn_dim", "n_inner")
# name parts of the layers such a field sizes: an FFN's first (or gate) projection
_FFN_PARTS = re.compile(
    r"(^|\.)(intermediate|mlp|ffn|feed_forward|feedforward|DenseReluDense|fc1|fc_in|lin1|wi"
    r"|wi_0|wi_1|w1|w3|gate_proj|up_proj|dense_h_to_4h|c_fc)(\.|$)"
)


def update_configs(model: nn.Module, plan: Plan) -> list[str]:
    """Update the FFN width fields of every HF config in ``model`` after ``plan``; return
    notes on what a config cannot represent."""
    configs = _configs(model)
    if not configs:
        return []
    widths = {name: m.out_features if isinstance(m, nn.Linear) else conv1d_widths(m)[1]
              for name, m in model.named_modules() if isinstance(m, nn.Linear) or is_conv1d(m)}
    shrunk = [e for e in plan.edits if e.role == "out" and e.width != e.size]
    sized: set[str] = set()
    notes: list[str] = []
    for config, prefixes in configs:
        mine = [e for e in shrunk if any(_within(e.module, p) for p in prefixes)]
        for name in FIELDS:
            value = _width(config, name)
            if value is None:
                continue
            edits = [e for e in mine if e.size == value and _sizes(name, e.module)]
            if not edits:
                continue
            sized.update(e.module for e in edits)
            patterns = sorted({re.sub(r"\.\d+\.", ".*.", e.module) for e in edits})
            now = sorted({w for n, w in widths.items()
                          if any(fnmatch.fnmatchcase(n, p) for p in patterns)})
            if len(now) == 1:
                setattr(config, name, now[0])
            else:
                notes.append(
                    f"config.{name} cannot represent per-layer widths of "
                    f"{', '.join(repr(p) for p in patterns)} ({now[0]}..{now[-1]}); it stays "
                    f"{value}: reload with load_compressed, not from_pretrained"
                )
        for edit in mine:
            if edit.module not in sized:
                notes.append(
                    f"the config has no field for the width of '{edit.module}' ({edit.size} -> "
                    f"{edit.width}): reload with load_compressed, not from_pretrained"
                )
                sized.add(edit.module)
    return notes


def config_values(model: nn.Module) -> dict[tuple[str, ...], dict[str, Any]]:
    """The FFN width fields of every HF config in ``model``, by the modules holding it: what
    :func:`restore_values` puts back (a run prunes in steps, each from the original)."""
    return {tuple(prefixes): {f: getattr(config, f) for f in FIELDS if hasattr(config, f)}
            for config, prefixes in _configs(model)}


def restore_values(model: nn.Module, values: dict[tuple[str, ...], dict[str, Any]]) -> None:
    """Set the fields :func:`config_values` read back on the configs of ``model`` (a copy of
    the model holds copies of its configs, found by the same module names)."""
    for config, prefixes in _configs(model):
        for field, value in values.get(tuple(prefixes), {}).items():
            setattr(config, field, value)


def _width(config: Any, field: str) -> int | None:
    """The FFN width ``field`` of ``config`` holds (GPT-2's n_inner=None: 4 x n_embd)."""
    value = getattr(config, field, None)
    if field == "n_inner" and value is None:
        embd = getattr(config, "n_embd", None)
        value = 4 * embd if isinstance(embd, int) and not isinstance(embd, bool) else None
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _configs(model: nn.Module) -> list[tuple[Any, list[str]]]:
    """Each HF config in ``model`` (an object with a ``model_type`` or an FFN width field,
    found as a module's ``config``) with the names of the modules holding it."""
    found: dict[int, tuple[Any, list[str]]] = {}
    for name, module in model.named_modules():
        config = getattr(module, "config", None)
        if config is None or not (
            hasattr(config, "model_type") or any(_width(config, f) is not None for f in FIELDS)
        ):
            continue
        entry = found.setdefault(id(config), (config, []))
        if not any(_within(name, p) for p in entry[1]):
            entry[1].append(name)
    return list(found.values())


def _sizes(field: str, module: str) -> bool:
    """Whether config field ``field`` sizes the outputs of the Linear named ``module``."""
    if field == "encoder_ffn_dim" and "decoder" in module:
        return False
    if field == "decoder_ffn_dim" and "decoder" not in module:
        return False
    return _FFN_PARTS.search(module) is not None


def _within(name: str, prefix: str) -> bool:
    return not prefix or name == prefix or name.startswith(prefix + ".")
