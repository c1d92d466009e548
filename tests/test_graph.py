"""Structure analysis: the groups found, their member positions, and why layers are left alone."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from test_surgery_zoo import CASE_IDS, CASES, Case
from torch import nn

from mesimp_compress.errors import DataError
from mesimp_compress.graph import Structure, find_groups
from mesimp_compress.plan import make_plan
from mesimp_compress.surgery import apply_plan, zero_removed

torch.set_num_threads(1)


def groups_of(case: Case, **kwargs) -> Structure:
    return find_groups(case.build(), case.example(), allow_residual=case.allow_residual, **kwargs)


def case(name: str) -> Case:
    return CASES[CASE_IDS.index(name)]


def members(structure: Structure, key: str) -> dict[tuple[str, str], tuple]:
    return {(m.module, m.role): m for m in structure.groups[key].members}


@pytest.mark.parametrize("entry", CASES, ids=CASE_IDS)
def test_every_zoo_structure_yields_its_prunable_keys(entry: Case) -> None:
    structure = groups_of(entry)
    assert tuple(structure.groups) == entry.keys
    for key in entry.keys:
        group = structure.groups[key]
        assert group.width >= 2
        for member in group.members:
            assert len(member.positions) == group.width
            flat = [p for unit in member.positions for p in unit]
            assert len(flat) == len(set(flat)) and all(0 <= p < member.size for p in flat)


def test_linear_chain_members_and_output_layer() -> None:
    structure = groups_of(case("sequential"))
    m = members(structure, "0")
    assert set(m) == {("0", "out"), ("2", "in")}
    assert m[("2", "in")].positions == tuple((u,) for u in range(9))
    assert m[("2", "in")].attr == "in_features" and m[("0", "out")].attr == "out_features"
    assert "model output" in structure.reason("4")


def test_conv_bn_conv_and_flatten_blocks() -> None:
    structure = groups_of(case("convnet"))
    conv1 = members(structure, "conv1")
    assert set(conv1) == {("conv1", "out"), ("bn1", "features"), ("conv2", "in")}
    assert conv1[("bn1", "features")].attr == "num_features"
    # conv2 -> relu -> 2x2 max-pool over 4x4 -> flatten: channel c is features 4c..4c+3 of fc
    fc_in = members(structure, "conv2")[("fc", "in")]
    assert fc_in.size == 20
    assert fc_in.positions == tuple(tuple(range(4 * c, 4 * c + 4)) for c in range(5))


def test_concat_maps_each_branch_to_its_offset() -> None:
    structure = groups_of(case("branches"))
    assert members(structure, "a")[("head", "in")].positions == tuple((u,) for u in range(5))
    assert members(structure, "b")[("head", "in")].positions == tuple((9 + u,) for u in range(6))


def test_residual_stream_is_left_alone_with_a_reason() -> None:
    structure = find_groups(case("residual").build(), case("residual").example())
    assert set(structure.groups) == {"block1"}
    for key, other in (("stem", "block2"), ("block2", "stem")):
        reason = structure.reason(key)
        assert "residual stream" in reason and other in reason


def test_allow_residual_merges_every_writer_of_the_stream() -> None:
    structure = groups_of(case("residual"))
    stream = structure.groups["stem"]
    assert stream.writers == ("stem", "block2")
    assert set(members(structure, "stem")) == {
        ("stem", "out"),
        ("block2", "out"),
        ("block1", "in"),
        ("head", "in"),
    }


def test_a_gate_makes_one_group_of_its_two_writers_by_default() -> None:
    """SwiGLU: gate and up meet in a product, not on a stream: pruned together, no flag."""
    structure = find_groups(case("gated_ffn").build(), case("gated_ffn").example())
    assert set(structure.groups) == {"gate"}
    assert structure.groups["gate"].writers == ("gate", "up")
    assert set(members(structure, "gate")) == {("gate", "out"), ("up", "out"), ("down", "in")}
    assert "no prunable layer produces" in structure.reason("down")  # the stream stays


class SqueezeExcite(nn.Module):
    """conv1's channels scaled by an SE branch (fc2's outputs), then read by conv2; no skip."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.fc1 = nn.Linear(8, 4)
        self.fc2 = nn.Linear(4, 8)
        self.conv2 = nn.Conv2d(8, 5, 3)
        self.head = nn.Linear(5, 2)

    def forward(self, x):
        h = torch.relu(self.conv1(x))
        scale = torch.sigmoid(self.fc2(torch.relu(self.fc1(h.mean((2, 3))))))
        h = self.conv2(h * scale[:, :, None, None])
        return self.head(h.mean((2, 3)))


