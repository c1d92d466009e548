"""FineTuner on a tiny MLP: widths shrink, history per window, rollback, NaN loss, clean model."""

from __future__ import annotations

import copy
import math

import _tiny
import pytest
import torch
from torch import nn

from mesimp_compress import tasks
from mesimp_compress.config import CompressConfig
from mesimp_compress.errors import DataError, NonFiniteLossError
from mesimp_compress.events import Event
from mesimp_compress.simplify import Simplifier
from mesimp_compress.training import FineTuner, evaluate

torch.set_num_threads(1)

BASE = dict(epochs=1, cycles=1, recovery_epochs=0, distill=0.0, threads=1, batches=[1, 4])


def trained_mlp(train, model: nn.Module | None = None, epochs: int = 8) -> nn.Module:
    """The tiny MLP (or ``model``) fitted for a few epochs, so pruning it hard costs accuracy."""
    model = model if model is not None else _tiny.mlp()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(epochs):
        for x, y in train:
            opt.zero_grad()
            tasks.cross_entropy(model(x), y).backward()
            opt.step()
    return model


@pytest.fixture(scope="module")
def data():
    return _tiny.mlp_data()


def tuner(model, data, events=None, **settings) -> FineTuner:
    cfg = CompressConfig(**{**BASE, **settings})
    train, evaluation = data
    simp = Simplifier.build(model, next(iter(train))[0], cfg)
    return FineTuner(model, None, train, evaluation, simp, cfg,
                     sink=events.append if events is not None else None)


def test_widths_shrink_and_history_has_one_record_per_window(data) -> None:
    events: list[Event] = []
    ft = tuner(_tiny.mlp(), data, events, k=6, prune_rate=0.5, window=0.25, lr=1e-2)
    result = ft.run()
    # 8 batches per epoch, windows of 2 batches: 4 windows in the pruning epoch, 4 in the normal
    assert len(result.history) == 8
    assert [r.window for r in result.history] == list(range(8))
    assert [r.phase for r in result.history] == ["prune"] * 4 + ["normal"] * 4
    assert [r.step for r in result.history] == [2, 4, 6, 8, 10, 12, 14, 16]
    final = {k: len(v) for k, v in result.kept.items()}
    assert final["0"] < 32 and final["2"] < 24
    assert result.history[-1].widths == final
    for r in result.history:
        assert math.isfinite(r.loss) and 0.0 <= r.metric <= 1.0
        for key, (before, after) in r.pruned.items():
            assert after < before and r.widths[key] == after
    assert all(not r.pruned for r in result.history[4:])  # the normal cycle never prunes
    # the model really has the final widths
    assert result.model[0].out_features == final["0"] and result.model[2].in_features == final["0"]
    assert result.model[2].out_features == final["2"] and result.model[4].in_features == final["2"]
    windows = [e for e in events if e.kind == "window"]
    assert [e.data["widths"] for e in windows] == [r.widths for r in result.history]
    assert result.metric_after == pytest.approx(result.history[-1].metric)


def test_rollback_restores_pre_prune_widths_and_freezes_the_key(data) -> None:
    model = trained_mlp(data[0])
    events: list[Event] = []
    ft = tuner(model, data, events, k=4, prune_rate=0.9, window=0.25, lr=1e-6,
               max_drop=0.0, recovery_windows=1, compensate=False)
    result = ft.run()
    assert result.metric_before > 0.6
    assert result.rollbacks, "a prune to 4 units without learning must lose accuracy"
    first = result.rollbacks[0]
    assert first.threshold == pytest.approx(result.metric_before)
    assert first.metric < first.threshold
    pruned_at = result.history[first.window]
    assert pruned_at.pruned and set(first.keys) == set(pruned_at.pruned)
    restored = {k: before for k, (before, _) in pruned_at.pruned.items()}
    # the next window is back at the widths before the prune, and the keys never shrink again
    for record in result.history[first.window + 1 :]:
        for key in first.keys:
            assert record.widths[key] == restored[key]
            assert key not in record.pruned
    final = {k: len(v) for k, v in result.kept.items()}
    assert {k: final[k] for k in first.keys} == restored
    assert ft.frozen >= set(first.keys)
    sizes = {"0": result.model[0].out_features, "2": result.model[2].out_features}
    assert sizes == final
    kinds = [e.kind for e in events]
    assert "rollback" in kinds and kinds.index("rollback") > kinds.index("prune")


