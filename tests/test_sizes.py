from types import SimpleNamespace

import _onnx_zoo as zoo
import pytest
import torch
from torch import nn

from mesimp_compress.errors import SizeError
from mesimp_compress.export import export_onnx
from mesimp_compress.plan import Edit
from mesimp_compress.sizes import (
    COMPUTED,
    FOLDED,
    MATCH,
    check_shrunk,
    onnx_layer_sizes,
    unused_params,
)

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


class InDict(nn.Module):
    """Layers held in an nn.ModuleDict: TorchScript scopes them by their key alone."""

    def __init__(self) -> None:
        super().__init__()
        self.m = nn.ModuleDict({"emb": nn.Embedding(20, 8), "lstm": nn.LSTM(8, 8),
                                "fc": nn.Linear(8, 6), "out": nn.Linear(6, 3)})

    def forward(self, tokens):
        h, _ = self.m["lstm"](self.m["emb"](tokens))
        return self.m["out"](torch.relu(self.m["fc"](h)))


def test_torchscript_scopes_of_module_dict_members_are_attributed(tmp_path):
    torch.manual_seed(0)
    model = InDict().eval()
    r = export_onnx(model, (torch.randint(0, 20, (5, 2)),), tmp_path / "d.onnx",
                    exporter="torchscript")
    sizes = _by_name(onnx_layer_sizes(r.path, model))
    assert {name: sizes[name].status for name in ("m.lstm", "m.fc", "m.out")} == dict.fromkeys(
        ("m.lstm", "m.fc", "m.out"), MATCH)


def _with_statistics(bn):
    """Non-trivial BatchNorm statistics: folding it then gives a bias that is not all zeros."""
    with torch.no_grad():
        bn.running_mean.uniform_(-0.5, 0.5)
        bn.running_var.uniform_(0.5, 2.0)
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.uniform_(-0.5, 0.5)
    return bn


def _conv_bn(channels, trained=True):
    """The ResNet block: a bias-free Conv2d, then BatchNorm2d."""
    torch.manual_seed(3)
    bn = nn.BatchNorm2d(channels)
    return nn.Sequential(
        nn.Conv2d(3, channels, 3, padding=1, bias=False),
        _with_statistics(bn) if trained else bn,
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(channels * 6 * 6, 5),
    ).eval()


def _linear_bn(inputs, units, trained=True):
    """A bias-free Linear, then BatchNorm1d."""
    torch.manual_seed(4)
    bn = nn.BatchNorm1d(units)
    return nn.Sequential(
        nn.Linear(inputs, units, bias=False),
        _with_statistics(bn) if trained else bn,
        nn.ReLU(),
        nn.Linear(units, 3),
    ).eval()


def _export_conv_bn(model, path, exporter="auto"):
    return export_onnx(model, (torch.randn(2, 3, 6, 6),), path, exporter=exporter).path


@pytest.mark.parametrize("exporter", ["dynamo", "torchscript"])
def test_batchnorm_folded_into_a_bias_free_conv_counts_its_new_bias_for_the_conv(
    tmp_path, exporter
):
    model = _conv_bn(8)
    sizes = _by_name(onnx_layer_sizes(_export_conv_bn(model, tmp_path / "m.onnx", exporter), model))
    conv, bn, fc = sizes["0"], sizes["1"], sizes["4"]
    # the file holds the folded weight and the bias folding created: both count for the conv
    assert (conv.params, conv.onnx_params, conv.folded_in, conv.status) == (216, 224, 8, MATCH)
    assert sorted(conv.onnx_shapes.values()) == [[8], [8, 3, 3, 3]]
    assert (bn.params, bn.onnx_params, bn.folded_in, bn.status) == (16, 0, 0, FOLDED)
    assert bn.onnx_shapes == {}
    assert (fc.params, fc.onnx_params, fc.folded_in, fc.status) == (1445, 1445, 0, MATCH)


