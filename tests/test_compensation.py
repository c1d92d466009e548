"""Compensation: removed inputs' mean contribution folded into the consumer's bias."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from test_surgery_zoo import CASE_IDS, CASES
from torch import nn

from mesimp_compress.errors import ConfigError
from mesimp_compress.graph import find_groups
from mesimp_compress.plan import make_plan
from mesimp_compress.surgery import ActivationMeans, apply_plan
from mesimp_compress.surgery.compensation import FIT_ROWS, RIDGE

torch.set_num_threads(1)


def test_means_per_feature_per_channel_and_for_lstm_inputs() -> None:
    torch.manual_seed(0)
    model = nn.ModuleDict(
        {"fc": nn.Linear(3, 2), "conv": nn.Conv2d(4, 2, 3), "lstm": nn.LSTM(3, 2)}
    )
    xs = [torch.randn(2, 5, 3) for _ in range(2)]
    images = [torch.randn(2, 4, 5, 5) + torch.arange(4.0).view(1, 4, 1, 1) for _ in range(2)]
    with ActivationMeans(model) as means:
        for x, image in zip(xs, images, strict=True):
            model["fc"](x)
            model["conv"](image)
            model["lstm"](x)
    assert set(means) == {"fc", "conv", "lstm"}
    expected = torch.cat(xs).reshape(-1, 3).mean(0)
    assert torch.allclose(means["fc"], expected, atol=1e-6)
    assert torch.allclose(means["lstm"], expected, atol=1e-6)
    assert torch.allclose(means["conv"], torch.cat(images).mean((0, 2, 3)), atol=1e-6)
    model["fc"](torch.randn(4, 3))  # hooks removed: nothing changes
    assert torch.allclose(means["fc"], expected, atol=1e-6)


def test_a_width_change_starts_a_fresh_mean_and_reset_forgets() -> None:
    model = nn.Sequential(nn.Linear(3, 2))
    means = ActivationMeans(model)
    model(torch.ones(2, 3))
    model[0].weight.data = torch.zeros(2, 2)
    model[0].in_features = 2
    model(torch.full((2, 2), 3.0))
    assert torch.equal(means["0"], torch.full((2,), 3.0))
    means.reset()
    assert len(means) == 0 and "0" not in means
    means.close()
    with pytest.raises(ConfigError, match="expected Linear"):
        ActivationMeans(nn.Sequential(nn.ReLU()), names=["0"])
    with pytest.raises(ConfigError, match="no module named"):
        ActivationMeans(model, names=["x"])


def test_constant_removed_units_are_compensated_exactly() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3))
    with torch.no_grad():
        model[0].weight[[1, 4]] = 0.0  # units 1 and 4 output relu(bias): a constant
        model[0].bias[[1, 4]] = torch.tensor([0.7, 1.3])
    x = torch.randn(8, 4)
    with ActivationMeans(model) as means:
        expected = model(x)
    structure = find_groups(model, x)
    report = apply_plan(model, make_plan(structure, {"0": [0, 2, 3, 5]}), compensation=means)
    assert report.compensated == ["2"]
    assert torch.allclose(model(x), expected, atol=1e-6)


def test_linearly_dependent_removed_units_are_compensated_exactly() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3))
    with torch.no_grad():  # unit 4 = 2 * unit 0 (also after the ReLU), unit 1 a constant
        model[0].weight[4] = 2.0 * model[0].weight[0]
        model[0].bias[4] = 2.0 * model[0].bias[0]
        model[0].weight[1] = 0.0
        model[0].bias[1] = 0.7  # a constant unit
    x = torch.randn(256, 4)
    expected = model(x).detach()
    errors = {}
    for covariance in (False, True):
        pruned = copy.deepcopy(model)
        with ActivationMeans(pruned, covariance=covariance) as means, torch.no_grad():
            pruned(x)
        structure = find_groups(pruned, x)
        report = apply_plan(pruned, make_plan(structure, {"0": [0, 2, 3, 5]}),
                            compensation=means)
        assert report.compensated == ["2"]
        errors[covariance] = (pruned(x) - expected).abs().max().item()
    assert errors[True] < 1e-2 * errors[False], errors
    assert errors[True] < 1e-3


def test_hf_conv1d_consumers_are_compensated_as_the_equivalent_linear() -> None:
    """GPT-2's Conv1D stores its weight transposed: the fold must land in the same places."""
    conv1d = pytest.importorskip("transformers.pytorch_utils").Conv1D
    torch.manual_seed(0)
    linear = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 2))
    hf = nn.Sequential(conv1d(6, 4), nn.ReLU(), conv1d(5, 6), nn.ReLU(), nn.Linear(5, 2))
    with torch.no_grad():
        for i in (0, 2):
            hf[i].weight.copy_(linear[i].weight.t())
            hf[i].bias.copy_(linear[i].bias)
        hf[4].load_state_dict(linear[4].state_dict())
    x = torch.randn(256, 4) + 0.5
    kept = {"0": [0, 2, 3], "2": [1, 4]}
    outputs = {}
    for name, model in (("linear", linear), ("hf", hf)):
        with ActivationMeans(model, covariance=True) as stats, torch.no_grad():
            model(x)
        structure = find_groups(model, x)
        assert set(structure.groups) == {"0", "2"}
        report = apply_plan(model, make_plan(structure, kept), compensation=stats)
        assert report.compensated == ["2", "4"]
        outputs[name] = model(x).detach()
    assert (hf[0].nf, hf[2].nx, hf[2].nf, tuple(hf[2].weight.shape)) == (3, 3, 2, (3, 2))
    torch.testing.assert_close(outputs["hf"], outputs["linear"], atol=1e-5, rtol=1e-5)