def test_squeeze_and_excitation_gates_the_channels_it_scales() -> None:
    model = SqueezeExcite().eval()
    x = torch.randn(2, 3, 6, 6)
    structure = find_groups(model, x)
    assert structure.groups["conv1"].writers == ("conv1", "fc2")
    assert set(members(structure, "conv1")) == {
        ("conv1", "out"), ("fc2", "out"), ("fc1", "in"), ("conv2", "in")
    }
    assert "fc1" in structure.groups  # the squeeze's hidden units are a group of their own
    plan = make_plan(structure, {"conv1": [0, 2, 3, 5, 7], "fc1": [1, 3], "conv2": [0, 1, 4]})
    masked = copy.deepcopy(model)
    zero_removed(masked, plan)
    apply_plan(model, plan)
    assert model.conv1.out_channels == model.fc2.out_features == model.fc1.in_features == 5
    with torch.no_grad():
        torch.testing.assert_close(model(x), masked(x), rtol=1e-5, atol=1e-6)


def test_lstm_groups_gates_tied_and_bidirectional_halves() -> None:
    structure = groups_of(case("tagger"))
    keys = ("lstm.l0", "lstm.l0_reverse", "lstm.l1", "lstm.l1_reverse")
    for key in keys:
        assert structure.groups[key].tied == keys
        assert structure.groups[key].width == 7
    assert structure.tied_sets() == [keys]
    assert members(structure, "lstm.l0") == {
        ("lstm", "hidden:l0"): structure.groups["lstm.l0"].members[0]
    }
    # the last layer's halves: forward units are features 0..6 of `out`, reverse 7..13
    assert members(structure, "lstm.l1")[("out", "in")].positions == tuple((u,) for u in range(7))
    rev = members(structure, "lstm.l1_reverse")[("out", "in")].positions
    assert rev == tuple((7 + u,) for u in range(7))
    assert members(structure, "proj")[("lstm", "in")].attr == "input_size"


def test_lstm_final_states_are_followed_through_indexing() -> None:
    structure = groups_of(case("last_state"))
    fwd = members(structure, "lstm.l1")[("fc", "in")].positions
    rev = members(structure, "lstm.l1_reverse")[("fc", "in")].positions
    assert fwd == tuple((u,) for u in range(6)) and rev == tuple((6 + u,) for u in range(6))
    assert ("fc", "in") not in members(structure, "lstm.l0")


def test_transformer_encoder_layer_ffn_only() -> None:
    structure = groups_of(case("transformer"))
    assert set(members(structure, "layer.linear1")) == {
        ("layer.linear1", "out"),
        ("layer.linear2", "in"),
    }
    assert "no prunable layer produces" in structure.reason("layer.linear2")
    assert "MultiheadAttention" in structure.reason("layer.self_attn.out_proj")


def test_bert_ffn_only_and_attention_reported() -> None:
    structure = groups_of(case("bert"))
    ffn = members(structure, "encoder.layer.1.intermediate.dense")
    assert set(ffn) == {
        ("encoder.layer.1.intermediate.dense", "out"),
        ("encoder.layer.1.output.dense", "in"),
    }
    assert "attention" in structure.reason("encoder.layer.0.attention.self.query")
    assert structure.reason("encoder.layer.0.output.dense") is not None
    assert "model output" in structure.reason("pooler.dense")


