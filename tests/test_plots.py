import struct
import sys

import pytest
import torch

from mesimp_compress.errors import ConfigError, DataError
from mesimp_compress.plots import plot_hits, plot_latency, plot_widths, write_plots

pytest.importorskip("matplotlib")


def _png_size(path):
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", data[16:24])  # IHDR width, height


def _layers(n):
    return [{"name": f"layers.{i}", "width_before": 500, "width_after": 50} for i in range(n)]


def _latency():
    rows = [
        {
            "batch": b,
            "threads": t,
            "original_median_ms": 1.0 * b,
            "original_p90_ms": 1.2 * b,
            "compressed_median_ms": 0.1 * b,
            "compressed_p90_ms": 0.15 * b,
        }
        for t in (1, 2)
        for b in (1, 8, 64)
    ]
    return {"models": ["original", "compressed"], "rows": rows}


def test_widths_plot_is_a_png_that_grows_with_the_layer_count(tmp_path):
    small = _png_size(plot_widths(_layers(3), tmp_path / "w3.png"))
    large = _png_size(plot_widths(_layers(20), tmp_path / "w20.png"))
    assert small == (400, 360)  # 4.0 x 3.6 inches at 100 dpi
    assert large == (1200, 360)  # 0.5 inch per layer + 2
    with pytest.raises(DataError):
        plot_widths(
            [{"name": "act", "width_before": None, "width_after": None}], tmp_path / "x.png"
        )


def test_hit_histograms_one_panel_per_layer_key(tmp_path):
    hits = {f"l{i}": torch.randint(0, 100, (40,)) for i in range(4)}
    path = plot_hits(hits, tmp_path / "hits.png", examples={k: 100 for k in hits}, prune_rate=0.1)
    assert _png_size(path) == (1200, 560)  # 3 columns x 2 rows of 4.0 x 2.8 inches
    with pytest.raises(DataError):
        plot_hits({}, tmp_path / "none.png")


def test_a_deep_model_gets_charts_of_bounded_size(tmp_path):
    hits = {f"l{i}": torch.randint(0, 100, (8,)) for i in range(100)}
    assert _png_size(plot_hits(hits, tmp_path / "hits.png")) == (1200, 2240)  # 24 panels
    assert _png_size(plot_widths(_layers(500), tmp_path / "w.png")) == (4000, 360)


def test_latency_plot_one_panel_per_thread_count(tmp_path):
    assert _png_size(plot_latency(_latency(), tmp_path / "lat.png")) == (840, 340)
    with pytest.raises(DataError):
        plot_latency({"models": [], "rows": []}, tmp_path / "x.png")


def test_write_plots_draws_what_the_report_allows(tmp_path):
    report = {"layers": _layers(2), "latency": _latency()}
    written = write_plots(report, tmp_path / "plots", hits={"l0": [1, 2, 3, 50]})
    assert sorted(p.name for p in written) == ["hits.png", "latency.png", "widths.png"]
    assert sorted(p.name for p in (tmp_path / "plots").iterdir()) == sorted(p.name for p in written)
    assert write_plots({"layers": [], "latency": {}}, tmp_path / "empty") == []


def test_missing_matplotlib_is_a_config_error_naming_the_extra(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    with pytest.raises(ConfigError, match=r"mesimp-compress\[plots\]"):
        plot_widths(_layers(1), tmp_path / "w.png")