def test_batchnorm_folded_into_a_bias_free_linear_counts_its_new_bias_for_the_linear(tmp_path):
    torch.manual_seed(4)
    model = _linear_bn(6, 10)
    path = export_onnx(model, (torch.randn(4, 6),), tmp_path / "m.onnx").path
    sizes = _by_name(onnx_layer_sizes(path, model))
    lin, bn, out = sizes["0"], sizes["1"], sizes["3"]
    assert (lin.params, lin.onnx_params, lin.folded_in, lin.status) == (60, 70, 10, MATCH)
    assert sorted(lin.onnx_shapes.values()) == [[10], [10, 6]]
    assert (bn.params, bn.onnx_params, bn.folded_in, bn.status) == (20, 0, 0, FOLDED)
    assert (out.params, out.onnx_params, out.status) == (33, 33, MATCH)


def test_a_folded_zero_bias_equal_to_the_batchnorm_bias_is_still_the_convs(tmp_path):
    # an untrained BatchNorm folds into an all-zero bias, equal to its own (zero) bias: the
    # TorchScript exporter keeps that bias under a new name, fed to the conv alone
    model = _conv_bn(8, trained=False)
    path = _export_conv_bn(model, tmp_path / "m.onnx", "torchscript")
    sizes = _by_name(onnx_layer_sizes(path, model))
    assert (sizes["0"].onnx_params, sizes["0"].folded_in, sizes["0"].status) == (224, 8, MATCH)
    assert (sizes["1"].onnx_params, sizes["1"].status) == (0, FOLDED)


@pytest.mark.parametrize("exporter", ["dynamo", "torchscript"])
def test_a_bias_free_conv_with_other_widths_than_its_file_is_still_a_size_error(tmp_path, exporter):
    big, small = _conv_bn(8), _conv_bn(4)
    big_file = _export_conv_bn(big, tmp_path / "big.onnx", exporter)
    small_file = _export_conv_bn(small, tmp_path / "small.onnx", exporter)
    with pytest.raises(SizeError, match=r"'0' \(Conv2d\) 108 in PyTorch vs 224 in ONNX"):
        onnx_layer_sizes(big_file, small)
    # a file holding fewer rows than the module
    with pytest.raises(SizeError, match=r"'0' \(Conv2d\) 216 in PyTorch vs 112 in ONNX"):
        onnx_layer_sizes(small_file, big)
    sizes = _by_name(check_shrunk(small_file, small, original_onnx=big_file, original_model=big))
    assert (sizes["0"].params_before, sizes["0"].params) == (216, 108)
    assert (sizes["0"].onnx_params_before, sizes["0"].onnx_params) == (224, 112)
    assert (sizes["1"].status, sizes["1"].onnx_params_before) == (FOLDED, 0)


def test_a_layer_shrinks_in_onnx_by_its_own_elements_not_the_bias_folding_added(tmp_path):
    # the dynamo exporter drops the all-zero bias an untrained BatchNorm folds into: the
    # original file holds the bare weight (4), the trained compressed one 3 weights and a
    # 3-element bias, more than before though the layer lost a unit
    original, compressed = _linear_bn(1, 4, trained=False), _linear_bn(1, 3)
    x = (torch.randn(4, 1),)
    original_file = export_onnx(original, x, tmp_path / "original.onnx", exporter="dynamo").path
    compressed_file = export_onnx(compressed, x, tmp_path / "model.onnx", exporter="dynamo").path
    sizes = _by_name(
        check_shrunk(
            compressed_file, compressed, original_onnx=original_file, original_model=original
        )
    )
    lin = sizes["0"]
    assert (lin.onnx_params_before, lin.onnx_params, lin.folded_in) == (4, 6, 3)
    assert (lin.params_before, lin.params, lin.status) == (4, 3, MATCH)
    assert (sizes["1"].onnx_params_before, sizes["1"].status) == (0, FOLDED)