def test_a_depthwise_convolution_follows_the_channels_it_reads() -> None:
    model = case("inverted_residual").build()
    x = case("inverted_residual").example()
    structure = find_groups(model, x)
    assert [(m.module, m.role) for m in structure.groups["expand"].members] == [
        ("expand", "out"), ("bn1", "features"), ("dw", "features"), ("bn2", "features"),
        ("project", "in")]
    assert "dw" not in {s.name for s in structure.skipped}  # pruned with 'expand'
    plan = make_plan(structure, {"expand": [1, 4, 5, 10]})
    masked = copy.deepcopy(model)
    zero_removed(masked, plan)
    apply_plan(model, plan)
    dw = model.dw
    assert (dw.in_channels, dw.out_channels, dw.groups, tuple(dw.weight.shape)) == (
        4, 4, 4, (4, 1, 3, 3))
    with torch.no_grad():
        torch.testing.assert_close(model(x), masked(x), rtol=1e-5, atol=1e-6)


class DepthMultiplier(nn.Module):
    """A grouped convolution with two filters per channel, and a depthwise one after a layer
    that is left alone (the output layer reads it too)."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 4, 1), nn.Conv2d(3, 4, 1)
        self.twice = nn.Conv2d(4, 8, 3, groups=4)
        self.dw = nn.Conv2d(4, 4, 3, groups=4)
        self.out = nn.Conv2d(12, 2, 1)

    def forward(self, x):
        b = self.b(x)
        return self.out(torch.cat([self.twice(self.a(x)), self.dw(b)], 1)).mean((2, 3)) + (
            b.mean((1, 2, 3)).unsqueeze(1))


def test_other_grouped_convolutions_and_what_they_read_are_left_alone() -> None:
    structure = find_groups(DepthMultiplier(), torch.randn(2, 3, 5, 5))
    assert "consumed by grouped convolution 'twice'" in structure.reason("a")
    assert "grouped convolution (groups=4)" in structure.reason("twice")
    assert "depthwise convolution: no units of its own" in structure.reason("dw")
    assert structure.reason("b") is not None and "dw" not in structure.groups


class SharedUse(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 4)
        self.b = nn.Linear(4, 6)
        self.c = nn.Linear(6, 2)

    def forward(self, x):
        return self.c(F.relu(self.b(self.a(F.relu(self.a(x))))))


class Tied(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 5)
        self.b = nn.Linear(5, 5)
        self.c = nn.Linear(5, 5)
        self.c.weight = self.b.weight  # tied
        self.out = nn.Linear(5, 2)

    def forward(self, x):
        return self.out(F.relu(self.c(F.relu(self.b(F.relu(self.a(x)))))))


def test_a_layer_reading_other_units_on_another_call_is_left_alone() -> None:
    """'a' reads the input, then its own units: its width cannot change."""
    structure = find_groups(SharedUse(), torch.randn(2, 4))
    assert "'a', which is called 2 times and does not read the same units" in (
        structure.reason("a"))
    assert set(structure.groups) == {"b"}


class Siamese(nn.Module):
    """One encoder applied to two inputs, its two outputs concatenated for the head."""

    def __init__(self) -> None:
        super().__init__()
        self.enc = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 5), nn.ReLU())
        self.head = nn.Linear(10, 2)

    def forward(self, a, b):
        return self.head(torch.cat([self.enc(a), self.enc(b)], -1))


class SharedHead(nn.Module):
    """One head over two different encoders: 'a' and 'b' would have to lose the same units."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.mid = nn.Linear(4, 6), nn.Linear(4, 6), nn.Linear(4, 6)
        self.head = nn.Linear(6, 2)

    def forward(self, x):
        return self.head(F.relu(self.a(x))) + self.head(F.relu(self.b(x)))


class Looped(nn.Module):
    """A two-layer block applied three times: its hidden units read the same way each time."""

    def __init__(self) -> None:
        super().__init__()
        self.inp, self.fc1, self.fc2 = nn.Linear(4, 5), nn.Linear(5, 7), nn.Linear(7, 5)
        self.out = nn.Linear(5, 2)

    def forward(self, x):
        h = self.inp(x)
        for _ in range(3):
            h = torch.tanh(self.fc2(F.relu(self.fc1(h))))
        return self.out(h)


