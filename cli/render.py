"""Rich rendering of the library's progress events and of a compression report."""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table
from rich.text import Text

from mesimp_compress.events import Event


def _widths(widths: dict[str, int], limit: int = 4) -> str:
    items = list(widths.items())
    text = " ".join(f"{k}={v}" for k, v in items[:limit])
    return text + (" …" if len(items) > limit else "")


class ProgressRenderer:
    """An event sink: a bar per epoch with loss, metric and widths; one line per prune."""

    def __init__(self, console: Console, *, quiet: bool = False) -> None:
        self.console = console
        self.quiet = quiet
        self.progress: Progress | None = None
        self.task: Any = None
        self.metric: float | None = None
        self.widths: dict[str, int] = {}

    def __call__(self, event: Event) -> None:
        handler = getattr(self, f"_on_{event.kind}", None)
        if handler is not None and not self.quiet:
            handler(event.data)

    def close(self) -> None:
        if self.progress is not None:
            self.progress.stop()
            self.progress = None

    # -- training
    def _on_baseline(self, d: dict[str, Any]) -> None:
        self.metric = d["metric"]
        self.widths = d["widths"]
        self.console.print(f"original: metric {d['metric']:.4f}  widths {_widths(d['widths'], 8)}")

    def _on_phase(self, d: dict[str, Any]) -> None:
        self.console.print(Text.assemble((f"{d['phase']} cycle {d['cycle']}", "bold"),
                                         f" ({d['epochs']} epochs)"))

    def _on_epoch_start(self, d: dict[str, Any]) -> None:
        self.close()
        self.progress = Progress(
            TextColumn(f"epoch {d['epoch'] + 1}/{d['epochs']} {d['phase']:<6}"),
            BarColumn(bar_width=24),
            MofNCompleteColumn(),
            TextColumn("{task.fields[status]}", markup=False),  # layer names are data
            TimeElapsedColumn(),
            console=self.console,
            transient=False,
        )
        self.progress.start()
        self.task = self.progress.add_task("", total=d["batches"], status="")

    def _status(self, loss: float) -> str:
        metric = f"metric {self.metric:.4f}" if self.metric is not None else ""
        return f"loss {loss:.4f} {metric} {_widths(self.widths)}"

    def _on_step(self, d: dict[str, Any]) -> None:
        if self.progress is not None:
            self.progress.update(self.task, completed=d["batch"], status=self._status(d["loss"]))
            if d["batch"] == d["batches"]:
                self.close()

    def _on_window(self, d: dict[str, Any]) -> None:
        self.metric = d["metric"]
        self.widths = d["widths"]

    def _on_prune(self, d: dict[str, Any]) -> None:
        text = ", ".join(f"{k} {a}→{b}" for k, (a, b) in d["pruned"].items())
        target = self.progress.console if self.progress is not None else self.console
        target.print(f"  window {d['window']}: pruned {text}")

    def _on_rollback(self, d: dict[str, Any]) -> None:
        target = self.progress.console if self.progress is not None else self.console
        target.print(Text.assemble(
            "  ", ("rollback", "yellow"),
            f" at window {d['window']}: metric {d['metric']:.4f} "
            f"{'>' if d['metric'] > d['threshold'] else '<'} limit {d['threshold']:.4f}; "
            f"frozen {', '.join(map(str, d['keys']))}"
        ))

    def _on_done(self, d: dict[str, Any]) -> None:
        self.close()
        self.console.print(
            f"fine-tuned: metric {d['metric_before']:.4f} → {d['metric_after']:.4f}  "
            f"widths {_widths(d['widths'], 8)}"
        )

    def _on_resumed(self, d: dict[str, Any]) -> None:
        self.console.print(
            f"resuming at epoch {d['epoch'] + 1}, batch {d['batch']} "
            f"(window {d['window']}), widths {_widths(d['widths'], 8)}"
        )

    def _on_note(self, d: dict[str, Any]) -> None:
        target = self.progress.console if self.progress is not None else self.console
        target.print(f"note: {d['message']}", style="dim")

    # -- export and verify
    def _on_stage(self, d: dict[str, Any]) -> None:
        self.close()
        self.console.print(str(d["message"]), style="dim")


def summary_table(report: dict[str, Any]) -> list[Table]:
    """Tables for a report: widths per layer, metric and parity, latency per batch size."""
    tables: list[Table] = []
    layers = Table(title="widths", title_justify="left")
    for col in ("layer", "before", "after", "params before", "params after"):
        layers.add_column(col, justify="right" if col != "layer" else "left")
    for row in report.get("layers", []):
        layers.add_row(
            str(row["name"]),
            str(row["width_before"]),
            str(row["width_after"]),
            f"{row['params_before']:,}",
            f"{row['params_after']:,}",
        )
    tables.append(layers)

    m = report.get("metrics", {})
    latency = report.get("latency", {}).get("rows", [])
    int8 = m.get("int8") is not None or any("int8_median_ms" in row for row in latency)
    metrics = Table(title="metric and parity", title_justify="left")
    for col in ("", "original", "compressed", *(["int8"] if int8 else [])):
        metrics.add_column(col, justify="right" if col else "left")
    for label, key in (("PyTorch", "torch"), ("onnxruntime", "ort")):
        before, after = m.get(f"{key}_before"), m.get(f"{key}_after")
        if before is not None or after is not None:
            extra = [_fmt(m.get("int8")) if key == "ort" else "-"] if int8 else []
            metrics.add_row(f"metric ({label})", _fmt(before), _fmt(after), *extra)
    for name, p in report.get("parity", {}).items():
        metrics.add_row(
            f"parity {name} max abs",
            _fmt(p.get("original_max_abs")),
            _fmt(p.get("compressed_max_abs")),
            *([_fmt(p.get("int8_max_abs"))] if int8 else []),
        )
    tables.append(metrics)

    if latency:
        lat = Table(title="onnxruntime latency (ms, median / p90)", title_justify="left")
        models = ["original", "compressed", *(["int8"] if int8 else [])]
        for col in ("threads", "batch", *models, "speedup", *(["int8 speedup"] if int8 else [])):
            lat.add_column(col, justify="right")
        for row in latency:
            lat.add_row(
                str(row.get("threads", "")),
                str(row["batch"]),
                *(f"{row[f'{name}_median_ms']:.3f} / {row[f'{name}_p90_ms']:.3f}"
                  if f"{name}_median_ms" in row else "-" for name in models),
                f"{row['speedup']:.2f}x",
                *([f"{row['int8_speedup']:.2f}x" if "int8_speedup" in row else "-"]
                  if int8 else []),
            )
        tables.append(lat)
    return tables


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}" if abs(value) < 1e-2 else f"{value:.4f}"
    return str(value)