def test_nan_loss_names_the_batch(data) -> None:
    calls = {"n": 0}

    def loss(outputs, targets):
        calls["n"] += 1
        value = tasks.cross_entropy(outputs, targets)
        return value * float("nan") if calls["n"] == 5 else value

    cfg = CompressConfig(**{**BASE, "k": 6, "window": 0.25})
    train, evaluation = data
    model = _tiny.mlp()
    simp = Simplifier.build(model, train[0][0], cfg)
    ft = FineTuner(model, None, train, evaluation, simp, cfg, loss=loss)
    with pytest.raises(NonFiniteLossError,
                       match=r"loss became nan on train batch 5 \(epoch 1\), step 5;"):
        ft.run()


def test_final_model_has_no_hooks_and_no_meprop_layers(data) -> None:
    ft = tuner(_tiny.mlp(), data, k=6, prune_rate=0.5, window=0.25, compensate=True)
    assert ft.simp.means is not None
    result = ft.run()
    for module in result.model.modules():
        assert not module._forward_pre_hooks and not module._forward_hooks
        assert not module._backward_hooks
        if isinstance(module, nn.Linear):
            assert type(module) is nn.Linear
    assert sum(len(v) for v in result.kept.values()) < 32 + 24
    x = data[1][0][0]
    before = result.model(x)
    result.model(torch.randn(64, _tiny.IN_FEATURES))  # a forward pass must record nothing
    assert torch.equal(result.model(x), before)


def test_a_short_last_window_joins_the_one_before(data) -> None:
    """8 batches per epoch. Windows of 3: 3, 3, then the 2 left (at least half a window) make
    their own. Windows of 6: the 2 left after 6 are under half a window, so they join it
    rather than let the rule judge units on 2 batches."""
    ft = tuner(_tiny.mlp(), data, k=6, prune_rate=0.5, window=3 / 8, lr=1e-2)
    assert ft.window_batches == 3
    assert [r.step for r in ft.run().history][:3] == [3, 6, 8]
    ft = tuner(_tiny.mlp(), data, k=6, prune_rate=0.5, window=6 / 8, lr=1e-2)
    assert ft.window_batches == 6
    assert [r.step for r in ft.run().history][:2] == [8, 16]


class _Lying:
    """Batches whose len() is not what a pass yields (here: examples, not batches)."""

    def __init__(self, batches, length):
        self.batches, self.length = batches, length

    def __iter__(self):
        return iter(self.batches)

    def __len__(self):
        return self.length


class _Endless:
    """An endless stream of batches without a len()."""

    def __init__(self, batches):
        self.batches = batches

    def __iter__(self):
        while True:
            yield from self.batches


def test_data_that_yields_fewer_batches_than_its_len_still_closes_its_windows(data) -> None:
    train, evaluation = data
    events: list[Event] = []
    lying = (_Lying(train, 8 * len(train)), evaluation)  # 64 claimed, 8 yielded
    ft = tuner(_tiny.mlp(), lying, events, k=6, prune_rate=0.5, window=0.25, lr=1e-2)
    assert ft.window_batches == 16
    result = ft.run()
    # each epoch's window ends with its data: one window per epoch, and it prunes
    assert [r.step for r in result.history] == [8, 16]
    assert result.history[0].pruned
    notes = [e.data["message"] for e in events if e.kind == "note"]
    assert len(notes) == 1 and notes[0].startswith(
        "train data gave 8 batches in epoch 1, not the 64 its len() gives")


def test_epoch_batches_makes_epochs_of_an_endless_stream(data) -> None:
    train, evaluation = data
    ft = tuner(_tiny.mlp(), (_Endless(train), evaluation), k=6, prune_rate=0.5, window=0.5,
               lr=1e-2, epoch_batches=6)
    assert (ft.n_batches, ft.window_batches) == (6, 3)
    result = ft.run()
    assert [r.step for r in result.history] == [3, 6, 9, 12]
    # a finite pass is cut at epoch_batches too
    ft = tuner(_tiny.mlp(), data, k=6, window=0.5, epoch_batches=4)
    assert [r.step for r in ft.run().history] == [2, 4, 6, 8]


def test_an_epoch_of_epoch_batches_reads_no_batch_beyond_them(data) -> None:
    train, evaluation = data

    class Counted(_Endless):
        read: list[int] = []

        def __iter__(self):
            Counted.read.append(0)
            for batch in super().__iter__():
                Counted.read[-1] += 1
                yield batch

    ft = tuner(_tiny.mlp(), (Counted(train), evaluation), k=6, window=0.5, epoch_batches=3)
    Counted.read.clear()
    ft.run()
    assert Counted.read == [3, 3]  # a stream that goes on where it stopped loses nothing


