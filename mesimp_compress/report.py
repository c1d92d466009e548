"""``report.json``: everything a compression run proved, as plain JSON data.

Schema (version 1); a key whose value is unknown holds ``null``::

    format, version      "mesimp-report", 1
    status               "ok" or "failed" (with "error": one line)
    created              UTC time, ISO 8601
    config               the settings used (CompressConfig fields, or any mapping)
    layers               one row per module with parameters of its own:
                         name, kind, width_before, width_after (output units: Linear
                         out_features, Conv out_channels, LSTM hidden_size, ...),
                         params_before, params_after (PyTorch), onnx_params_before,
                         onnx_params_after, size_status ("match"/"folded"/"computed",
                         see sizes.py) and folded_in (ONNX elements a folded neighbour
                         added to the layer)
    widths               per prunable layer key: {"before": n, "after": m} (equal if not cut)
    params               {"before", "after", "ratio"}: parameter totals of the two models
    metrics              {"name", "torch_before", "torch_after", "ort_before", "ort_after",
                          "int8"}: the task metric of each model (PyTorch and onnxruntime)
    parity               per output name: original_max_abs, original_max_rel,
                         compressed_max_abs, compressed_max_rel (and int8_... with quantize)
    parity_checks        per checked model: label, atol, rtol, batches, passed, outputs[]
    latency              models, baseline, settings, rows[]: per (threads, batch): batch,
                         seq, threads, {model}_median_ms, {model}_p10_ms, {model}_p90_ms,
                         speedup (compressed over original) with speedup_low/high
                         (p10..p90 of per-round ratios), {model}_speedup..., and
                         compressed_vs_reference (median compressed / median reference)
    export               per model: path, exporter, opset, input_names, output_names,
                         dynamic_axes, initializers, initializer_elements, file_bytes,
                         fallback_reason
    skipped              layers left alone, with the reason
    notes                what surgery could not do (a consumer without a bias to compensate
                         into, a config field that cannot hold per-layer widths), each once
    versions             python, torch, onnx, onnxruntime, onnxscript, numpy, mesimp_compress
    machine              platform, cpu, cpu_count, torch_threads, bench_threads
    extra                anything else the caller adds
    metric_before,       {"torch", "onnxruntime"}: the metric of the original and of the
    metric_after         compressed model (the same numbers as in metrics, by model)
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import json
import math
import os
import platform
from collections.abc import Mapping, Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .outputs import write_synced

REPORT_FORMAT = "mesimp-report"
REPORT_VERSION = 1


def build_report(
    *,
    config: Any = None,
    layers: Sequence[Mapping[str, Any]] = (),
    plan: Any = None,
    widths: Mapping[str, int] | None = None,
    params: tuple[int, int] | None = None,
    metrics: Mapping[str, Any] | None = None,
    parity: Mapping[str, Any] | None = None,
    latency: Any = None,
    export: Mapping[str, Any] | None = None,
    skipped: Sequence[Mapping[str, Any]] = (),
    notes: Sequence[str] = (),
    bench_threads: Sequence[int] = (),
    status: str = "ok",
    error: str | None = None,
    extra: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The report as a plain dict (see the module docstring for the schema). ``parity`` maps
    a model label ("original", "compressed", "int8") to its ParityResult (or its dict);
    ``latency`` is a LatencyResult or its dict; ``export`` maps labels to ExportResults.
    ``params`` gives the totals (before, after) of the two models' unique parameters; else
    they are the sum of the layer rows (which count a shared parameter in each owner)."""
    rows = [dict(r) for r in layers]
    before = sum(r.get("params_before") or 0 for r in rows)
    after = sum(r.get("params_after") or 0 for r in rows)
    if params is not None:
        before, after = params
    report: dict[str, Any] = {
        "format": REPORT_FORMAT,
        "version": REPORT_VERSION,
        "status": status,
        "error": error,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "config": _plain(config) if config is not None else {},
        "layers": rows,
        "widths": _plan_widths(plan, widths),
        "params": {"before": before, "after": after, "ratio": before / after if after else None},
        "metrics": {
            "name": None,
            "torch_before": None,
            "torch_after": None,
            "ort_before": None,
            "ort_after": None,
            "int8": None,
            **dict(metrics or {}),
        },
        "parity": _parity_by_output(parity or {}),
        "parity_checks": {k: _plain(v) for k, v in (parity or {}).items()},
        "latency": _latency(latency),
        "export": {k: _plain(v) for k, v in (export or {}).items()},
        "skipped": [dict(s) for s in skipped],
        "notes": [str(n) for n in notes],
        "versions": versions(),
        "machine": machine(bench_threads),
        "extra": _plain(extra) if extra else {},
    }
    return report