def test_substitute_is_the_least_squares_prediction() -> None:
    torch.manual_seed(1)
    layer = nn.Linear(5, 2)
    x = torch.randn(400, 5) @ torch.randn(5, 5) + torch.randn(5)
    with ActivationMeans(nn.Sequential(layer), covariance=True) as stats, torch.no_grad():
        layer(x)
    sub = stats.substitute("0", torch.tensor([1, 3]))
    assert sub.kept.tolist() == [0, 2, 4]
    kept, removed = x[:, [0, 2, 4]].double(), x[:, [1, 3]].double()
    centred = kept - kept.mean(0)  # ridge regression of removed on kept, with an intercept
    gram = centred.t() @ centred / 400
    ridge = RIDGE * gram.diagonal().mean() * torch.eye(3, dtype=torch.float64)
    mix = torch.linalg.solve(gram + ridge, centred.t() @ (removed - removed.mean(0)) / 400).t()
    assert torch.allclose(sub.mix, mix.float(), atol=1e-4)
    assert torch.allclose(sub.offset, (removed.mean(0) - mix @ kept.mean(0)).float(), atol=1e-4)
    plain = ActivationMeans(nn.Sequential(layer))
    layer(x)
    mean_only = plain.substitute("0", torch.tensor([1, 3]))
    assert mean_only.mix is None
    assert torch.allclose(mean_only.offset, x[:, [1, 3]].mean(0), atol=1e-5)


