import re

import _onnx_zoo as zoo
import numpy as np
import onnx
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mesimp_compress.errors import ConfigError, ExportError, ShapeError
from mesimp_compress.export import (
    default_dynamic_axes,
    export_onnx,
    input_names_of,
    resize_inputs,
)
from mesimp_compress.verify import check_parity, make_session, run_onnx

torch.set_num_threads(1)


def _dims(path, kind="input"):
    graph = onnx.load(str(path)).graph
    values = graph.input if kind == "input" else graph.output
    return {
        v.name: [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim] for v in values
    }


# ---------------------------------------------------------------------- inputs
def test_default_axes_batch_everywhere_and_seq_for_integer_2d_inputs():
    axes = default_dynamic_axes(
        (
            torch.zeros(2, 784),
            torch.zeros(2, 7, dtype=torch.long),
            torch.zeros(2, 3, 8, 8),
            torch.zeros(2, 7, dtype=torch.bool),  # the ids' padding mask: their length
            torch.zeros(2, 4, dtype=torch.bool),  # another length: not a sequence
        )
    )
    assert axes == [{0: "batch"}, {0: "batch", 1: "seq"}, {0: "batch"}, {0: "batch", 1: "seq"},
                    {0: "batch"}]


def test_axes_that_vary_between_batches_become_dynamic():
    from mesimp_compress.inputs import observed_axes

    ids, feats, image = torch.zeros(2, 7, dtype=torch.long), torch.zeros(2, 7, 5), torch.zeros(
        2, 3, 8, 8)
    same = (torch.zeros(4, 7, dtype=torch.long), torch.zeros(4, 7, 5), torch.zeros(4, 3, 8, 8))
    assert observed_axes((ids, feats, image), [same]) is None  # only the batch differs
    other = (torch.zeros(4, 9, dtype=torch.long), torch.zeros(4, 9, 5), torch.zeros(4, 3, 8, 6))
    assert observed_axes((ids, feats, image), [same, other]) == [
        {0: "batch", 1: "seq"}, {0: "batch", 1: "seq"}, {0: "batch", 3: "input2_dim3"}]
    # a float length that is not the ids' gets a name of its own
    longer = (torch.zeros(2, 7, dtype=torch.long), torch.zeros(2, 11, 5), image)
    assert observed_axes((ids, torch.zeros(2, 9, 5), image), [longer])[1] == {
        0: "batch", 1: "input1_dim1"}
    # equal to the ids' length in the first batch only: still a length of its own
    first = (torch.zeros(2, 6, dtype=torch.long), torch.zeros(2, 6, 5))
    later = (torch.zeros(2, 7, dtype=torch.long), torch.zeros(2, 3, 5))
    assert observed_axes(first, [later]) == [{0: "batch", 1: "seq"}, {0: "batch", 1: "input1_dim1"}]


