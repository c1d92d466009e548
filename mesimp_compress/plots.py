"""PNG plots of a report: widths per layer, hit histograms per layer key, latency by batch.

matplotlib is an optional dependency (the ``plots`` extra): it is imported only when a plot
is drawn, and only its Agg canvas is used (no pyplot, no display, no global state).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .errors import ConfigError, DataError
from .outputs import staged_file

WIDTHS_PNG = "widths.png"
HITS_PNG = "hits.png"
LATENCY_PNG = "latency.png"
MAX_PANELS = 24  # hit histograms drawn (a deep model has hundreds of layers; ~75 ms each)
MAX_WIDTH_INCHES = 40.0  # the widths chart stops growing with the layer count here


def plot_widths(layers: Sequence[Mapping[str, Any]], path: str | os.PathLike[str]) -> Path:
    """Bars of width_before and width_after for every layer row that has a width."""
    rows = [
        r for r in layers if r.get("width_before") is not None and r.get("width_after") is not None
    ]
    if not rows:
        raise DataError("no layer with a width to plot")
    fig = _figure(min(MAX_WIDTH_INCHES, max(4.0, 0.5 * len(rows) + 2.0)), 3.6)
    ax = fig.add_subplot(1, 1, 1)
    x = np.arange(len(rows))
    ax.bar(x - 0.2, [r["width_before"] for r in rows], 0.4, label="before")
    ax.bar(x + 0.2, [r["width_after"] for r in rows], 0.4, label="after")
    ax.set_xticks(x)
    ax.set_xticklabels([r["name"] or "<root>" for r in rows], rotation=45, ha="right", fontsize=7)
    ax.set_ylabel("units")
    ax.set_title("width per layer")
    ax.legend()
    return _save(fig, path)


def plot_hits(
    hits: Mapping[str, Any],
    path: str | os.PathLike[str],
    *,
    examples: Mapping[str, int] | None = None,
    prune_rate: float | None = None,
) -> Path:
    """One histogram per layer key of its units' hits (as a fraction of ``examples[key]``
    when given), with the prune threshold marked when ``prune_rate`` is given."""
    if not hits:
        raise DataError("no hit counts to plot")
    keys = list(hits)[:MAX_PANELS]
    cols = min(3, len(keys))
    rows = -(-len(keys) // cols)
    fig = _figure(4.0 * cols, 2.8 * rows)
    if len(hits) > len(keys):
        fig.suptitle(f"the first {len(keys)} of {len(hits)} layers (report.json holds all)",
                     fontsize=9)
    for i, key in enumerate(keys):
        ax = fig.add_subplot(rows, cols, i + 1)
        values = np.asarray(_as_list(hits[key]), dtype=np.float64)
        seen = (examples or {}).get(key)
        if seen:
            values = values / float(seen)
            if prune_rate is not None:
                ax.axvline(prune_rate, color="red", linestyle="--", linewidth=1, label="prune_rate")
                ax.legend(fontsize=7)
        ax.hist(values, bins=min(40, max(5, values.size // 4)))
        ax.set_title(f"{key} ({values.size} units)", fontsize=8)
        ax.set_xlabel("hits / examples" if seen else "hits", fontsize=7)
        ax.tick_params(labelsize=7)
    fig.tight_layout()
    return _save(fig, path)


def plot_latency(latency: Mapping[str, Any], path: str | os.PathLike[str]) -> Path:
    """Median latency (bars to p90) by batch size, one line per model and panel per thread count."""
    rows = list(latency.get("rows", []))
    models = list(latency.get("models", []))
    if not rows or not models:
        raise DataError("no latency rows to plot")
    threads = sorted({r["threads"] for r in rows})
    fig = _figure(4.2 * len(threads), 3.4)
    for i, t in enumerate(threads):
        ax = fig.add_subplot(1, len(threads), i + 1)
        mine = sorted((r for r in rows if r["threads"] == t), key=lambda r: r["batch"])
        batches = [r["batch"] for r in mine]
        for label in models:
            if f"{label}_median_ms" not in mine[0]:
                continue
            median = np.asarray([r[f"{label}_median_ms"] for r in mine])
            p90 = np.asarray([r[f"{label}_p90_ms"] for r in mine])
            ax.errorbar(
                batches,
                median,
                yerr=[np.zeros_like(median), p90 - median],
                marker="o",
                capsize=3,
                label=label,
            )
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("batch size")
        ax.set_ylabel("ms per call (median, bar to p90)")
        ax.set_title(f"onnxruntime, {t} thread{'s' if t != 1 else ''}")
        ax.legend(fontsize=7)
    fig.tight_layout()
    return _save(fig, path)


def write_plots(
    report: Mapping[str, Any],
    directory: str | os.PathLike[str],
    *,
    hits: Mapping[str, Any] | None = None,
    examples: Mapping[str, int] | None = None,
    prune_rate: float | None = None,
) -> list[Path]:
    """Every plot the report (and the hit counts, if given) allows, as PNGs in ``directory``."""
    folder = Path(directory)
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    if any(r.get("width_before") is not None for r in report.get("layers", [])):
        written.append(plot_widths(report["layers"], folder / WIDTHS_PNG))
    if hits:
        written.append(plot_hits(hits, folder / HITS_PNG, examples=examples, prune_rate=prune_rate))
    if report.get("latency", {}).get("rows"):
        written.append(plot_latency(report["latency"], folder / LATENCY_PNG))
    return written


# ---------------------------------------------------------------------- helpers
def _figure(width: float, height: float) -> Any:
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise ConfigError("plots need matplotlib: pip install 'mesimp-compress[plots]'") from None
    fig = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(fig)
    return fig


def _save(fig: Any, path: str | os.PathLike[str]) -> Path:
    with staged_file(path, suffix=".png") as tmp:
        fig.savefig(tmp, format="png")
    return Path(path)


def _as_list(values: Any) -> list[float]:
    if hasattr(values, "tolist"):
        return list(values.tolist())
    return list(values)


__all__ = ["plot_hits", "plot_latency", "plot_widths", "write_plots"]