def test_too_few_rows_to_fit_the_kept_inputs_give_mean_compensation() -> None:
    """16 rows cannot fit a prediction from 30 kept inputs (the covariance is singular; a
    deep MLP's outputs grew to 1e21 when such fits compounded): the mean stands in. With
    FIT_ROWS rows per kept input, the fit is made."""
    torch.manual_seed(2)
    layer = nn.Linear(32, 2)
    removed = torch.tensor([3, 7])
    for rows, fitted in ((16, False), (FIT_ROWS * 30 - 1, False), (FIT_ROWS * 30, True)):
        x = torch.randn(rows, 32)
        with ActivationMeans(nn.Sequential(layer), covariance=True) as stats, torch.no_grad():
            layer(x[: rows // 2])
            layer(x[rows // 2:])  # counted over batches
        sub = stats.substitute("0", removed)
        assert (sub.mix is not None) is fitted, rows
        if not fitted:
            assert torch.allclose(sub.offset, x[:, removed].mean(0), atol=1e-5)


def _error(model: nn.Module, reference: nn.Module, data: list) -> float:
    with torch.no_grad():
        return sum(F.mse_loss(model(*x), reference(*x)).item() for x in data) / len(data)


@pytest.mark.parametrize("case_name", ["sequential", "custom_mlp", "convnet", "text_cnn", "tagger"])
def test_compensation_lowers_the_error_of_an_unfinetuned_pruned_model(case_name: str) -> None:
    case = CASES[CASE_IDS.index(case_name)]
    reference = case.build()
    torch.manual_seed(3)
    shift = 0.5 if case.inputs().is_floating_point() else 0  # a non-zero mean, as real data
    window = [(case.inputs() + shift,) for _ in range(64)]
    held_out = [(case.inputs() + shift,) for _ in range(8)]
    plain = case.build()
    compensated = case.build()
    structure = find_groups(plain, window[0])
    plan = make_plan(
        structure, {k: list(range(0, g.width, 2)) for k, g in structure.groups.items()}
    )
    linear = case.build()
    with ActivationMeans(compensated) as means, torch.no_grad():
        for x in window:
            compensated(*x)
    with ActivationMeans(linear, covariance=True) as stats, torch.no_grad():
        for x in window:
            linear(*x)
    apply_plan(plain, plan)
    report = apply_plan(compensated, plan, compensation=means)
    assert report.compensated
    assert apply_plan(linear, plan, compensation=stats).compensated == report.compensated
    before, after = _error(plain, reference, held_out), _error(compensated, reference, held_out)
    assert after < 0.8 * before, (before, after)
    assert _error(linear, reference, held_out) < 0.8 * before


def test_notes_where_compensation_is_not_possible() -> None:
    model = nn.Sequential(
        nn.Linear(3, 5), nn.ReLU(), nn.Linear(5, 4, bias=False), nn.ReLU(), nn.Linear(4, 2)
    )
    x = torch.randn(2, 3)
    structure = find_groups(model, x)
    plan = make_plan(structure, {"0": [0, 1], "2": [1, 2]})
    means = {"2": torch.ones(5), "4": torch.ones(4)}
    report = apply_plan(copy.deepcopy(model), plan, compensation=means)
    assert any("'2' is not compensated: it has no bias" in n for n in report.notes)
    assert report.compensated == ["4"]
    report = apply_plan(copy.deepcopy(model), plan, compensation={})
    assert sum("no activation means" in n for n in report.notes) == 2
    with pytest.raises(ConfigError, match="have 3 features"):
        apply_plan(model, plan, compensation={"4": torch.ones(3)})
    assert model[0].out_features == 5


def test_lstm_hidden_units_are_noted_not_compensated() -> None:
    case = CASES[CASE_IDS.index("tagger")]
    model = case.build()
    structure = find_groups(model, case.example())
    keys = structure.tied_sets()[0]
    plan = make_plan(structure, {k: [0, 3, 5] for k in keys} | {"proj": [1, 2, 4]})
    with ActivationMeans(model) as means:
        model(case.example())
    report = apply_plan(model, plan, compensation=means)
    assert sorted(report.compensated) == ["lstm", "out"]
    assert any("'lstm' hidden units" in n for n in report.notes)


class Encoder(nn.Module):
    """nn.TransformerEncoder with a padding mask: in eval it runs on nested tensors."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(30, 16, padding_idx=0)
        layer = nn.TransformerEncoderLayer(16, 2, 32, batch_first=True)
        self.enc = nn.TransformerEncoder(layer, 2, enable_nested_tensor=True)
        self.head = nn.Linear(16, 3)

    def forward(self, tokens, pad):
        keep = (~pad).unsqueeze(-1).float()
        return self.head((self.enc(self.emb(tokens), src_key_padding_mask=pad) * keep).sum(1))


@pytest.mark.filterwarnings("ignore:The PyTorch API of nested tensors")
def test_compensation_statistics_read_the_real_tokens_of_nested_tensors():
    from mesimp_compress.surgery.compensation import ActivationMeans

    torch.manual_seed(0)
    model = Encoder().eval()
    tokens = torch.randint(1, 30, (4, 6))
    pad = torch.arange(6)[None] >= torch.tensor([6, 3, 4, 2])[:, None]
    means = ActivationMeans(model, ["enc.layers.0.linear2"], covariance=True)
    with torch.no_grad():
        model(tokens.masked_fill(pad, 0), pad)  # the fast path hands linear2 a nested tensor
    means.close()
    assert means._counts["enc.layers.0.linear2"] == 6 + 3 + 4 + 2  # the real tokens only


def test_linear_fit_keeps_the_variance_of_units_with_a_large_mean():
    # nearly constant units (mean 30, spread 5e-3) are what meSimp removes; their
    # second moments about zero lose the spread in float32
    g = torch.Generator().manual_seed(0)
    base = torch.randn(512, 3, generator=g, dtype=torch.float64)
    x = torch.cat([30 + 5e-3 * base @ torch.randn(3, 6, generator=g, dtype=torch.float64),
                   base], dim=1)
    model = nn.Sequential(nn.Linear(9, 2))
    with ActivationMeans(model, covariance=True) as means:
        for batch in x.float().split(128):
            model(batch)
    removed = torch.tensor([0, 1, 2])
    sub = means.substitute("0", removed)
    kept = sub.kept
    xs = x.float().double()  # what the model saw
    centred = xs - xs.mean(0)
    cov = centred.t() @ centred / xs.shape[0]
    c_kk = cov[kept][:, kept]
    c_kk += RIDGE * float(c_kk.diagonal().mean()) * torch.eye(kept.numel(), dtype=cov.dtype)
    mix = torch.linalg.solve(c_kk, cov[kept][:, removed]).t()
    torch.testing.assert_close(sub.mix.double(), mix, atol=1e-4, rtol=1e-3)