def layer_rows(
    original: nn.Module, compressed: nn.Module, sizes: Sequence[Any] | None = None
) -> list[dict[str, Any]]:
    """One row per module with parameters of its own: widths and parameter counts before and
    after, plus the ONNX counts of ``sizes`` (LayerSize rows from the size check) if given."""
    before = dict(original.named_modules())
    by_name = {s.name: s for s in sizes or ()}
    rows = []
    for name, module in compressed.named_modules():
        own = sum(p.numel() for p in module.parameters(recurse=False))
        if own == 0:
            continue
        old = before.get(name)
        size = by_name.get(name)
        rows.append(
            {
                "name": name,
                "kind": type(module).__name__,
                "width_before": unit_width(old) if old is not None else None,
                "width_after": unit_width(module),
                "params_before": sum(p.numel() for p in old.parameters(recurse=False))
                if old is not None
                else None,
                "params_after": own,
                "onnx_params_before": getattr(size, "onnx_params_before", None),
                "onnx_params_after": getattr(size, "onnx_params", None),
                "size_status": getattr(size, "status", None),
                "folded_in": getattr(size, "folded_in", None),
            }
        )
    return rows


def unit_width(module: nn.Module) -> int | None:
    """How many output units a module has (None for kinds without one)."""
    for attr in (
        "out_features",
        "out_channels",
        "nf",  # Hugging Face's Conv1D
        "hidden_size",
        "num_features",
        "embedding_dim",
        "embed_dim",
    ):
        value = getattr(module, attr, None)
        if isinstance(value, int):
            return value
    shape = getattr(module, "normalized_shape", None)
    if isinstance(shape, (tuple, list)) and shape:
        return int(shape[-1])
    return None


def write_report(report: Mapping[str, Any], path: str | os.PathLike[str]) -> Path:
    """Write ``report`` as indented JSON, atomically (a temporary file renamed into place)."""
    text = json.dumps(_plain(report), indent=2, allow_nan=False) + "\n"
    return write_synced(path, lambda handle: handle.write(text.encode("utf-8")))


def read_report(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read a report written by :func:`write_report`."""
    return json.loads(Path(path).read_text(encoding="utf-8"))


def versions() -> dict[str, str | None]:
    """Versions of Python and of the packages the proof depends on."""
    out: dict[str, str | None] = {"python": platform.python_version()}
    for name in ("torch", "onnx", "onnxruntime", "onnxscript", "numpy", "mesimp-compress"):
        try:
            out[name.replace("-", "_")] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name.replace("-", "_")] = None
    out["torch"] = torch.__version__
    return out


def machine(bench_threads: Sequence[int] = ()) -> dict[str, Any]:
    """The CPU (model name), core count and thread counts used."""
    return {
        "platform": platform.platform(),
        "cpu": _cpu_name(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "bench_threads": [int(t) for t in bench_threads],
    }


# ---------------------------------------------------------------------- helpers
def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            for line in handle:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _plan_widths(plan: Any, widths: Mapping[str, int] | None) -> dict[str, dict[str, int]]:
    """Before/after per layer key of the plan, and per prunable layer it left whole."""
    rows = {key: {"before": int(w), "after": int(w)} for key, w in (widths or {}).items()}
    if plan is not None:
        new = plan.new_widths()
        rows.update(
            {key: {"before": int(plan.widths[key]), "after": int(new[key])} for key in new}
        )
    return rows


def _parity_by_output(parity: Mapping[str, Any]) -> dict[str, dict[str, float]]:
    out: dict[str, dict[str, float]] = {}
    for label, result in parity.items():
        data = _plain(result)
        for o in data.get("outputs", []):
            entry = out.setdefault(o["name"], {})
            entry[f"{label}_max_abs"] = o["max_abs"]
            entry[f"{label}_max_rel"] = o["max_rel"]
    return out


def _latency(latency: Any) -> dict[str, Any]:
    if latency is None:
        return {}
    data = latency.to_dict() if hasattr(latency, "to_dict") else _plain(latency)
    for row in data.get("rows", []):
        c, r = row.get("compressed_median_ms"), row.get("reference_median_ms")
        if c is not None and r:
            row["compressed_vs_reference"] = c / r
    return data


def _plain(value: Any) -> Any:
    """JSON-ready copy: dataclasses, paths, tensors, numpy scalars and non-finite floats."""
    if hasattr(value, "to_dict") and callable(value.to_dict):
        return _plain(value.to_dict())
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return _plain(dataclasses.asdict(value))
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set)):
        return [_plain(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, (torch.Tensor, np.ndarray)):
        return _plain(value.tolist())
    if isinstance(value, np.generic):
        return _plain(value.item())
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    return str(value)


__all__ = [
    "REPORT_FORMAT",
    "REPORT_VERSION",
    "build_report",
    "layer_rows",
    "machine",
    "read_report",
    "unit_width",
    "versions",
    "write_report",
]