def test_weights_gone_non_finite_are_named_at_evaluation_not_blamed_on_the_data(data) -> None:
    model = _tiny.mlp()
    with torch.no_grad():
        model[2].weight[0, 0] = float("nan")
    with pytest.raises(NonFiniteLossError, match=r"weights became non-finite in fine-tuning "
                                                  r"\('2.weight'; seen on eval batch 1\)"):
        evaluate(model, data[1], tasks.accuracy, torch.device("cpu"))


def test_a_later_pass_without_batches_is_a_data_error(data) -> None:
    train, evaluation = data

    class Once:
        passes = 0

        def __iter__(self):
            Once.passes += 1
            return iter(train if Once.passes <= 2 else [])  # the trace's pass, epoch 1

        def __len__(self):
            return len(train)

    ft = tuner(_tiny.mlp(), (Once(), evaluation), k=6, window=0.5, epochs=2)
    with pytest.raises(DataError, match=r"train data \(epoch 2\): no batches"):
        ft.run()


def test_a_rollback_names_and_freezes_every_prune_it_undoes() -> None:
    """'2' is pruned first (its guard pending for 3 windows), then '4' in a later window;
    the metric falls only after that, and the rollback to the snapshot taken before '2'
    undoes both prunes: it must name and freeze both."""
    import mesimp_compress as mc

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(20, 16), nn.ReLU(), nn.Linear(16, 64), nn.ReLU(),
                          nn.Linear(64, 48), nn.ReLU(), nn.Linear(48, 5))
    seen: dict[str, bool] = {}

    def sink(event: Event) -> None:
        if event.kind == "prune" and "4" in event.data["pruned"] and event.data["window"] >= 5:
            seen["bad"] = True

    def metric(outputs, targets):
        return 0.0 if seen.get("bad") else 1.0

    g = torch.Generator().manual_seed(1)
    train = [(torch.randn(16, 20, generator=g), torch.randint(0, 5, (16,), generator=g))
             for _ in range(16)]
    cfg = CompressConfig(k=6, window=0.125, epochs=1, cycles=1, recovery_epochs=0,
                         max_drop=0.0, recovery_windows=3, threads=1, seed=0)
    result = mc.compress(model, train, train[:2], config=cfg, metric=metric, sink=sink)
    pruned = {r.window: set(r.pruned) for r in result.history}
    (rollback,) = result.rollbacks
    assert pruned[3] == {"2"} and "4" in pruned[rollback.window]  # two prunes, one guard
    assert set(rollback.keys) == {"2", "4"}
    later = [r for r in result.history if r.window > rollback.window]
    assert later and not any(set(r.pruned) & {"2", "4"} for r in later)  # both frozen


def _stop_at_first_checkpoint(model, train, evaluation, cfg, folder) -> None:
    """Run mc.compress and interrupt it, as Ctrl-C would, once its first checkpoint is out."""
    import mesimp_compress as mc

    def stop(event: Event) -> None:
        if event.kind == "checkpoint":
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        mc.compress(model, train, evaluation, config=cfg, checkpoint_dir=folder, sink=stop)


def test_a_check_still_pending_when_the_run_ends_is_made_at_its_end(data) -> None:
    model = trained_mlp(data[0])
    ft = tuner(model, data, k=4, prune_rate=0.9, window=0.25, lr=1e-6, max_drop=0.0,
               recovery_windows=50, compensate=False)  # never due within the run
    result = ft.run()
    last = result.history[-1]  # the window whose metric made it (it named one past the end)
    assert result.rollbacks and result.rollbacks[0].window == last.window == len(result.history) - 1
    assert result.rollbacks[0].metric == last.metric
    assert {k: len(v) for k, v in result.kept.items()} == {"0": 32, "2": 24}
    assert result.metric_after >= result.metric_before - 0.02  # lr 1e-6: all but unchanged


def test_a_lower_is_better_metric_rolls_back_a_rise(data) -> None:
    def error(outputs, targets):
        right, count = tasks.accuracy(outputs, targets)
        return count - right, count

    results = {}
    for greater in (True, False):
        cfg = CompressConfig(**{**BASE, "k": 4, "prune_rate": 0.9, "window": 0.25, "lr": 1e-6,
                                "max_drop": 0.0, "recovery_windows": 1, "compensate": "off",
                                "greater_is_better": greater})
        train, evaluation = data
        model = trained_mlp(train)
        simp = Simplifier.build(model, train[0][0], cfg)
        results[greater] = FineTuner(model, None, train, evaluation, simp, cfg,
                                     metric=error).run()
    assert not results[True].rollbacks  # a rising error looks like a gain the wrong way round
    rollback = results[False].rollbacks[0]
    assert rollback.metric > rollback.threshold == pytest.approx(results[False].metric_before)