def test_a_module_called_on_each_input_prunes_once_for_every_call() -> None:
    torch.manual_seed(0)
    model = Siamese().eval()
    x = (torch.randn(3, 4), torch.randn(3, 4))
    structure = find_groups(model, x)
    assert set(structure.groups) == {"enc.0", "enc.2"}
    head = members(structure, "enc.2")[("head", "in")]
    assert head.positions == tuple((u, u + 5) for u in range(5))  # both halves of the concat
    assert [m.role for m in structure.groups["enc.0"].members] == ["out", "in"]  # one record
    plan = make_plan(structure, {"enc.0": [1, 4], "enc.2": [0, 2, 3]})
    masked = copy.deepcopy(model)
    zero_removed(masked, plan)
    apply_plan(model, plan)
    assert (model.enc[0].out_features, model.enc[2].in_features) == (2, 2)
    assert (model.enc[2].out_features, model.head.in_features) == (3, 6)
    with torch.no_grad():
        torch.testing.assert_close(model(*x), masked(*x), rtol=1e-5, atol=1e-6)


def test_a_block_applied_in_a_loop_prunes_its_hidden_units() -> None:
    torch.manual_seed(0)
    model = Looped().eval()
    x = torch.randn(3, 4)
    structure = find_groups(model, x)
    assert set(structure.groups) == {"fc1"}
    assert "'fc1', which is called 3 times" in structure.reason("inp")  # x, then fc2's units
    assert "'fc1', which is called 3 times" in structure.reason("fc2")
    plan = make_plan(structure, {"fc1": [0, 3, 6]})
    masked = copy.deepcopy(model)
    zero_removed(masked, plan)
    apply_plan(model, plan)
    assert (model.fc1.out_features, model.fc2.in_features) == (3, 3)
    with torch.no_grad():
        torch.testing.assert_close(model(x), masked(x), rtol=1e-5, atol=1e-6)


class FlippedRead(nn.Module):
    """'s' reads the encoder's units in order on one call and reversed on the other."""

    def __init__(self) -> None:
        super().__init__()
        self.enc, self.s, self.head = nn.Linear(4, 6), nn.Linear(6, 5), nn.Linear(10, 2)

    def forward(self, a, b):
        return self.head(torch.cat([self.s(F.relu(self.enc(a))),
                                    self.s(F.relu(self.enc(b)).flip(-1))], -1))


def test_a_module_reading_the_same_units_in_another_order_leaves_them_alone() -> None:
    structure = find_groups(FlippedRead(), (torch.randn(3, 4), torch.randn(3, 4)))
    assert "'s', which is called 2 times and does not read the same units" in (
        structure.reason("enc"))
    assert set(structure.groups) == {"s"}


class Aliased(nn.Module):
    """One Linear registered twice (the ``[block] * 2`` idiom), one name per branch."""

    def __init__(self) -> None:
        super().__init__()
        shared = nn.Linear(4, 6)
        self.branches = nn.ModuleList([shared, shared])
        self.head = nn.Linear(12, 2)

    def forward(self, a, b):
        return self.head(F.relu(torch.cat([self.branches[0](a), self.branches[1](b)], -1)))


def test_a_module_registered_under_two_names_is_shared_not_tied() -> None:
    torch.manual_seed(0)
    model = Aliased().eval()
    x = (torch.randn(3, 4), torch.randn(3, 4))
    structure = find_groups(model, x)
    assert set(structure.groups) == {"branches.0"}
    assert members(structure, "branches.0")[("head", "in")].positions == tuple(
        (u, u + 6) for u in range(6))
    plan = make_plan(structure, {"branches.0": [0, 3, 4]})
    masked = copy.deepcopy(model)
    zero_removed(masked, plan)
    apply_plan(model, plan)
    assert model.branches[1].out_features == 3 and model.head.in_features == 6
    with torch.no_grad():
        torch.testing.assert_close(model(*x), masked(*x), rtol=1e-5, atol=1e-6)


class LoopedResidual(nn.Module):
    """A block applied three times on a residual stream, the add written either way."""

    def __init__(self, stream_first: bool) -> None:
        super().__init__()
        self.stream_first = stream_first
        self.pre = nn.Linear(4, 6)
        self.blk = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 6))
        self.head = nn.Linear(6, 2)

    def forward(self, x):
        h = self.pre(x)
        for _ in range(3):
            h = h + self.blk(h) if self.stream_first else self.blk(h) + h
        return self.head(F.relu(h))


