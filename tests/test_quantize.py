import _onnx_zoo as zoo
import onnx
import pytest
import torch

from mesimp_compress.errors import ExportError
from mesimp_compress.quantize import INT8_ATOL, INT8_RTOL, quantize_int8
from mesimp_compress.verify import check_parity

torch.set_num_threads(1)


def test_int8_quantisation_stores_int8_weights_and_stays_close(tmp_path):
    e = zoo.mlp_torchscript()
    q = quantize_int8(e.result.path, tmp_path / "int8.onnx")
    model = onnx.load(str(q))
    int8 = [i for i in model.graph.initializer if i.data_type == onnx.TensorProto.INT8]
    assert sum(1 for i in int8 if len(i.dims) == 2) == 3  # the three weight matrices
    x = torch.randn(16, 16)
    parity = check_parity(q, e.model, [(x,)], atol=INT8_ATOL, rtol=INT8_RTOL, label="int8")
    assert parity.passed and parity.outputs[0].max_abs > 0  # quantised: close, not equal
    assert [p.name for p in tmp_path.iterdir()] == ["int8.onnx"]


def test_quantising_a_broken_file_is_an_export_error_and_leaves_nothing(tmp_path):
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"not onnx")
    with pytest.raises(ExportError, match="int8 quantisation of bad.onnx failed"):
        quantize_int8(bad, tmp_path / "out" / "int8.onnx")
    assert list((tmp_path / "out").iterdir()) == []
