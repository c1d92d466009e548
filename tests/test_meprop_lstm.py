"""MePropLSTM against a step-by-step autograd LSTM whose BPTT is masked to the same units.

The reference runs each layer and direction as a Python loop over time. ``_Select`` sits on
a direction's outputs (sequence, h_n, c_n): its backward sees dL/d(outputs) before any step
of that direction is back-propagated and picks the units (unified or per sequence, padded
positions ignored). ``_Mask`` sits on every h_t and c_t (and h0, c0) and keeps only the
gradient of the picked units, i.e. BPTT restricted to them.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence, pad_packed_sequence

from mesimp_compress.activity import ActivityTracker
from mesimp_compress.errors import KError
from mesimp_compress.meprop import MePropLSTM

torch.set_num_threads(1)
DT = torch.float64


class _Select(torch.autograd.Function):
    @staticmethod
    def forward(ctx, box, active, out, hn, cn):
        ctx.box, ctx.active = box, active
        return out.clone(), hn.clone(), cn.clone()

    @staticmethod
    def backward(ctx, dout, dhn, dcn):
        box = ctx.box
        per_seq = (dout.abs() * ctx.active).sum(0) + dhn.abs() + dcn.abs()  # (N, H)
        if box["mode"] == "unified":
            idx = per_seq.sum(0).topk(box["k"]).indices
            mask = torch.zeros(per_seq.shape[1], dtype=DT).index_fill_(0, idx, 1.0)
            box["mask"] = mask.expand_as(per_seq)
        else:
            idx = per_seq.topk(box["k"], dim=1).indices
            box["mask"] = torch.zeros_like(per_seq).scatter_(1, idx, 1.0)
        return None, None, dout, dhn, dcn


class _Mask(torch.autograd.Function):
    @staticmethod
    def forward(ctx, box, x):
        ctx.box = box
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return None, grad * ctx.box["mask"]


def _direction(x, lengths, h, c, w_ih, w_hh, b, reverse, box):
    """One direction over padded time-major x (T, N, in); padded steps hold the state."""
    T = x.shape[0]
    h, c = _Mask.apply(box, h), _Mask.apply(box, c)
    outs = [None] * T
    for t in (range(T - 1, -1, -1) if reverse else range(T)):
        gates = x[t] @ w_ih.t() + h @ w_hh.t() + b
        i, f, g, o = gates.chunk(4, 1)
        i, f, g, o = i.sigmoid(), f.sigmoid(), g.tanh(), o.sigmoid()
        c_new = f * c + i * g
        h_new = o * c_new.tanh()
        active = (t < lengths).unsqueeze(1)
        h = _Mask.apply(box, torch.where(active, h_new, h))
        c = _Mask.apply(box, torch.where(active, c_new, c))
        outs[t] = torch.where(active, h, torch.zeros_like(h))
    active = (torch.arange(T).unsqueeze(1) < lengths).unsqueeze(2).to(DT)
    return _Select.apply(box, active, torch.stack(outs), h, c)


def _reference(lstm: nn.LSTM, x, lengths, h0, c0, k, mode, boxes):
    """Padded time-major x; returns output (T, N, D*H), h_n, c_n."""
    dirs = 2 if lstm.bidirectional else 1
    hs, cs = [], []
    for layer in range(lstm.num_layers):
        outs = []
        for d in range(dirs):
            sfx = f"l{layer}{'_reverse' if d else ''}"
            b = getattr(lstm, f"bias_ih_{sfx}") + getattr(lstm, f"bias_hh_{sfx}") \
                if lstm.bias else 0.0
            box = boxes.setdefault(sfx, {"k": k, "mode": mode})
            out, hn, cn = _direction(x, lengths, h0[layer * dirs + d], c0[layer * dirs + d],
                                     getattr(lstm, f"weight_ih_{sfx}"),
                                     getattr(lstm, f"weight_hh_{sfx}"), b, d == 1, box)
            outs.append(out)
            hs.append(hn)
            cs.append(cn)
        x = torch.cat(outs, 2)
    return x, torch.stack(hs), torch.stack(cs)


def _loss(out, hn, cn, weights):
    return (out * weights).sum() + out.pow(2).sum() + (hn * 1.7).sum() + cn.pow(2).sum()


def _case(bidirectional, num_layers, batch_first, bias, seed=0):
    torch.manual_seed(seed)
    lstm = nn.LSTM(3, 6, num_layers=num_layers, bidirectional=bidirectional,
                   batch_first=batch_first, bias=bias).to(DT)
    N, T, dirs = 4, 5, 2 if bidirectional else 1
    x = torch.randn(T, N, 3, dtype=DT)
    h0 = torch.randn(num_layers * dirs, N, 6, dtype=DT)
    c0 = torch.randn(num_layers * dirs, N, 6, dtype=DT)
    weights = torch.randn(T, N, dirs * 6, dtype=DT)
    return lstm, x, h0, c0, weights


def _meprop_grads(lstm, x, lengths, h0, c0, weights, packed, tracker=None, **kw):
    """Run the wrapped LSTM on padded or packed input; grads of x, h0, c0 and every weight."""
    mep = MePropLSTM.wrap(copy.deepcopy(lstm), tracker=tracker, key="rnn", **kw)
    xs = [t.clone().requires_grad_() for t in (x, h0, c0)]
    inp = xs[0].transpose(0, 1) if lstm.batch_first else xs[0]
    if packed:
        inp = pack_padded_sequence(inp, lengths, batch_first=lstm.batch_first,
                                   enforce_sorted=False)
    out, (hn, cn) = mep(inp, (xs[1], xs[2]))
    if packed:
        out, _ = pad_packed_sequence(out, batch_first=lstm.batch_first, total_length=x.shape[0])
    if lstm.batch_first:
        out = out.transpose(0, 1)
    _loss(out, hn, cn, weights).backward()
    return out, hn, cn, [t.grad for t in xs] + [p.grad for p in mep.parameters()]


def _reference_grads(lstm, x, lengths, h0, c0, weights, k, mode, boxes):
    ref = copy.deepcopy(lstm)
    xs = [t.clone().requires_grad_() for t in (x, h0, c0)]
    out, hn, cn = _reference(ref, xs[0], lengths, xs[1], xs[2], k, mode, boxes)
    _loss(out, hn, cn, weights).backward()
    return out, hn, cn, [t.grad for t in xs] + [p.grad for p in ref.parameters()]


@pytest.mark.parametrize("mode", ["unified", "per_example"])
@pytest.mark.parametrize("bidirectional,num_layers", [(False, 1), (True, 1), (True, 2),
                                                      (False, 2)])
@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("batch_first", [False, True])
def test_gradients_equal_masked_bptt_reference(mode, bidirectional, num_layers, packed,
                                               batch_first):
    lstm, x, h0, c0, weights = _case(bidirectional, num_layers, batch_first, True)
    lengths = torch.tensor([5, 2, 4, 1]) if packed else torch.full((4,), 5)
    boxes = {}
    ref = _reference_grads(lstm, x, lengths, h0, c0, weights, 2, mode, boxes)
    got = _meprop_grads(lstm, x, lengths, h0, c0, weights, packed, k=2, mode=mode)
    for a, b in zip(got[:3], ref[:3], strict=True):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=0)
    for a, b in zip(got[3], ref[3], strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
    # the reference's selection touched k units per direction (unified) or at most N*k
    for box in boxes.values():
        picked = int((box["mask"].sum(0) > 0).sum())
        assert picked == 2 if mode == "unified" else 2 <= picked <= 6


@pytest.mark.parametrize("mode", ["unified", "per_example"])
def test_no_bias_single_sequence(mode):
    lstm, x, h0, c0, weights = _case(False, 1, False, False, seed=1)
    x, h0, c0, weights = x[:, :1], h0[:, :1], c0[:, :1], weights[:, :1]
    lengths = torch.tensor([5])
    ref = _reference_grads(lstm, x, lengths, h0, c0, weights, 3, mode, {})
    got = _meprop_grads(lstm, x, lengths, h0, c0, weights, False, k=3, mode=mode)
    for a, b in zip(got[3], ref[3], strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


def test_padded_positions_add_no_gradient_or_hits():
    lstm, x, h0, c0, weights = _case(True, 1, False, True, seed=2)
    lengths = torch.tensor([5, 2, 4, 1])
    tracker = ActivityTracker()
    got = _meprop_grads(lstm, x, lengths, h0, c0, weights, True, tracker, k=2,
                        mode="per_example")
    x_grad = got[3][0]
    for b, n in enumerate(lengths.tolist()):
        assert torch.count_nonzero(x_grad[n:, b]) == 0
        assert torch.count_nonzero(x_grad[:n, b]) > 0
    # loss weights on padded positions must not change anything
    noisy = weights.clone()
    for b, n in enumerate(lengths.tolist()):
        noisy[n:, b] = 100.0
    again = _meprop_grads(lstm, x, lengths, h0, c0, noisy, True, k=2,
                          mode="per_example")
    torch.testing.assert_close(again[3][3], got[3][3])
    for key in ("rnn.l0", "rnn.l0_reverse"):
        assert tracker.window_examples(key) == 4
        assert int(tracker.window_hits(key).sum()) == 4 * 2


def test_activity_matches_reference_selection():
    lstm, x, h0, c0, weights = _case(True, 2, False, True, seed=3)
    lengths = torch.tensor([5, 3, 4, 2])
    for mode in ("unified", "per_example"):
        boxes = {}
        _reference_grads(lstm, x, lengths, h0, c0, weights, 2, mode, boxes)
        tracker = ActivityTracker()
        _meprop_grads(lstm, x, lengths, h0, c0, weights, True, tracker, k=2, mode=mode)
        assert sorted(tracker.keys()) == ["rnn.l0", "rnn.l0_reverse", "rnn.l1",
                                          "rnn.l1_reverse"]
        for sfx, box in boxes.items():
            expected = box["mask"].sum(0).round().to(torch.int64)
            assert torch.equal(tracker.window_hits(f"rnn.{sfx}"), expected)


@pytest.mark.parametrize("batch_first", [False, True])
def test_swap_keeps_forward_outputs_and_parameters(batch_first):
    torch.manual_seed(4)
    lstm = nn.LSTM(3, 5, num_layers=2, bidirectional=True, batch_first=batch_first)
    x = torch.randn(4, 6, 3, requires_grad=True)
    expected = lstm(x)
    params = list(lstm.parameters())
    keys = list(lstm.state_dict())
    mep = MePropLSTM.wrap(lstm, 2, key="rnn")
    got = mep(x)  # meProp path (grad enabled): torch's kernel on its training path, bit for bit
    for a, b in ((got[0], expected[0]), (got[1][0], expected[1][0]), (got[1][1], expected[1][1])):
        assert torch.equal(a, b)
    assert all(a is b for a, b in zip(mep.parameters(), params, strict=True))
    assert list(mep.state_dict()) == keys
    plain = mep.unwrap()
    assert type(plain) is nn.LSTM
    with torch.no_grad():  # inference: the very same native kernel, bit for bit
        native = plain(x)[0]
        assert torch.equal(MePropLSTM.wrap(plain, 2, key="rnn")(x)[0], native)


def test_unbatched_input_matches_batch_of_one():
    lstm, x, h0, c0, weights = _case(True, 1, False, True, seed=5)
    lengths = torch.tensor([5])
    ref = _reference_grads(lstm, x[:, :1], lengths, h0[:, :1], c0[:, :1], weights[:, :1], 2,
                           "unified", {})
    mep = MePropLSTM.wrap(copy.deepcopy(lstm), 2)
    xs = [t.clone().requires_grad_() for t in (x[:, 0], h0[:, 0], c0[:, 0])]
    out, (hn, cn) = mep(xs[0], (xs[1], xs[2]))
    assert out.shape == (5, 12) and hn.shape == (2, 6)
    _loss(out.unsqueeze(1), hn.unsqueeze(1), cn.unsqueeze(1), weights[:, :1]).backward()
    torch.testing.assert_close(xs[0].grad, ref[3][0][:, 0], atol=1e-5, rtol=0)
    for a, b in zip(mep.parameters(), ref[3][3:], strict=True):
        torch.testing.assert_close(a.grad, b, atol=1e-5, rtol=0)


def test_k_at_or_above_hidden_is_exact_autograd():
    lstm, x, h0, c0, weights = _case(True, 2, True, True, seed=6)
    lengths = torch.tensor([5, 2, 4, 1])
    tracker = ActivityTracker()
    got = _meprop_grads(lstm, x, lengths, h0, c0, weights, True, tracker, k=6)
    plain = copy.deepcopy(lstm)
    xs = [t.clone().requires_grad_() for t in (x, h0, c0)]
    inp = pack_padded_sequence(xs[0].transpose(0, 1), lengths, batch_first=True,
                               enforce_sorted=False)
    out, (hn, cn) = plain(inp, (xs[1], xs[2]))
    out = pad_packed_sequence(out, batch_first=True, total_length=5)[0].transpose(0, 1)
    _loss(out, hn, cn, weights).backward()
    expected = [t.grad for t in xs] + [p.grad for p in plain.parameters()]
    assert all(torch.equal(a, b) for a, b in zip(got[3], expected, strict=True))
    assert torch.equal(tracker.window_hits("rnn.l1_reverse"), torch.full((6,), 4))


def test_without_initial_state_and_without_input_grad():
    torch.manual_seed(7)
    lstm = nn.LSTM(3, 6)
    x = torch.randn(5, 2, 3)
    ref = copy.deepcopy(lstm)
    h0 = torch.zeros(1, 2, 6)
    boxes = {}
    out, hn, cn = _reference(ref.to(DT), x.to(DT), torch.full((2,), 5), h0.to(DT),
                             h0.to(DT), 2, "unified", boxes)
    out.pow(2).sum().backward()
    mep = MePropLSTM.wrap(copy.deepcopy(lstm).to(DT), 2)
    mep(x.to(DT))[0].pow(2).sum().backward()
    for a, b in zip(mep.parameters(), ref.parameters(), strict=True):
        torch.testing.assert_close(a.grad, b.grad, atol=1e-5, rtol=0)


@pytest.mark.parametrize("bad", [0, 1.2, "all", False])
def test_bad_k_names_layer(bad):
    with pytest.raises(KError) as err:
        MePropLSTM.wrap(nn.LSTM(2, 4), bad, key="encoder.rnn")
    assert "encoder.rnn" in str(err.value) and repr(bad) in str(err.value)


def test_constructor_and_keys():
    mep = MePropLSTM(3, 10, num_layers=2, bidirectional=True, k=0.3, key="rnn")
    assert mep.meprop.k == 3
    assert mep.layer_keys() == ["rnn.l0", "rnn.l0_reverse", "rnn.l1", "rnn.l1_reverse"]


@pytest.mark.parametrize("layers, bidirectional", [(1, False), (3, True)])
@pytest.mark.parametrize("seed", range(4))
def test_the_meprop_forward_is_nn_lstm_to_the_bit_also_packed(layers, bidirectional, seed):
    torch.manual_seed(seed)  # float32 on the CPU: the no-grad kernel rounds differently
    lstm = nn.LSTM(1, 2, num_layers=layers, bidirectional=bidirectional)
    x = torch.randn(3, 1, 1, requires_grad=True)
    packed = pack_padded_sequence(x, torch.tensor([3]))
    expected = [lstm(x), lstm(packed)]
    mep = MePropLSTM.wrap(copy.deepcopy(lstm), 1, key="rnn")
    for got, want in zip([mep(x), mep(packed)], expected, strict=True):
        out, want_out = (o.data if isinstance(o, PackedSequence) else o
                         for o in (got[0], want[0]))
        assert torch.equal(out, want_out)
        assert torch.equal(got[1][0], want[1][0]) and torch.equal(got[1][1], want[1][1])


@pytest.mark.parametrize("mode", ["unified", "per_example"])
def test_a_batch_without_sequences_gives_zero_gradients_and_records_nothing(mode):
    lstm = nn.LSTM(2, 3, num_layers=2)
    tracker = ActivityTracker()
    mep = MePropLSTM.wrap(copy.deepcopy(lstm), 1, mode=mode, key="rnn", tracker=tracker)
    for module in (lstm, mep):
        x = torch.randn(4, 0, 2, requires_grad=True)
        out, (hn, cn) = module(x)
        (out.sum() + hn.sum() + cn.sum()).backward()
        assert x.grad.shape == x.shape and not x.grad.any()
    for (name, p), q in zip(mep.named_parameters(), lstm.parameters(), strict=True):
        assert torch.equal(p.grad, q.grad), name  # zeros
    assert tracker.keys() == []


@pytest.mark.parametrize("batch_first", [False, True])
def test_wrong_feature_size_and_empty_sequence_are_refused_as_nn_lstm_does(batch_first):
    from mesimp_compress.errors import ShapeError

    lstm = MePropLSTM.wrap(nn.LSTM(5, 8, batch_first=batch_first), 3, key="lstm")
    for shape in ((6, 4, 7), (6, 3)):
        with pytest.raises(RuntimeError, match="input.size\\(-1\\) must be equal to input_size"):
            lstm(torch.randn(*shape, requires_grad=True))
    packed = pack_padded_sequence(torch.randn(4, 2, 7), [4, 3])
    with pytest.raises(RuntimeError, match="must be equal to input_size"):
        lstm(PackedSequence(packed.data.requires_grad_(), packed.batch_sizes))
    empty = (4, 0, 5) if batch_first else (0, 4, 5)
    for shape in (empty, (0, 5)):
        with pytest.raises(ShapeError, match="sequence of length 0"):
            lstm(torch.randn(*shape, requires_grad=True))
