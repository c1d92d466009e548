from types import SimpleNamespace

import _onnx_zoo as zoo
import pytest
import torch

from mesimp_compress.errors import SizeError
from mesimp_compress.export import export_onnx
from mesimp_compress.plan import Edit
from mesimp_compress.sizes import FOLDED, MATCH, check_shrunk, onnx_layer_sizes

torch.set_num_threads(1)


def _by_name(sizes):
    return {s.name: s for s in sizes}


def test_compressed_mlp_shrank_layer_by_layer_and_as_a_whole():
    original, compressed = zoo.mlp_pair()
    sizes = _by_name(
        check_shrunk(
            compressed.result.path,
            compressed.model,
            original_onnx=original.result.path,
            original_model=original.model,
        )
    )
    n1, n2 = len(zoo.KEEP1), len(zoo.KEEP2)
    expected_after = {"0": 16 * n1 + n1, "2": n1 * n2 + n2, "4": n2 * 4 + 4}
    expected_before = {"0": 16 * 12 + 12, "2": 12 * 12 + 12, "4": 12 * 4 + 4}
    assert {k: s.params for k, s in sizes.items()} == expected_after
    assert {k: s.onnx_params for k, s in sizes.items()} == expected_after
    assert {k: s.params_before for k, s in sizes.items()} == expected_before
    assert {k: s.onnx_params_before for k, s in sizes.items()} == expected_before
    assert all(s.status == MATCH for s in sizes.values())
    assert sizes["2"].shapes == {"weight": [n2, n1], "bias": [n2]}


def test_plan_widths_are_checked_against_the_model():
    original, compressed = zoo.mlp_pair()
    good = SimpleNamespace(
        edits=[
            Edit("0", "Linear", "out", 12, tuple(zoo.KEEP1), "out_features"),
            Edit("2", "Linear", "in", 12, tuple(zoo.KEEP1), "in_features"),
        ]
    )
    check_shrunk(compressed.result.path, compressed.model, plan=good)
    wrong = SimpleNamespace(edits=[Edit("2", "Linear", "out", 12, (0, 1, 2), "out_features")])
    with pytest.raises(
        SizeError,
        match=r"module '2' \(Linear\): the plan sets out_features=3, the model has out_features=4",
    ):
        check_shrunk(compressed.result.path, compressed.model, plan=wrong)
    missing = SimpleNamespace(edits=[Edit("9", "Linear", "out", 12, (0,), "out_features")])
    with pytest.raises(SizeError, match="the model lacks"):
        check_shrunk(compressed.result.path, compressed.model, plan=missing)


def test_a_file_that_does_not_hold_the_compressed_model_is_a_size_error():
    original, compressed = zoo.mlp_pair()
    # the original's (bigger) file passed off as the compressed model's
    with pytest.raises(SizeError, match=r"'0' \(Linear\) 85 in PyTorch vs 204 in ONNX"):
        onnx_layer_sizes(original.result.path, compressed.model)


def test_a_layer_the_plan_shrinks_must_be_smaller_than_in_the_original():
    original, _ = zoo.mlp_pair()
    plan = SimpleNamespace(edits=[Edit("0", "Linear", "out", 12, tuple(range(12)), "out_features")])
    with pytest.raises(
        SizeError, match=r"module '0' \(Linear\) should have shrunk but has 204 parameters"
    ):
        check_shrunk(
            original.result.path,
            original.model,
            original_onnx=original.result.path,
            original_model=original.model,
            plan=plan,
        )


def test_an_unchanged_model_without_a_plan_is_not_asked_to_shrink():
    original, _ = zoo.mlp_pair()
    sizes = check_shrunk(
        original.result.path,
        original.model,
        original_onnx=original.result.path,
        original_model=original.model,
    )
    assert all(s.params == s.params_before for s in sizes)


def test_lstm_weights_repacked_into_onnx_w_r_b_count_for_the_lstm():
    e = zoo.tagger()
    sizes = _by_name(onnx_layer_sizes(e.result.path, e.model))
    lstm = sizes["lstm"]
    assert lstm.status == MATCH
    assert lstm.params == sum(p.numel() for p in e.model.lstm.parameters()) == lstm.onnx_params
    # one W, R and B per layer (both directions packed together), none named like torch's
    assert len(lstm.onnx_shapes) == 6
    assert sorted(s for s in lstm.onnx_shapes.values() if s[1:] == [24, 8]) == [[2, 24, 8]]


def test_transposed_and_deduplicated_weights_are_found_by_value():
    e = zoo.encoder_layer()
    sizes = _by_name(onnx_layer_sizes(e.result.path, e.model))
    assert {s.status for s in sizes.values()} == {MATCH}
    # norm2 starts equal to norm1 (ones, zeros): the exporter stores the pair once
    assert sizes["norm2"].onnx_params == sizes["norm2"].params == 32
    assert sizes["linear1"].onnx_params == 16 * 32 + 32


def test_batchnorm_folded_into_the_conv_counts_as_folded():
    e = zoo.cnn()
    sizes = _by_name(onnx_layer_sizes(e.result.path, e.model))
    assert sizes["1"].status == FOLDED and sizes["1"].onnx_params == 0
    assert sizes["0"].status == MATCH and sizes["4"].status == MATCH


def test_torchscript_lstm_is_attributed_by_node_scope(tmp_path):
    torch.manual_seed(0)
    model = zoo.Tagger().eval()
    r = export_onnx(
        model, (torch.randint(0, 50, (2, 7)),), tmp_path / "ts.onnx", exporter="torchscript"
    )
    sizes = _by_name(onnx_layer_sizes(r.path, model))
    assert sizes["lstm"].status == MATCH
    assert all(name.startswith("onnx::") for name in sizes["lstm"].onnx_shapes)