def test_a_resumed_run_with_a_pending_rollback_matches_the_uninterrupted_one(tmp_path) -> None:
    """The caller's model is in eval mode and has dropout: the snapshot a resume rebuilds
    must train in train mode after a rollback, as the uninterrupted run does."""
    import mesimp_compress as mc

    train, evaluation = _tiny.mlp_data()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 32), nn.ReLU(), nn.Dropout(0.2), nn.Linear(32, 24),
                          nn.ReLU(), nn.Linear(24, 4))
    model = trained_mlp(train, model, epochs=10).eval()
    cfg = dict(epochs=1, cycles=2, recovery_epochs=1, window=0.25, k=2, prune_rate=0.3,
               min_width=1, lr=1e-3, max_drop=0.0, recovery_windows=3, distill=0.0, threads=1)

    def summary(result):
        return ([(r.window, r.loss, r.metric, r.widths) for r in result.history],
                [r.to_dict() for r in result.rollbacks])

    reference = summary(mc.compress(model, train, evaluation, config=cfg))
    assert reference[1], "the setting must roll back a prune"

    _stop_at_first_checkpoint(model, train, evaluation, cfg, tmp_path)
    resumed = mc.compress(model, train, evaluation, config=cfg, checkpoint_dir=tmp_path,
                          resume=True)
    assert summary(resumed) == reference


def test_a_checkpoint_from_before_a_setting_existed_resumes_with_its_default(tmp_path) -> None:
    import mesimp_compress as mc
    from mesimp_compress.checkpoint import Checkpointer

    train, evaluation = _tiny.mlp_data()
    cfg = dict(BASE, k=6, window=0.25)

    _stop_at_first_checkpoint(_tiny.mlp(), train, evaluation, cfg, tmp_path)
    checkpointer = Checkpointer(tmp_path)
    state = checkpointer.load()
    del state["config"]["greater_is_better"]  # as an older version wrote it
    checkpointer.save(state)
    with pytest.raises(mc.CheckpointError, match="greater_is_better=True \\(now False\\)"):
        mc.compress(_tiny.mlp(), train, evaluation, checkpoint_dir=tmp_path, resume=True,
                    config={**cfg, "greater_is_better": False})
    resumed = mc.compress(_tiny.mlp(), train, evaluation, config=cfg, checkpoint_dir=tmp_path,
                          resume=True)
    whole = mc.compress(_tiny.mlp(), train, evaluation, config=cfg)
    assert resumed.plan.kept == whole.plan.kept


def test_a_resume_on_other_train_data_is_refused(tmp_path) -> None:
    import mesimp_compress as mc
    from mesimp_compress.errors import CheckpointError

    train, evaluation = _tiny.mlp_data()
    cfg = dict(BASE, k=6, window=0.25)

    _stop_at_first_checkpoint(_tiny.mlp(), train, evaluation, cfg, tmp_path)
    with pytest.raises(CheckpointError, match="made on other train data \\(8 batches per "
                                              "epoch, None examples; now 4, None\\)"):
        mc.compress(_tiny.mlp(), train[:4], evaluation, config=cfg, checkpoint_dir=tmp_path,
                    resume=True)


def test_an_endless_stream_resumes_after_an_interrupt_in_a_later_epoch(tmp_path) -> None:
    """Resuming replays the reading of earlier epochs: epoch_batches of them each, not a pass
    (a pass of an endless stream never ends)."""
    import mesimp_compress as mc

    train, evaluation = _tiny.mlp_data()
    cfg = dict(epochs=2, cycles=1, recovery_epochs=0, window=0.5, k=6, epoch_batches=5,
               distill=0.0, threads=1)
    reference = mc.compress(_tiny.mlp(), _Endless(train), evaluation, config=cfg)

    def stop(event: Event) -> None:
        if event.kind == "checkpoint" and event.data["epoch"] == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        mc.compress(_tiny.mlp(), _Endless(train), evaluation, config=cfg,
                    checkpoint_dir=tmp_path, sink=stop)
    resumed = mc.compress(_tiny.mlp(), _Endless(train), evaluation, config=cfg,
                          checkpoint_dir=tmp_path, resume=True)
    assert [(r.step, r.loss, r.widths) for r in resumed.history] == [
        (r.step, r.loss, r.widths) for r in reference.history]