def test_an_all_zero_bias_the_exporter_dropped_counts_as_held(tmp_path):
    torch.manual_seed(5)
    model = nn.Sequential(nn.Linear(6, 12), nn.ReLU(), nn.Linear(12, 3)).eval()
    with torch.no_grad():
        model[2].bias.zero_()  # as Hugging Face initialises every bias
    path = export_onnx(model, (torch.randn(4, 6),), tmp_path / "m.onnx").path
    head = _by_name(onnx_layer_sizes(path, model))["2"]
    assert (head.params, head.onnx_params, head.dropped, head.status) == (39, 36, 3, MATCH)
    small = nn.Sequential(nn.Linear(6, 11), nn.ReLU(), nn.Linear(11, 3)).eval()
    with torch.no_grad():
        small[2].bias.fill_(0.5)  # trained: the file holds it now
    small_path = export_onnx(small, (torch.randn(4, 6),), tmp_path / "s.onnx").path
    sizes = _by_name(check_shrunk(small_path, small, original_onnx=path, original_model=model))
    assert (sizes["2"].onnx_params, sizes["2"].onnx_params_before) == (36, 36)  # 33 + 3 vs 36
    with torch.no_grad():
        model[2].bias[0] = 1.0  # not all zero: a file without it is a real mismatch
    with pytest.raises(SizeError, match="'2' \\(Linear\\) 39 in PyTorch vs 36"):
        onnx_layer_sizes(path, model)


def test_the_file_total_allows_tensors_the_original_export_folded_as_defaults(
    tmp_path, monkeypatch
):
    """A fresh LayerNorm (ones, zeros) may be folded out of the original's file; fine-tuned,
    the compressed file holds it. That is no surplus; an unnamed extra tensor still is."""
    import copy

    from mesimp_compress import sizes as sizes_module
    from mesimp_compress.graph import find_groups
    from mesimp_compress.plan import make_plan
    from mesimp_compress.surgery import apply_plan

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 8), nn.LayerNorm(8),
                          nn.Linear(8, 2)).eval()
    x = torch.randn(2, 4)
    original = export_onnx(model, (x,), tmp_path / "o.onnx", exporter="dynamo").path
    small = copy.deepcopy(model)
    plan = make_plan(find_groups(small, x), {"0": [0, 1]})
    apply_plan(small, plan)
    compressed = export_onnx(small, (x,), tmp_path / "c.onnx", exporter="dynamo").path
    real = sizes_module._float_names
    extra: dict[str, int] = {}

    def names(path):
        found = real(path)
        if str(path) == str(original):  # as if the exporter had folded the default LayerNorm
            return {k: v for k, v in found.items() if not k.startswith("3.")}
        return {**found, **extra}

    monkeypatch.setattr(sizes_module, "_float_names", names)
    check_shrunk(compressed, small, original_onnx=original, original_model=model, plan=plan)
    extra["onnx::Constant_9"] = 30  # a tensor no model parameter explains
    with pytest.raises(SizeError, match="not fewer than the original's"):
        check_shrunk(compressed, small, original_onnx=original, original_model=model, plan=plan)


class _Encoder(nn.Module):
    """nn.TransformerEncoder deep-copies its layer: at construction both are equal, and the
    exporter stores the original's equal tensors once."""

    def __init__(self) -> None:
        super().__init__()
        layer = nn.TransformerEncoderLayer(8, 2, 16, batch_first=True, dropout=0.0)
        self.enc = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.o = nn.Linear(8, 3)

    def forward(self, x):
        return self.o(self.enc(x).mean(1))


def test_layers_equal_at_export_do_not_make_the_compressed_file_look_larger(tmp_path):
    import mesimp_compress as mc

    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    data = [(torch.randn(8, 5, 8, generator=g), torch.randint(0, 3, (8,), generator=g))
            for _ in range(3)]
    cfg = mc.CompressConfig(epochs=1, cycles=1, recovery_epochs=0, window=0.5, batches=[1],
                            threads=1, bench_threads=1, k=0.25)
    result = mc.compress(_Encoder(), data, data[:2], config=cfg, out=tmp_path / "out")
    assert result.report["status"] == "ok"  # it was a SizeError: 712 weights, not < 660
    assert result.widths == {"enc.layers.0.linear1": 4, "enc.layers.1.linear1": 4}


class _ParameterOnly(nn.Module):
    """A Linear applied to a parameter alone (DeBERTa's relative-position projections): the
    exporter computes its result once and stores that constant instead of both."""

    def __init__(self) -> None:
        super().__init__()
        self.rel = nn.Parameter(torch.randn(4, 8))
        self.pos_proj = nn.Linear(8, 8)
        self.fc = nn.Linear(8, 3)

    def forward(self, x):
        return self.fc(x + self.pos_proj(self.rel).mean(0))


