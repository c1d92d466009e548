import json

import _onnx_zoo as zoo
import numpy as np
import pytest
import torch
from torch import nn

from mesimp_compress.config import CompressConfig
from mesimp_compress.plan import Edit, Plan
from mesimp_compress.report import (
    REPORT_FORMAT,
    build_report,
    layer_rows,
    machine,
    read_report,
    unit_width,
    versions,
    write_report,
)
from mesimp_compress.sizes import LayerSize
from mesimp_compress.verify import OutputParity, ParityResult

torch.set_num_threads(1)


def _pair():
    original = zoo.mlp()
    return original, zoo.slice_mlp(original, zoo.KEEP1, zoo.KEEP2)


def test_layer_rows_give_widths_and_parameters_before_and_after():
    original, compressed = _pair()
    sizes = [LayerSize("0", "Linear", 85, 85, "match", params_before=204, onnx_params_before=204)]
    rows = {r["name"]: r for r in layer_rows(original, compressed, sizes)}
    assert list(rows) == ["0", "2", "4"]
    assert rows["0"] == {
        "name": "0",
        "kind": "Linear",
        "width_before": 12,
        "width_after": 5,
        "params_before": 16 * 12 + 12,
        "params_after": 16 * 5 + 5,
        "onnx_params_before": 204,
        "onnx_params_after": 85,
        "size_status": "match",
        "folded_in": 0,
    }
    assert (rows["2"]["width_before"], rows["2"]["width_after"]) == (12, 4)
    assert (rows["2"]["params_before"], rows["2"]["params_after"]) == (12 * 12 + 12, 5 * 4 + 4)
    assert rows["4"]["onnx_params_after"] is None and rows["4"]["folded_in"] is None


def test_unit_width_of_each_layer_kind():
    assert unit_width(nn.Linear(3, 7)) == 7
    assert unit_width(nn.Conv2d(1, 9, 3)) == 9
    assert unit_width(nn.LSTM(4, 11)) == 11
    assert unit_width(nn.BatchNorm2d(5)) == 5
    assert unit_width(nn.LayerNorm(6)) == 6
    assert unit_width(nn.Embedding(10, 3)) == 3
    assert unit_width(nn.ReLU()) is None


def _parity(label, max_abs):
    return ParityResult(
        label, 1e-4, 1e-3, 2, [OutputParity("output", max_abs, max_abs / 2, 0.1, True)]
    )


def _latency():
    return {
        "models": ["original", "compressed", "reference"],
        "baseline": "original",
        "settings": {},
        "rows": [
            {
                "batch": 64,
                "seq": None,
                "threads": 1,
                "original_median_ms": 1.0,
                "compressed_median_ms": 0.125,
                "reference_median_ms": 0.12,
                "speedup": 8.0,
            }
        ],
    }


def test_report_holds_every_section_with_the_numbers_given():
    original, compressed = _pair()
    plan = Plan(
        {"0": zoo.KEEP1, "2": zoo.KEEP2},
        {"0": 12, "2": 12},
        [Edit("0", "Linear", "out", 12, tuple(zoo.KEEP1), "out_features")],
    )
    report = build_report(
        config=CompressConfig(k=5),
        layers=layer_rows(original, compressed),
        plan=plan,
        metrics={"name": "accuracy", "torch_before": 0.9, "ort_after": 0.89},
        parity={"original": _parity("original", 1e-7), "compressed": _parity("compressed", 2e-7)},
        latency=_latency(),
        bench_threads=[1, 2],
        skipped=[{"layer": "4", "reason": "output"}],
    )
    assert report["format"] == REPORT_FORMAT and report["status"] == "ok"
    assert report["config"]["k"] == 5 and report["config"]["batches"] == [1, 8, 64]
    assert report["widths"] == {"0": {"before": 12, "after": 5}, "2": {"before": 12, "after": 4}}
    assert report["params"]["before"] == 204 + 156 + 52
    assert report["params"]["after"] == 85 + 24 + 20
    assert report["params"]["ratio"] == pytest.approx(412 / 129)
    assert report["metrics"]["torch_before"] == 0.9 and report["metrics"]["ort_after"] == 0.89
    assert report["metrics"]["torch_after"] is None
    assert report["parity"] == {
        "output": {
            "original_max_abs": 1e-7,
            "original_max_rel": 5e-8,
            "compressed_max_abs": 2e-7,
            "compressed_max_rel": 1e-7,
        }
    }
    assert report["parity_checks"]["compressed"]["passed"] is True
    (row,) = report["latency"]["rows"]
    assert row["compressed_vs_reference"] == pytest.approx(0.125 / 0.12)
    assert report["skipped"] == [{"layer": "4", "reason": "output"}]
    for key in ("python", "torch", "onnx", "onnxruntime"):
        assert report["versions"][key]
    assert report["machine"]["bench_threads"] == [1, 2]
    assert report["machine"]["cpu_count"] >= 1 and report["machine"]["cpu"]


def test_versions_and_machine_name_the_installed_packages():
    import onnx
    import onnxruntime

    v = versions()
    assert v["torch"] == torch.__version__ and v["onnx"] == onnx.__version__
    assert v["onnxruntime"] == onnxruntime.__version__
    assert machine([1])["torch_threads"] == torch.get_num_threads()


def test_write_report_is_atomic_and_strict_json(tmp_path):
    report = build_report(
        metrics={"torch_after": float("nan"), "ort_after": np.float32(0.5)},
        extra={"array": np.arange(3), "tensor": torch.tensor([1.5])},
    )
    target = tmp_path / "out" / "report.json"
    write_report(report, target)
    assert [p.name for p in target.parent.iterdir()] == ["report.json"]
    text = target.read_text()
    assert "NaN" not in text
    back = read_report(target)
    assert back["metrics"]["torch_after"] is None and back["metrics"]["ort_after"] == 0.5
    assert back["extra"] == {"array": [0, 1, 2], "tensor": [1.5]}
    assert json.loads(text) == back
    # a second write replaces the file whole
    write_report({**report, "status": "failed"}, target)
    assert read_report(target)["status"] == "failed"
    assert back["params"] == {"before": 0, "after": 0, "ratio": None}


def test_params_totals_count_a_tied_parameter_once():
    from mesimp_compress.pipeline import _unique_params

    emb = nn.Embedding(20, 8)
    head = nn.Linear(8, 20, bias=False)
    head.weight = emb.weight  # tied, as a language model's head
    model = nn.Sequential(emb, nn.Linear(8, 8), head)
    rows = layer_rows(model, model)
    assert sum(r["params_after"] for r in rows) == 160 + 72 + 160  # each owner's row
    report = build_report(layers=rows, params=(_unique_params(model), _unique_params(model)))
    assert report["params"] == {"before": 232, "after": 232, "ratio": 1.0}
