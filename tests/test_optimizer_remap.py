"""The optimizer carries on after surgery: one step equals one step on the masked model."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from test_surgery_zoo import CASE_IDS, CASES, random_kept
from torch import nn

from mesimp_compress.errors import ConfigError
from mesimp_compress.graph import find_groups
from mesimp_compress.plan import Plan, make_plan
from mesimp_compress.surgery import apply_plan, pruner_for, zero_removed

torch.set_num_threads(1)

OPTIMIZERS = {
    "sgd_momentum": lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9),
    "sgd_nesterov": lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, nesterov=True),
    "adam": lambda p: torch.optim.Adam(p, lr=0.01),
    "adamw": lambda p: torch.optim.AdamW(p, lr=0.01, weight_decay=0.1, amsgrad=True),
    "adagrad": lambda p: torch.optim.Adagrad(p, lr=0.05),
    "rmsprop": lambda p: torch.optim.RMSprop(p, lr=0.01, momentum=0.5),
}


def restrict(masked: nn.Module, plan: Plan) -> dict[str, torch.Tensor]:
    """The masked model's state, restricted to the entries the plan keeps."""
    modules = dict(masked.named_modules())
    state = {k: v.detach().clone() for k, v in masked.state_dict().items()}
    per_module: dict[str, dict[str, torch.Tensor]] = {}
    for edit in plan.edits:
        per_module.setdefault(edit.module, {})[edit.role] = torch.tensor(edit.kept)
    for name, kept in per_module.items():
        module = modules[name]
        for piece in pruner_for(module).slices(module, kept):
            key = f"{name}.{piece.tensor}" if name else piece.tensor
            state[key] = state[key].index_select(piece.dim, piece.index)
    return state


def train_step(model: nn.Module, optimizer, inputs, target) -> None:
    optimizer.zero_grad()
    out = model(inputs)
    F.mse_loss(out, target).backward()
    optimizer.step()


@pytest.mark.parametrize("opt_name", list(OPTIMIZERS))
@pytest.mark.parametrize("case_name", ["convnet", "text_cnn", "inverted_residual", "tagger"])
def test_one_step_after_surgery_equals_masked_step(case_name: str, opt_name: str) -> None:
    case = CASES[CASE_IDS.index(case_name)]
    model = case.build().train()
    optimizer = OPTIMIZERS[opt_name](model.parameters())
    torch.manual_seed(5)
    batches = [(case.inputs(), None) for _ in range(3)]
    with torch.no_grad():
        shape = model(batches[0][0]).shape
    batches = [(x, torch.randn(shape)) for x, _ in batches]
    for x, y in batches[:2]:
        train_step(model, optimizer, x, y)
    structure = find_groups(model, case.example(), allow_residual=case.allow_residual)
    plan = make_plan(structure, random_kept(structure, seed=2))

    masked = copy.deepcopy(model)
    masked_opt = OPTIMIZERS[opt_name](masked.parameters())
    masked_opt.load_state_dict(copy.deepcopy(optimizer.state_dict()))
    zero_removed(masked, plan)
    apply_plan(model, plan, optimizer=optimizer)

    x, y = batches[2]
    train_step(model, optimizer, x, y)
    train_step(masked, masked_opt, x, y)
    expected = restrict(masked, plan)
    for key, value in model.state_dict().items():
        assert value.shape == expected[key].shape, key
        assert torch.allclose(value, expected[key], atol=2e-6, rtol=1e-5), key
    train_step(model, optimizer, x, y)  # and it keeps going


def test_state_of_another_shape_is_refused_before_anything_changes() -> None:
    model = nn.Sequential(nn.Linear(3, 6), nn.ReLU(), nn.Linear(6, 2))
    optimizer = torch.optim.Adam(model.parameters())
    model(torch.randn(2, 3)).sum().backward()
    optimizer.step()
    optimizer.state[model[0].weight]["factored_rows"] = torch.zeros(6)
    structure = find_groups(model, torch.randn(2, 3))
    with pytest.raises(ConfigError, match="factored_rows"):
        apply_plan(model, make_plan(structure, {"0": [0, 1]}), optimizer=optimizer)
    assert model[0].weight.shape == (6, 3)
    assert optimizer.state[model[0].weight]["exp_avg"].shape == (6, 3)


def test_state_follows_the_kept_entries() -> None:
    model = nn.Sequential(nn.Linear(3, 6), nn.ReLU(), nn.Linear(6, 2))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.randn(4, 3)).pow(2).sum().backward()
    optimizer.step()
    before = {id(p): optimizer.state[p]["momentum_buffer"].clone() for p in model.parameters()}
    w0, w2 = model[0].weight, model[2].weight
    structure = find_groups(model, torch.randn(2, 3))
    apply_plan(model, make_plan(structure, {"0": [1, 4]}), optimizer=optimizer)
    assert torch.equal(optimizer.state[w0]["momentum_buffer"], before[id(w0)][[1, 4]])
    assert torch.equal(optimizer.state[w2]["momentum_buffer"], before[id(w2)][:, [1, 4]])
    assert optimizer.param_groups[0]["params"][0] is w0


def test_pending_row_gradients_refuse_surgery_and_leave_the_model_as_it_was():
    from mesimp_compress.meprop import apply_meprop
    from mesimp_compress.optim import RowSparseAdam
    from mesimp_compress.surgery import apply_plan

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(20, 32), nn.ReLU(), nn.Linear(32, 5))
    x = torch.randn(8, 20)
    plan = make_plan(find_groups(model, x), {"0": list(range(2, 32))})
    apply_meprop(model, 6)
    opt = RowSparseAdam(model.parameters())
    F.cross_entropy(model(x), torch.randint(0, 5, (8,))).backward()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ConfigError, match="row gradients .* call optimizer.step"):
        apply_plan(model, plan, optimizer=opt)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    opt.step()  # the rows land where they belong, then surgery may go on
    apply_plan(model, plan, optimizer=opt)
    assert model[0].out_features == 30