def test_constants_computed_from_parameters_only_are_not_a_mismatch(tmp_path):
    torch.manual_seed(0)
    model = _ParameterOnly().eval()
    path = export_onnx(model, (torch.randn(2, 8),), tmp_path / "m.onnx").path
    sizes = _by_name(onnx_layer_sizes(path, model))
    assert (sizes[""].params, sizes[""].onnx_params, sizes[""].status) == (32, 8, COMPUTED)
    assert sizes["pos_proj"].status == FOLDED and sizes["fc"].status == MATCH


def test_weight_norm_stored_as_the_weight_it_makes_is_not_a_mismatch(tmp_path):
    """weight_norm starts with g = |v|, so the stored weight equals v by value and g is
    missing (Wav2Vec2's positional conv: a SizeError); trained apart, the weight is no
    parameter's and counts nowhere."""
    from torch.nn.utils.parametrizations import weight_norm

    for scale, status, held in ((1.0, COMPUTED, 30), (1.5, FOLDED, 0)):
        torch.manual_seed(0)
        model = nn.Sequential(weight_norm(nn.Linear(6, 5), dim=1), nn.ReLU(), nn.Linear(5, 2))
        with torch.no_grad():
            model[0].parametrizations.weight.original0.mul_(scale)
        path = export_onnx(model.eval(), (torch.randn(2, 6),), tmp_path / f"{scale}.onnx").path
        sizes = _by_name(onnx_layer_sizes(path, model))
        wn = sizes["0.parametrizations.weight"]
        assert (wn.params, wn.onnx_params, wn.status) == (6 + 30, held, status)
        assert sizes["0"].status == MATCH  # the bias, by name


def test_old_style_weight_norm_beside_a_bias_is_computed(tmp_path):
    """torch.nn.utils.weight_norm puts g and v on the Linear itself: the file holds its bias by
    name and the weight they make, which the Linear's node consumes (a SizeError before)."""
    import warnings

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 2))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # deprecated, still widely used
        nn.utils.weight_norm(model[0])
    with torch.no_grad():
        model[0].weight_g.mul_(1.5)  # trained: the weight equals neither g nor v
    path = export_onnx(model.eval(), (torch.randn(2, 6),), tmp_path / "m.onnx",
                       exporter="dynamo").path
    sizes = _by_name(onnx_layer_sizes(path, model))
    assert (sizes["0"].params, sizes["0"].onnx_params, sizes["0"].status) == (
        8 + 8 + 48, 8 + 48, COMPUTED)
    assert sizes["2"].status == MATCH


class _Spare(nn.Module):
    """A used scalar gain and a parameter forward never reads (kept for old checkpoints)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(6, 4)
        self.gain = nn.Parameter(torch.tensor(1.3))
        self.spare = nn.Parameter(torch.randn(8))
        self.frozen = nn.Parameter(torch.randn(4), requires_grad=False)

    def forward(self, x):
        return self.fc(x) * self.gain + self.frozen


@pytest.mark.parametrize("exporter", ["dynamo", "torchscript"])
def test_a_parameter_forward_never_uses_counts_as_held(tmp_path, exporter):
    """The exporter leaves an unused parameter out: '' held 1 + 4 of its 13 elements, a
    SizeError after the whole fine-tuning (the checkpoint left behind)."""
    torch.manual_seed(0)
    model = _Spare().eval()
    x = torch.randn(2, 6)
    assert unused_params(model, (x,)) == {"spare"}  # the frozen one is used
    assert not model.frozen.requires_grad
    path = export_onnx(model, (x,), tmp_path / "m.onnx", exporter=exporter).path
    with pytest.raises(SizeError, match="'' \\(_Spare\\) 13 in PyTorch vs 5"):
        onnx_layer_sizes(path, model)
    root = _by_name(onnx_layer_sizes(path, model, unused={"spare"}))[""]
    assert (root.params, root.onnx_params, root.dropped, root.status) == (13, 5, 8, MATCH)


def test_a_used_parameter_the_file_lacks_is_still_a_size_error_when_others_are_unused(
    tmp_path,
):
    torch.manual_seed(0)
    model = _Spare().eval()
    path = export_onnx(model, (torch.randn(2, 6),), tmp_path / "m.onnx", exporter="dynamo").path
    model.extra = nn.Parameter(torch.randn(3))  # a used parameter no file tensor holds
    model.forward = lambda x: model.fc(x) * model.gain + model.frozen + model.extra.sum()
    with pytest.raises(SizeError, match="'' \\(_Spare\\) 16 in PyTorch vs 5"):
        onnx_layer_sizes(path, model, unused={"spare"})


def test_a_dynamo_file_holding_fewer_elements_of_a_layer_it_names_is_still_a_size_error(
    tmp_path,
):
    """'computed' is for parameters the file lacks: one it holds by name, smaller than the
    module's, is a mismatch (as is any layer of a TorchScript file, which renames them)."""
    torch.manual_seed(0)
    wide, narrow = _ParameterOnly().eval(), _ParameterOnly().eval()
    narrow.fc = nn.Linear(8, 2)
    path = export_onnx(narrow, (torch.randn(2, 8),), tmp_path / "m.onnx").path
    with pytest.raises(SizeError, match=r"'fc' \(Linear\) 27 in PyTorch vs 18 in ONNX"):
        onnx_layer_sizes(path, wide)