class _CountsToo(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        return self.fc(x), x.shape[0]


def test_a_python_number_among_the_outputs_is_named(tmp_path):
    """It failed as 'the file gives 2 outputs, PyTorch 1' for both exporters."""
    with pytest.raises(ExportError, match=r"output 1 of the model is a Python int \(2; a size "
                                          r"such as x.shape\[0\]\?\), not a tensor"):
        export_onnx(_CountsToo(), (torch.randn(2, 4),), tmp_path / "m.onnx")
    assert not (tmp_path / "m.onnx").exists()


def test_an_input_given_whole_with_every_batch_has_no_batch_axis(tmp_path):
    """A per-class bias (3,) beside features (16, 8): its dim 0 was taken for the batch, the
    features were resized to its size for the export, which then blamed them."""
    from mesimp_compress.inputs import observed_axes

    x, bias = torch.zeros(16, 8), torch.zeros(3)
    assert default_dynamic_axes((x, bias)) == [{0: "batch"}, {}]
    # equal to the batch in the example by chance: the other batches tell
    assert default_dynamic_axes((x[:3], bias)) == [{0: "batch"}, {0: "batch"}]
    assert observed_axes((x[:3], bias), [(x, bias), (x[:5], bias)]) == [{0: "batch"}, {}]
    # given first, on a tie of one input each the example alone cannot tell; batches can
    assert observed_axes((bias, x), [(bias, x[:5])]) == [{}, {0: "batch"}]
    assert default_dynamic_axes((bias, x, x)) == [{}, {0: "batch"}, {0: "batch"}]
    with pytest.raises(ShapeError, match="inputs 0 and 1 share the dynamic axis 'batch' but "
                                         "have sizes 16 and 3"):
        export_onnx(nn.Linear(8, 3), (x, bias), tmp_path / "m.onnx",
                    dynamic_axes=[{0: "batch"}, {0: "batch"}])


def test_time_major_inputs_have_their_batch_at_dim_1_and_lengths_at_dim_0():
    from mesimp_compress.batches import batch_size
    from mesimp_compress.inputs import observed_axes

    feats, ids, lengths = torch.zeros(9, 2, 5), torch.zeros(9, 2, dtype=torch.long), torch.ones(2)
    mask = torch.zeros(9, 2, dtype=torch.bool)
    assert default_dynamic_axes((feats, ids, mask, lengths), batch_dim=1) == [
        {1: "batch"}, {1: "batch", 0: "seq"}, {1: "batch", 0: "seq"}, {0: "batch"}]
    assert batch_size((feats, ids), 1) == 2 and batch_size((lengths,), 1) == 2
    assert batch_size((feats,)) == 9
    # explicit even when nothing varies (the defaults are batch-first); a length that varies
    # between batches is the sequence
    assert observed_axes((feats,), [(torch.zeros(9, 4, 5),)], batch_dim=1) == [{1: "batch"}]
    assert observed_axes((feats,), [(torch.zeros(6, 4, 5),)], batch_dim=1) == [
        {1: "batch", 0: "seq"}]
    small = resize_inputs((feats, lengths), 1, axes=default_dynamic_axes((feats, lengths), 1))
    assert small[0].shape == (9, 1, 5) and small[1].shape == (1,)


def test_a_resize_that_would_not_fit_in_memory_is_a_config_error(monkeypatch):
    """mesimp bench --batch 100000000 was killed by the kernel (exit 137, 'Killed')."""
    from mesimp_compress import inputs

    monkeypatch.setattr(inputs, "_available_memory", lambda: 2**20)  # 1 MiB
    x = torch.zeros(2, 20)
    assert resize_inputs((x,), 3000)[0].shape == (3000, 20)  # 240 kB: under 1/4 of it
    with pytest.raises(ConfigError, match="inputs at batch 4000 would take 0.0 GiB, too much "
                                          "for the 0.0 GiB of memory free here"):
        resize_inputs((x,), 4000)


def test_resize_repeats_and_slices_rows_so_ids_stay_valid():
    ids = torch.tensor([[5, 6, 7], [8, 9, 0]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    big_ids, big_mask = resize_inputs((ids, mask), 5, seq=4)
    assert big_ids.shape == (5, 4) and big_mask.shape == (5, 4)
    assert big_ids.tolist() == [
        [5, 6, 7, 5],
        [8, 9, 0, 8],
        [5, 6, 7, 5],
        [8, 9, 0, 8],
        [5, 6, 7, 5],
    ]
    assert big_mask[:, :3].tolist()[:2] == mask.tolist()
    (one,) = resize_inputs((torch.arange(12.0).reshape(3, 4),), 1)
    assert one.tolist() == [[0.0, 1.0, 2.0, 3.0]]
    with pytest.raises(ConfigError):
        resize_inputs((ids,), 0)


def test_input_names_come_from_the_forward_signature():
    assert input_names_of(zoo.Tagger(), 1) == ["ids"]
    assert input_names_of(nn.Linear(2, 2), 1) == ["input"]
    assert input_names_of(nn.Linear(2, 2), 2) == ["input_0", "input_1"]


# ---------------------------------------------------------------------- dynamo exports of the zoo
def test_mlp_exports_one_file_with_a_dynamic_batch_and_matches_pytorch():
    original, _ = zoo.mlp_pair()
    r = original.result
    assert r.exporter == "dynamo" and r.fallback_reason is None
    assert list(r.path.parent.glob(f"{r.path.name}*")) == [r.path]  # no external data, no temp
    assert _dims(r.path) == {"input": ["batch", 16]}
    assert _dims(r.path, "output") == {"output": ["batch", 4]}
    assert (
        r.opset >= 18
        and r.initializers == 6
        and r.initializer_elements == 16 * 12 + 12 + 12 * 12 + 12 + 12 * 4 + 4
    )
    session = make_session(r.path)
    for batch in (1, 3, 64):
        x = torch.randn(batch, 16)
        (out,) = run_onnx(session, (x,))
        assert out.shape == (batch, 4)
        assert torch.allclose(torch.from_numpy(out), original.model(x), atol=1e-5)


def test_export_prints_nothing(capfd, tmp_path):
    capfd.readouterr()
    export_onnx(zoo.mlp(), (torch.randn(2, 16),), tmp_path / "quiet.onnx", exporter="dynamo")
    out, err = capfd.readouterr()
    assert out == "" and err == ""


def test_external_data_puts_the_weights_beside_the_file(tmp_path):
    model = nn.Sequential(nn.Linear(64, 300), nn.ReLU(), nn.Linear(300, 4)).eval()
    r = export_onnx(model, (torch.randn(2, 64),), tmp_path / "x.onnx", external_data=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.onnx", "x.onnx.data"]
    assert r.path.stat().st_size < 10_000 < r.file_bytes  # 78 k weights live in x.onnx.data
    assert check_parity(r.path, model, [(torch.randn(3, 64),)]).passed


def test_opset_is_configurable(tmp_path):
    r = export_onnx(
        zoo.mlp(), (torch.randn(2, 16),), tmp_path / "o17.onnx", opset=17, exporter="torchscript"
    )
    assert r.opset == 17
    assert onnx.load(str(r.path)).opset_import[0].version == 17


@pytest.mark.parametrize("name", ["cnn", "tagger", "encoder_layer", "bert"])
def test_zoo_exports_with_dynamic_axes_and_matches_pytorch_at_other_sizes(name):
    if name == "bert":
        pytest.importorskip("transformers")
    e = getattr(zoo, name)()
    assert e.result.exporter == "dynamo"
    onnx.checker.check_model(str(e.result.path), full_check=True)
    axes = e.axes or default_dynamic_axes(e.inputs)
    dims = _dims(e.result.path)
    for name_in, entry in zip(e.result.input_names, axes, strict=True):
        for d, label in entry.items():
            assert dims[name_in][d] == label
    batches = [resize_inputs(e.inputs, b, seq=s, axes=axes) for b, s in ((1, 3), (3, 9), (5, 4))]
    parity = check_parity(
        e.result.path, e.model, batches, label=name, input_names=e.result.input_names
    )
    assert parity.passed and all(o.max_abs < 1e-4 for o in parity.outputs)
    if name == "bert":  # last_hidden_state and pooler_output
        assert [o.name for o in parity.outputs] == ["output_0", "output_1"]


@pytest.mark.parametrize("name", ["tagger", "encoder_layer"])
def test_output_axes_that_follow_the_inputs_are_declared_symbolic(name):
    """The dynamo exporter declared the tagger's output (batch, 7, C): onnxruntime warned on
    every call at another length ("Expected shape {-1,7,C} does not match actual")."""
    e = getattr(zoo, name)()
    (dims,) = _dims(e.result.path, kind="output").values()
    assert dims[:2] == ["batch", "seq"] and isinstance(dims[2], int)
    hints = onnx.load(str(e.result.path)).graph.value_info  # inner shapes, kept if all fit
    assert bool(hints) == (name == "encoder_layer")  # the tagger's held the fixed length


# ---------------------------------------------------------------------- fallback and failure
class _DataDependent(nn.Module):
    """torch.export cannot guard on a data-dependent branch; the TorchScript tracer can."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.abs().sum() > 0:
            return self.lin(x)
        return self.lin(x) * 0


class _Eigen(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.linalg.eigvals(x @ x.transpose(-1, -2)).real


class _Outer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.first = nn.Linear(4, 4)
        self.spectrum = _Eigen()
        self.last = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.last(self.spectrum(self.first(x).unsqueeze(-1) * torch.ones(1, 1, 4)))


def test_an_opset_the_dynamo_exporter_cannot_write_falls_back_to_torchscript(tmp_path):
    events = []
    r = export_onnx(zoo.mlp(), (torch.randn(2, 16),), tmp_path / "o13.onnx", opset=13,
                    sink=events.append)
    assert r.opset == 13 and onnx.load(str(r.path)).opset_import[0].version == 13
    # torch 2.13's dynamo exporter writes opset 18 when it cannot convert down
    assert r.exporter == "torchscript"
    assert re.search(r"wrote opset \d+, not the requested 13", r.fallback_reason)
    assert [e.kind for e in events if e.kind == "export_fallback"] == ["export_fallback"]
    assert [p.name for p in tmp_path.iterdir()] == ["o13.onnx"]


def test_dynamo_failure_falls_back_to_torchscript_and_says_so(tmp_path):
    events = []
    model = _DataDependent().eval()
    r = export_onnx(model, (torch.randn(2, 8),), tmp_path / "dd.onnx", sink=events.append)
    assert r.exporter == "torchscript"
    assert r.fallback_reason.startswith("dynamo exporter failed:")
    # torch's TracerWarning, kept off the screen, says where the trace froze the branch
    assert re.search(r"froze the example's path .*\(test_export\.py:\d+\)", r.fallback_reason)
    assert [e.kind for e in events][-1] == "export_fallback"
    assert _dims(r.path) == {"x": ["batch", 8]}
    assert check_parity(r.path, model, [(torch.randn(5, 8),)]).passed


def test_export_failing_in_both_exporters_names_the_module_and_leaves_no_file(tmp_path):
    target = tmp_path / "bad.onnx"
    with pytest.raises(ExportError) as info:
        export_onnx(_Outer().eval(), (torch.randn(3, 4),), target)
    message = str(info.value)
    assert "in module 'spectrum' (_Eigen)" in message
    assert "dynamo:" in message and "torchscript:" in message and "linalg_eig" in message
    assert "\n" not in message
    assert list(tmp_path.iterdir()) == []


def test_bad_arguments_are_typed_errors(tmp_path):
    with pytest.raises(ConfigError, match="exporter must be one of"):
        export_onnx(zoo.mlp(), (torch.randn(2, 16),), tmp_path / "x.onnx", exporter="tf")
    with pytest.raises(ShapeError, match=r"failed on the example inputs \(2, 15\)"):
        export_onnx(zoo.mlp(), (torch.randn(2, 15),), tmp_path / "x.onnx", exporter="torchscript")
    with pytest.raises(ShapeError, match="not a tensor"):
        export_onnx(zoo.mlp(), ([1.0],), tmp_path / "x.onnx")
    with pytest.raises(ConfigError, match="1 entries for 2 inputs"):
        export_onnx(
            zoo.Tagger(),
            (torch.ones(2, 3, dtype=torch.long),) * 2,
            tmp_path / "x.onnx",
            dynamic_axes=[{0: "batch"}],
        )


def test_export_keeps_the_training_flag(tmp_path):
    model = zoo.mlp().train()
    export_onnx(model, (torch.randn(2, 16),), tmp_path / "t.onnx", exporter="torchscript")
    assert model.training


class FixedFeatures(nn.Module):
    """Five categorical features, embedded and flattened: the '2-D integer' length is fixed."""

    def __init__(self) -> None:
        super().__init__()
        self.emb, self.out = nn.Embedding(10, 3), nn.Linear(15, 2)

    def forward(self, ids):
        return self.out(self.emb(ids).flatten(1))


class Masked(nn.Module):
    """Token ids with a bool padding mask, as nn.TransformerEncoder takes it."""

    def __init__(self) -> None:
        super().__init__()
        self.emb, self.out = nn.Embedding(10, 4), nn.Linear(4, 2)

    def forward(self, ids, pad):
        h = self.emb(ids).masked_fill(pad.unsqueeze(-1), 0.0)
        return self.out(h.sum(1))


@pytest.mark.parametrize("exporter", ["torchscript", "dynamo"])
def test_a_guessed_sequence_axis_the_model_lacks_is_kept_fixed(tmp_path, exporter):
    events = []
    ids = torch.randint(0, 10, (2, 5))
    result = export_onnx(FixedFeatures().eval(), (ids,), tmp_path / "f.onnx",
                         exporter=exporter, sink=events.append)
    assert result.dynamic_axes == {"ids": {0: "batch"}}
    fallback = [e.data["reason"] for e in events if e.kind == "export_fallback"]
    assert fallback and "the sequence axis is kept fixed" in fallback[0]
    assert "once its seq axis grew by one" in fallback[0] or exporter == "dynamo"
    assert result.fallback_reason.startswith(fallback[0])  # and report.json says it
    with pytest.raises(ExportError):  # axes the caller names are never changed behind them
        export_onnx(FixedFeatures().eval(), (ids,), tmp_path / "g.onnx", exporter=exporter,
                    dynamic_axes=[{0: "batch", 1: "seq"}])


def test_ids_and_their_bool_mask_share_the_sequence_axis(tmp_path):
    ids, pad = torch.randint(0, 10, (2, 7)), torch.zeros(2, 7, dtype=torch.bool)
    result = export_onnx(Masked().eval(), (ids, pad), tmp_path / "m.onnx",
                         exporter="torchscript")
    assert result.dynamic_axes == {"ids": {0: "batch", 1: "seq"}, "pad": {0: "batch", 1: "seq"}}


class _StackedTagger(nn.Module):
    """Embedding -> 2-layer LSTM -> LSTM -> Linear: the dynamo exporter declared the length
    dynamic yet baked the example's length into a Reshape."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(20, 5)
        self.lstm = nn.LSTM(5, 10, num_layers=2, batch_first=True)
        self.lstm2 = nn.LSTM(10, 10, batch_first=True)
        self.out = nn.Linear(10, 4)

    def forward(self, x):
        return self.out(self.lstm2(self.lstm(self.emb(x))[0])[0])


def test_an_exported_file_runs_at_other_lengths_than_the_example(tmp_path):
    torch.manual_seed(0)
    model = _StackedTagger().eval()
    export_onnx(model, (torch.randint(0, 20, (6, 3)),), tmp_path / "t.onnx")
    session = make_session(tmp_path / "t.onnx")
    for shape in ((3, 6), (1, 2), (8, 4)):
        ids = torch.randint(0, 20, shape)
        (got,) = run_onnx(session, (ids,))
        with torch.no_grad():
            torch.testing.assert_close(torch.from_numpy(got), model(ids), atol=1e-5, rtol=1e-4)


class _Positions(nn.Module):
    """Token ids plus a table of 8 positions: any length up to 8 is valid, 9 is not."""

    def __init__(self) -> None:
        super().__init__()
        self.tok, self.pos = nn.Embedding(20, 6), nn.Embedding(8, 6)
        self.out = nn.Linear(6, 3)

    def forward(self, ids):
        return self.out(self.tok(ids) + self.pos(torch.arange(ids.shape[1])))


def test_an_example_at_a_position_tables_length_keeps_the_length_dynamic(tmp_path):
    torch.manual_seed(0)
    model = _Positions().eval()
    result = export_onnx(model, (torch.randint(0, 20, (2, 8)),), tmp_path / "p.onnx")
    assert result.dynamic_axes == {"ids": {0: "batch", 1: "seq"}}
    ids = torch.randint(0, 20, (3, 5))  # shorter than the example: the file takes it
    (got,) = run_onnx(make_session(tmp_path / "p.onnx"), (ids,))
    with torch.no_grad():
        torch.testing.assert_close(torch.from_numpy(got), model(ids), atol=1e-5, rtol=1e-4)


class PooledToFour(nn.Module):
    """Adaptive pooling to 4 positions: the exporters bake the windows of the traced length."""

    def __init__(self, tokens: bool = False) -> None:
        super().__init__()
        self.emb = nn.Embedding(10, 3) if tokens else None
        self.conv = nn.Conv1d(3, 4, 3, padding=1)
        self.out = nn.Linear(16, 2)

    def forward(self, x):
        if self.emb is not None:
            x = self.emb(x).transpose(1, 2)
        return self.out(F.adaptive_avg_pool1d(self.conv(x), 4).flatten(1))


def test_an_axis_the_file_follows_in_shape_but_not_in_value_is_refused(tmp_path):
    torch.manual_seed(0)
    with pytest.raises(ExportError, match=r"resized to \(3, 3, 13\).*so that axis cannot vary"):
        export_onnx(PooledToFour().eval(), (torch.randn(2, 3, 12),), tmp_path / "p.onnx",
                    dynamic_axes=[{0: "batch", 2: "seq"}])
    assert not (tmp_path / "p.onnx").exists()


def test_a_guessed_sequence_axis_followed_only_in_shape_is_kept_fixed(tmp_path):
    torch.manual_seed(0)
    model = PooledToFour(tokens=True).eval()
    ids = torch.randint(0, 10, (2, 12))
    result = export_onnx(model, (ids,), tmp_path / "p.onnx")
    assert result.dynamic_axes == {"x": {0: "batch"}}
    assert "the sequence axis is kept fixed" in result.fallback_reason
    assert "computes with the size of a dynamic axis" in result.fallback_reason
    session = make_session(result.path)
    more = torch.randint(0, 10, (5, 12))
    got = run_onnx(session, (more,), result.input_names)[0]
    with torch.no_grad():
        np.testing.assert_allclose(got, model(more).numpy(), rtol=1e-5, atol=1e-6)


class DynamicCache:
    """Stands for Hugging Face's key/value cache object, which no exporter can return."""


class _Cached(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 2)
        self.config = type("Config", (), {"use_cache": True})()

    def forward(self, x):
        return self.fc(x), DynamicCache()


def test_a_model_returning_its_cache_is_told_to_turn_it_off(tmp_path):
    with pytest.raises(ExportError, match=r"set model.config.use_cache = False$"):
        export_onnx(_Cached(), (torch.randn(2, 4),), tmp_path / "cached.onnx")


def test_ctrl_c_inside_a_lazy_import_of_the_exporter_is_not_a_fallback(tmp_path, monkeypatch):
    from mesimp_compress import export

    def half_imported(job, path):  # what a Ctrl-C during `import torch._dynamo` leaves
        try:
            raise KeyboardInterrupt
        except KeyboardInterrupt:
            raise AttributeError("partially initialized module 'torch._dynamo' has no "
                                 "attribute 'exc'") from None

    monkeypatch.setitem(export._EXPORT, "dynamo", half_imported)
    with pytest.raises(KeyboardInterrupt):
        export_onnx(zoo.mlp(), (torch.randn(2, 16),), tmp_path / "m.onnx")
    assert list(tmp_path.iterdir()) == []


def test_torch_internal_trace_constants_are_not_reported(tmp_path):
    from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

    class Packed(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lstm = nn.LSTM(4, 6, batch_first=True)

        def forward(self, x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
            packed = pack_padded_sequence(x, lengths, batch_first=True, enforce_sorted=False)
            return pad_packed_sequence(self.lstm(packed)[0], batch_first=True,
                                       total_length=x.shape[1])[0]

    r = export_onnx(Packed().eval(), (torch.randn(3, 5, 4), torch.tensor([5, 3, 2])),
                    tmp_path / "p.onnx", exporter="torchscript")
    assert r.fallback_reason is None