@pytest.mark.parametrize("stream_first", [True, False], ids=["h+blk(h)", "blk(h)+h"])
def test_a_looped_residual_block_prunes_its_stream_whichever_way_the_add_is_written(
        stream_first) -> None:
    """With ``blk(h) + h`` the second call reads the stream as blk.2 wrote it: one index set
    with pre's (allow_residual), so the same units, and one member for blk.0's input."""
    torch.manual_seed(0)
    model = LoopedResidual(stream_first).eval()
    x = torch.randn(3, 4)
    structure = find_groups(model, x, allow_residual=True)
    assert set(structure.groups) == {"pre", "blk.0"}
    assert [(m.module, m.role) for m in structure.groups["pre"].members] == [
        ("pre", "out"), ("blk.2", "out"), ("blk.0", "in"), ("head", "in")]
    plan = make_plan(structure, {"pre": [0, 2, 5], "blk.0": [1, 2, 6]})
    masked = copy.deepcopy(model)
    zero_removed(masked, plan)
    apply_plan(model, plan)
    assert (model.blk[0].in_features, model.blk[2].out_features, model.head.in_features) == (
        3, 3, 3)
    with torch.no_grad():
        torch.testing.assert_close(model(x), masked(x), rtol=1e-5, atol=1e-6)


def test_a_module_reading_two_producers_leaves_both_alone() -> None:
    structure = find_groups(SharedHead(), torch.randn(3, 4))
    assert set(structure.groups) == set()
    for key in ("a", "b"):
        assert "'head', which is called 2 times" in structure.reason(key)
    assert "not called as a module" in structure.reason("mid")


def test_tied_parameters_are_not_pruned_nor_what_they_read() -> None:
    structure = find_groups(Tied(), torch.randn(2, 4))
    assert "tied to 'c.weight'" in structure.reason("b")
    assert "tied to 'b.weight'" in structure.reason("c")
    assert "read by 'b'" in structure.reason("a")  # a's units feed a tied layer
    assert structure.groups == {}


class Opaque(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 6)
        self.mix = nn.Parameter(torch.randn(6, 6))
        self.norm_src = nn.Linear(4, 6)
        self.norm = nn.LayerNorm(6)
        self.heads = nn.Linear(4, 6)
        self.out = nn.Linear(6, 2)

    def forward(self, x):
        a = F.relu(self.fc(x)) @ self.mix
        b = self.norm(self.norm_src(x))
        c = self.heads(x).view(-1, 2, 3).softmax(-1).reshape(-1, 6)
        return self.out(a + b + c)


def test_unknown_ops_leave_units_alone_and_name_the_op() -> None:
    structure = find_groups(Opaque(), torch.randn(3, 4))
    assert "'matmul'" in structure.reason("fc")
    assert "normalises across the units" in structure.reason("norm_src")
    assert "'softmax'" in structure.reason("heads")
    assert structure.groups == {}