def test_a_resumed_run_keeps_the_notes_of_the_prunes_before_the_interruption(tmp_path) -> None:
    """A consumer without a bias cannot take its removed inputs' mean: the note of a prune
    made before Ctrl-C is still said at the end of the resumed run."""
    import mesimp_compress as mc

    train, evaluation = _tiny.mlp_data()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 32), nn.ReLU(), nn.Linear(32, 24, bias=False),
                          nn.ReLU(), nn.Linear(24, 4))
    cfg = dict(BASE, k=6, window=0.25, compensate="mean")

    def notes_of(**kwargs) -> list[str]:
        said: list[str] = []

        def sink(event: Event) -> None:
            if event.kind == "note":
                said.append(event.data["message"])

        mc.compress(copy.deepcopy(model), train, evaluation, config=cfg, sink=sink, **kwargs)
        return said

    reference = notes_of()
    assert reference == ["'2' is not compensated: it has no bias to fold the removed inputs into"]

    def stop(event: Event) -> None:  # in the normal epoch, after the last prune
        if event.kind == "checkpoint" and event.data["epoch"] == 1 and event.data["batch"]:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        mc.compress(copy.deepcopy(model), train, evaluation, config=cfg, checkpoint_dir=tmp_path,
                    sink=stop)
    assert notes_of(checkpoint_dir=tmp_path, resume=True) == reference


def test_a_frozen_first_layer_that_no_gradient_reaches_is_noted_not_silently_kept() -> None:
    import mesimp_compress as mc

    train, evaluation = _tiny.mlp_data()
    said: list[str] = []
    results = {}
    for frozen in ("0", "2"):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(12, 32), nn.ReLU(), nn.Linear(32, 24), nn.ReLU(),
                              nn.Linear(24, 4))
        getattr(model, frozen).requires_grad_(False)
        results[frozen] = mc.compress(
            model, train, evaluation, config=dict(BASE, k=6, window=0.25),
            sink=lambda e: said.append(e.data["message"]) if e.kind == "note" else None,
        ).widths
    assert results["0"]["0"] == 32 and results["0"]["2"] < 24
    assert results["2"]["0"] < 32 and results["2"]["2"] < 24  # a gradient passes through it
    assert said == ["'0' kept every unit: no gradient reached it while pruning (its parameters "
                    "are frozen and nothing before it trains), so meProp counted no activity"]


def test_a_resumed_run_reports_the_original_widths_as_the_baseline(tmp_path) -> None:
    import mesimp_compress as mc

    train, evaluation = _tiny.mlp_data()
    cfg = dict(BASE, k=6, window=0.25)
    _stop_at_first_checkpoint(_tiny.mlp(), train, evaluation, cfg, tmp_path)
    events: list[Event] = []
    mc.compress(_tiny.mlp(), train, evaluation, config=cfg, checkpoint_dir=tmp_path, resume=True,
                sink=events.append)
    resumed = next(e.data for e in events if e.kind == "resumed")
    baseline = next(e.data for e in events if e.kind == "baseline")
    assert resumed["widths"]["0"] < 32  # pruned before the interruption
    assert baseline["widths"] == {"0": 32, "2": 24}


def test_an_empty_eval_batch_is_not_scored_in_pytorch_or_onnxruntime(tmp_path, data) -> None:
    """A batch-mean metric of no examples is NaN: the run stopped with 'not finite'."""
    from mesimp_compress.export import export_onnx
    from mesimp_compress.verify import evaluate_onnx

    def mean_accuracy(outputs, targets):
        assert not outputs.requires_grad  # evaluation builds no graph
        return (outputs.argmax(-1) == targets).float().mean()

    model = trained_mlp(data[0]).eval()
    batches = list(data[1])
    empty = (batches[0][0][:0], batches[0][1][:0])
    with_empty = [batches[0], empty, *batches[1:]]
    want = evaluate(model, batches, mean_accuracy, torch.device("cpu"))
    assert evaluate(model, with_empty, mean_accuracy, torch.device("cpu")) == want
    path = export_onnx(model, (batches[0][0],), tmp_path / "m.onnx").path
    assert evaluate_onnx(path, with_empty, mean_accuracy) == pytest.approx(want, abs=1e-6)