class _SiameseLSTM(nn.Module):
    """One nn.LSTM run on two sequences: the exporter builds its W and R once per call."""

    def __init__(self) -> None:
        super().__init__()
        self.lstm = nn.LSTM(6, 32, batch_first=True)
        self.head = nn.Linear(64, 3)

    def forward(self, a, b):
        return self.head(torch.cat([self.lstm(a)[0][:, -1], self.lstm(b)[0][:, -1]], -1))


def test_a_module_called_twice_and_stored_per_call_counts_once(tmp_path):
    torch.manual_seed(0)
    model = _SiameseLSTM().eval()
    x = (torch.randn(2, 5, 6), torch.randn(2, 5, 6))
    path = export_onnx(model, x, tmp_path / "m.onnx").path
    lstm = _by_name(onnx_layer_sizes(path, model))["lstm"]
    assert lstm.status == MATCH and lstm.onnx_params == lstm.params == 4 * 32 * (6 + 32 + 2)
    assert sum(int(torch.tensor(s).prod()) for s in lstm.onnx_shapes.values()) > lstm.params
    import onnx
    from onnx import numpy_helper

    proto = onnx.load(str(path))  # a second R that differs from the first is no repeat of it
    big = [i for i in proto.graph.initializer if numpy_helper.to_array(i).size == 4 * 32 * 32]
    assert len(big) == 2
    big[1].CopyFrom(numpy_helper.from_array(numpy_helper.to_array(big[1]) * 2, big[1].name))
    onnx.save(proto, str(path))
    with pytest.raises(SizeError, match="'lstm'"):
        onnx_layer_sizes(path, model)


class _Offsets(nn.Module):
    """Two learned offsets on the logits, zero at the start: equal, so stored once; the second
    is scaled in forward, so trained apart it becomes a computed constant."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 3)
        self.head = nn.Module()
        self.head.shift = nn.Parameter(torch.zeros(3))
        self.head.scaled = nn.Parameter(torch.zeros(3))

    def forward(self, x):
        return self.fc(x) + self.head.shift + self.head.scaled * 0.5


def test_equal_parameters_stored_once_and_scaled_ones_folded_are_not_a_mismatch(tmp_path):
    torch.manual_seed(0)
    model = _Offsets().eval()
    path = export_onnx(model, (torch.randn(2, 8),), tmp_path / "equal.onnx").path
    head = _by_name(onnx_layer_sizes(path, model))["head"]
    assert (head.params, head.onnx_params, head.status) == (6, 6, MATCH)
    with torch.no_grad():
        model.head.shift.copy_(torch.tensor([0.1, -0.2, 0.3]))
        model.head.scaled.copy_(torch.tensor([0.4, 0.5, -0.6]))
    path = export_onnx(model, (torch.randn(2, 8),), tmp_path / "apart.onnx").path
    head = _by_name(onnx_layer_sizes(path, model))["head"]
    assert (head.params, head.onnx_params, head.status) == (6, 3, COMPUTED)
    assert head.onnx_shapes == {"head.shift": [3]}