class Gated(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.up = nn.Linear(4, 6)
        self.gru = nn.GRU(6, 5)
        self.out = nn.Linear(5, 2)

    def forward(self, x):
        h, _ = self.gru(torch.relu(self.up(x)))
        return self.out(h)


def test_unsupported_layer_kinds_are_reported() -> None:
    structure = find_groups(Gated(), torch.randn(3, 2, 4))
    assert "GRU is not supported" in structure.reason("gru")
    assert "op 'gru' is not understood" in structure.reason("up")
    assert structure.groups == {}


class Cells(nn.Module):
    """Layers with units of their own run step by step or on two inputs."""

    def __init__(self) -> None:
        super().__init__()
        self.up = nn.Linear(4, 6)
        self.bil = nn.Bilinear(6, 6, 5)
        self.cell = nn.LSTMCell(5, 7)
        self.gru_cell = nn.GRUCell(7, 3)
        self.out = nn.Linear(3, 2)

    def forward(self, x):
        u = torch.relu(self.bil(*(torch.relu(self.up(x)),) * 2))
        h, _ = self.cell(u)
        return self.out(self.gru_cell(h))


def test_cells_and_bilinear_layers_are_reported_as_unsupported() -> None:
    structure = find_groups(Cells(), torch.randn(3, 4))
    for name, kind in (("bil", "Bilinear"), ("cell", "LSTMCell"), ("gru_cell", "GRUCell")):
        assert structure.reason(name) == f"layer kind {kind} is not supported"
    assert "op 'bilinear' is not understood" in structure.reason("up")
    assert structure.groups == {}


class ExplicitState(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lstm = nn.LSTM(3, 4)
        self.fc = nn.Linear(4, 5)
        self.out = nn.Linear(5, 2)

    def forward(self, x):
        h0 = torch.zeros(1, x.shape[1], 4)
        y, _ = self.lstm(x, (h0, h0))
        return self.out(torch.relu(self.fc(y)))


def test_lstm_with_explicit_initial_state_is_left_alone() -> None:
    structure = find_groups(ExplicitState(), torch.randn(5, 2, 3))
    assert "explicit initial state" in structure.reason("lstm.l0")
    assert set(structure.groups) == {"fc"}


class Wrapped(nn.Linear):
    """Stands in for a meProp wrapper: a subclass sharing nn.Linear's parameters."""

    def forward(self, x):
        return super().forward(x)


def test_subclassed_layers_and_exclusion() -> None:
    model = nn.Sequential(Wrapped(4, 6), nn.ReLU(), Wrapped(6, 5), nn.ReLU(), nn.Linear(5, 2))
    structure = find_groups(model, torch.randn(2, 4), exclude=["2"])
    assert set(structure.groups) == {"0"} and structure.groups["0"].kind == "Linear"
    assert structure.reason("2") == "excluded by name"


def test_tracing_restores_modes_and_statistics() -> None:
    model = case("convnet").build().train()
    before = model.bn1.running_mean.clone()
    find_groups(model, case("convnet").example())
    assert model.training and model.bn1.training
    assert torch.equal(model.bn1.running_mean, before)


def test_a_failing_forward_raises_data_error_naming_the_module() -> None:
    model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(7, 2))
    with pytest.raises(DataError, match="'2'"):
        find_groups(model, torch.randn(2, 4))


class ChannelsLast(nn.Module):
    """Permute to channels-last, a per-position MLP over channels, pad, global pooling."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 5, 3)
        self.mix = nn.Linear(5, 6)
        self.conv2 = nn.Conv2d(6, 4, 1)
        self.fc = nn.Linear(4, 3)
        self.out = nn.Linear(2, 2)

    def forward(self, x):
        h = F.relu(self.conv(x)).permute(0, 2, 3, 1)[:, 1:, ::2]  # positions only
        h = F.relu(self.mix(h)).transpose(1, 3).transpose(2, 3)
        h = F.pad(torch.relu(self.conv2(h)), (1, 1, 1, 1))[..., :-1, :]
        h = F.relu(self.fc(h.mean(dim=(2, 3))))
        return self.out(h[:, 1:])  # a fixed slice of fc's units: fc is left alone


class Refused(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.glu = nn.Linear(3, 8)
        self.batch = nn.Linear(3, 3)
        self.mixer = nn.Linear(3, 3)
        self.padded = nn.Linear(3, 4)
        self.reader = nn.Linear(4, 6)
        self.out = nn.Linear(4 + 3 + 6, 2)

    def forward(self, x):
        a, b = self.glu(x).chunk(2, dim=-1)
        gated = a * torch.sigmoid(b)  # units i and i+4 of one layer meet
        stacked = self.mixer(torch.cat([self.batch(x), x], dim=0))  # x rows read batch's columns
        stacked = stacked[: x.shape[0]] + stacked[x.shape[0] :]
        # a row of ones read through the units' columns
        padded = self.reader(F.pad(self.padded(x), (0, 0, 1, 0), value=1.0))[1:]
        return self.out(torch.cat([gated, stacked, padded], dim=-1))


def test_permute_pad_pooling_and_slicing_are_followed_exactly() -> None:
    from mesimp_compress.plan import make_plan
    from mesimp_compress.surgery import apply_plan, zero_removed

    torch.manual_seed(0)
    model = ChannelsLast().eval()
    x = torch.randn(2, 2, 5, 5)
    structure = find_groups(model, x)
    assert set(structure.groups) == {"conv", "mix", "conv2"}
    assert "op 'getitem' takes a fixed slice" in structure.reason("fc")
    assert members(structure, "mix")[("conv2", "in")].positions == tuple((u,) for u in range(6))
    plan = make_plan(structure, {"conv": [0, 3], "mix": [1, 2, 5], "conv2": [0, 2]})
    masked = copy.deepcopy(model)
    zero_removed(masked, plan)
    apply_plan(model, plan)
    with torch.no_grad():
        assert torch.allclose(model(x), masked(x), atol=1e-6)
    assert (model.mix.in_features, model.conv2.in_channels, model.fc.in_features) == (2, 3, 2)
    assert model.out.in_features == 2


def test_couplings_that_cannot_be_rebuilt_are_refused() -> None:
    structure = find_groups(Refused(), torch.randn(2, 3))
    assert "combined with each other" in structure.reason("glu")
    assert "not its in_features" in structure.reason("batch")
    assert "not its in_features" in structure.reason("padded")
    assert set(structure.groups) == {"mixer", "reader"}


def test_hugging_face_conv1d_units_are_followed_as_a_transposed_linear() -> None:
    pytorch_utils = pytest.importorskip("transformers.pytorch_utils")

    class GPT2Mlp(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.c_fc = pytorch_utils.Conv1D(12, 4)  # (out, in): a transposed Linear
            self.c_proj = pytorch_utils.Conv1D(6, 12)
            self.head = nn.Linear(6, 2)

        def forward(self, x):  # Conv1D's input may come by its name, x
            return self.head(self.c_proj(x=torch.relu(self.c_fc(x))))

    torch.manual_seed(0)
    model = GPT2Mlp().eval()
    x = torch.randn(3, 5, 4)
    structure = find_groups(model, x)
    assert {k: g.width for k, g in structure.groups.items()} == {"c_fc": 12, "c_proj": 6}
    assert [(m.module, m.role, m.attr) for m in structure.groups["c_fc"].members] == [
        ("c_fc", "out", "nf"), ("c_proj", "in", "nx")]
    plan = make_plan(structure, {"c_fc": [0, 5, 7, 11], "c_proj": [1, 2, 4]})
    masked = copy.deepcopy(model)
    zero_removed(masked, plan)
    apply_plan(model, plan)
    assert (model.c_fc.nf, model.c_proj.nx, model.c_proj.nf, model.head.in_features) == (4, 4, 3, 3)
    assert tuple(model.c_fc.weight.shape) == (4, 4) and tuple(model.c_proj.weight.shape) == (4, 3)
    with torch.no_grad():
        torch.testing.assert_close(model(x), masked(x), rtol=1e-5, atol=1e-6)


class _Result:
    __slots__ = ("logits", "extra")

    def __init__(self, logits: torch.Tensor, extra: object) -> None:
        self.logits, self.extra = logits, extra


@pytest.mark.parametrize("wrap", ["namespace", "slots", "dict_items", "frozenset"])
def test_units_returned_inside_any_object_reach_the_output(wrap: str) -> None:
    from types import SimpleNamespace

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b, self.c = nn.Linear(6, 16), nn.Linear(16, 8), nn.Linear(8, 3)

        def forward(self, x: torch.Tensor) -> object:
            h = torch.relu(self.a(x))
            logits = self.c(torch.relu(self.b(h)))
            if wrap == "namespace":
                return SimpleNamespace(logits=logits, features=h)
            if wrap == "slots":
                return _Result(logits, [SimpleNamespace(features=h)])
            if wrap == "dict_items":
                return {"logits": logits, "features": h}.items()
            return frozenset([("logits", logits), ("features", h)])

    structure = find_groups(Net(), torch.randn(4, 6))
    assert sorted(structure.groups) == ["b"]  # 'a' is returned, 'c' is the output layer
    assert "reach the model output" in structure.reason("a")
