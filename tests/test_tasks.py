import math
import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from mesimp_compress import tasks
from mesimp_compress.errors import DataError, ShapeError


def test_sequence_loss_and_accuracy_ignore_padding():
    logits = torch.tensor([[[2.0, 0.0], [0.0, 3.0], [5.0, 0.0]]])  # (1, 3, 2)
    targets = torch.tensor([[0, 0, -100]])
    assert tasks.accuracy(logits, targets) == (1.0, 2.0)
    expected = F.cross_entropy(logits[0, :2], targets[0, :2])
    assert torch.allclose(tasks.cross_entropy(logits, targets), expected)


def test_classifier_accuracy_counts():
    logits = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0]])
    assert tasks.accuracy(logits, torch.tensor([0, 1, 1])) == (2.0, 3.0)


def test_shape_mismatch_names_both_shapes():
    with pytest.raises(ShapeError, match=r"\(4, 10\).*\(5,\)"):
        tasks.cross_entropy(torch.zeros(4, 10), torch.zeros(5, dtype=torch.long))


@pytest.mark.parametrize("dtype", [torch.int32, torch.int16, torch.uint8, torch.int8])
def test_integer_targets_of_any_width_are_classes(dtype):
    logits = torch.tensor([[2.0, 0.0, 1.0], [0.0, 3.0, 1.0], [0.0, 0.0, 4.0]])
    wide = torch.tensor([0, 2, 2])
    assert torch.equal(tasks.cross_entropy(logits, wide.to(dtype)),
                       tasks.cross_entropy(logits, wide))
    assert tasks.accuracy(logits, wide.to(dtype)) == (2.0, 3.0)


@pytest.mark.parametrize("bad", [3, -2])
def test_a_class_the_model_has_no_score_for_is_refused(bad):
    targets = torch.tensor([0, bad, -100])  # (-100 is padding, not a class)
    for fn in (tasks.cross_entropy, tasks.accuracy):
        with pytest.raises(ShapeError, match=rf"the targets hold class {bad}, but the model "
                                             r"gives 3 class scores \(classes 0..2"):
            fn(torch.zeros(3, 3), targets)


def test_single_example_targets_are_refused_not_trained_unbatched():
    # a Dataset passed for a DataLoader: (features,) inputs and 0-d labels
    with pytest.raises(ShapeError, match="the targets hold one value, not a batch.*DataLoader"):
        tasks.cross_entropy(torch.zeros(3), torch.tensor(1))


def test_distillation_is_zero_for_identical_logits_and_positive_otherwise():
    s = torch.randn(6, 5)
    y = torch.randint(0, 5, (6,))
    assert float(tasks.distillation(s, s.clone(), y, 2.0)) == pytest.approx(0.0, abs=1e-6)
    assert float(tasks.distillation(s, torch.randn(6, 5), y, 2.0)) > 0


def test_distillation_leaves_out_scores_masked_to_minus_inf_in_both():
    """kl_div gave 0 * (-inf - -inf) = NaN: the run stopped at its first step."""
    torch.manual_seed(0)
    s, t, y = torch.randn(6, 5), torch.randn(6, 5), torch.randint(0, 5, (6,))
    masked = torch.zeros(6, 5, dtype=torch.bool)
    masked[:, 3:] = True
    got = tasks.distillation(s.masked_fill(masked, -math.inf), t.masked_fill(masked, -math.inf),
                             y, 2.0)
    want = tasks.distillation(s[:, :3], t[:, :3], y.clamp(max=2), 2.0)  # the live classes only
    assert float(got) == pytest.approx(float(want), rel=1e-6)
    emb_s, emb_t = torch.zeros(3, 4), torch.ones(3, 4)
    emb_s[0, 0] = emb_t[0, 0] = -math.inf
    assert float(tasks.distillation(emb_s, emb_t, torch.zeros(3, 4), 1.0)) == pytest.approx(
        11 / 12)


def test_distillation_falls_back_to_mse_for_embeddings():
    s, t = torch.zeros(3, 4), torch.ones(3, 4)
    assert float(tasks.distillation(s, t, torch.zeros(3, 4), 1.0)) == pytest.approx(1.0)


def test_metric_value_normalises_means_and_pairs():
    where = "eval batch 1"
    assert tasks.metric_value((3.0, 4.0), 10, where=where) == (3.0, 4.0)
    assert tasks.metric_value([3, torch.tensor(4)], 10, where=where) == (3.0, 4.0)
    assert tasks.metric_value(0.5, 10, where=where) == (5.0, 10.0)
    assert tasks.metric_value(np.float32(0.5), 10, where=where) == (5.0, 10.0)
    assert tasks.metric_value(torch.tensor([0.5]), 10, where=where) == (5.0, 10.0)
    assert tasks.metric_value(np.array([0.5]), 10, where=where) == (5.0, 10.0)


@pytest.mark.parametrize(
    ("value", "says"),
    [
        (None, "returned NoneType on eval batch 3"),
        ("0.5", "returned str on eval batch 3"),
        (torch.tensor([0.5, 0.25]), "Tensor of shape (2,)"),
        (np.array([3.0, 4.0]), "ndarray of shape (2,)"),
        ((1.0, 2.0, 3.0), "tuple of 3 values"),
        (float("nan"), "not finite on eval batch 3"),
        ((1.0, 0.0 * float("inf")), "not finite"),
        ((1, -5), "returned a negative count (-5) on eval batch 3"),  # once summed to -15
    ],
)
def test_metric_value_refuses_other_returns_naming_the_batch(value, says):
    with pytest.raises(DataError, match=re.escape(says)):
        tasks.metric_value(value, 4, where="eval batch 3")


@pytest.mark.parametrize(
    ("loss", "says"),
    [
        (1.0, "got a float"),
        (torch.ones(3, requires_grad=True), "shape (3,)"),
        (torch.tensor(1), "torch.int64"),
        (torch.tensor(1.0), "does not depend on the model's trainable parameters"),
    ],
)
def test_check_loss_refuses_what_cannot_train(loss, says):
    with pytest.raises(DataError, match=re.escape(says)):
        tasks.check_loss(loss, "train batch 2 (epoch 1)")
    tasks.check_loss(torch.ones(1, requires_grad=True).sum(), "train batch 2 (epoch 1)")


def test_distillation_of_a_structured_output_sums_its_float_leaves():
    torch.manual_seed(0)
    targets = torch.randint(0, 4, (5,))
    s_logits, t_logits = torch.randn(5, 4), torch.randn(5, 4)
    s_feat, t_feat = torch.randn(5, 3, 2), torch.randn(5, 3, 2)  # not logits: MSE
    expected = tasks.distillation(s_logits, t_logits, targets, 2.0) + F.mse_loss(s_feat, t_feat)
    student = {"logits": s_logits, "extra": (s_feat, None, targets)}
    teacher = {"logits": t_logits, "extra": (t_feat, None, targets)}
    got = tasks.distillation(student, teacher, targets, 2.0)
    torch.testing.assert_close(got, expected)
    with pytest.raises(ShapeError, match="distill = 0"):
        tasks.distillation({"ids": targets}, {"ids": targets}, targets, 2.0)


def test_a_metric_that_counts_no_examples_is_refused():
    assert tasks.mean_of(3.0, 4.0) == 0.75
    with pytest.raises(DataError, match="counted 0 examples"):
        tasks.mean_of(0.0, 0.0)


def test_distillation_of_outputs_that_differ_in_structure_says_so():
    logits = torch.randn(4, 3)
    with pytest.raises(ShapeError, match=r"differ in structure \(2 vs 1 values"):
        tasks.distillation((logits, torch.randn(4, 3)), [logits], torch.zeros(4).long(), 2.0)


@pytest.mark.parametrize("shape", [(3, 5, 7), (2, 5, 4, 6)], ids=["tagger", "segmentation"])
def test_class_scores_along_dim_1_are_read_as_torch_reads_them(shape):
    """(B, C, T) / (B, C, H, W) logits, as F.cross_entropy takes them."""
    torch.manual_seed(0)
    logits = torch.randn(shape)
    targets = torch.randint(0, 5, (shape[0], *shape[2:]))
    targets.view(-1)[::4] = -100  # padding
    expected = F.cross_entropy(logits, targets, ignore_index=-100)
    assert torch.allclose(tasks.cross_entropy(logits, targets), expected)
    keep = targets != -100
    correct = float(((logits.argmax(1) == targets) & keep).sum())
    assert tasks.accuracy(logits, targets) == (correct, float(keep.sum()))
    teacher = torch.randn(shape)
    moved = tasks.distillation(logits.movedim(1, -1), teacher.movedim(1, -1), targets, 2.0)
    assert torch.allclose(tasks.distillation(logits, teacher, targets, 2.0), moved)


def test_where_both_layouts_fit_the_classes_are_the_last_dim():
    logits = torch.tensor([[[5.0, 0.0], [0.0, 5.0]]])  # (1, 2, 2): C == T
    assert tasks.accuracy(logits, torch.tensor([[0, 1]])) == (2.0, 2.0)


def test_a_batch_of_padding_only_has_a_zero_loss_that_still_backpropagates():
    logits = torch.randn(2, 3, 4, requires_grad=True)
    loss = tasks.cross_entropy(logits, torch.full((2, 4), -100))
    loss.backward()
    assert loss.item() == 0.0 and torch.equal(logits.grad, torch.zeros(2, 3, 4))
    assert tasks.accuracy(logits, torch.full((2, 4), -100)) == (0.0, 0.0)


def test_a_segmentation_target_with_a_channel_dim_of_one_is_named():
    with pytest.raises(ShapeError, match=r"\(B, C, H, W\) with \(B, H, W\).*squeeze it"):
        tasks.cross_entropy(torch.zeros(2, 3, 4, 4), torch.zeros(2, 1, 4, 4, dtype=torch.long))


def test_distillation_of_a_single_logit_is_the_kl_of_the_two_bernoullis():
    """A binary classifier's one logit (B, 1) with 0/1 targets: a softmax over one class
    would make the loss 0 whatever the student says."""
    student = torch.tensor([[0.5], [-1.0], [2.0]])
    teacher = torch.tensor([[1.5], [-1.0], [0.0]])
    targets = torch.tensor([1, 0, 1])
    p, q = torch.sigmoid(student / 2), torch.sigmoid(teacher / 2)
    by_hand = (q * (q / p).log() + (1 - q) * ((1 - q) / (1 - p)).log()).sum() / 3 * 4
    got = tasks.distillation(student, teacher, targets, temperature=2.0)
    assert got.item() == pytest.approx(by_hand.item(), rel=1e-5)
    assert got.item() > 0.01
    assert tasks.distillation(teacher, teacher, targets, 2.0).item() == pytest.approx(0, abs=1e-7)


def test_a_square_segmentation_takes_its_classes_at_dim_1():
    # C == H == W: both layouts fit the targets; a convolution gives (B, C, H, W)
    torch.manual_seed(0)
    out = torch.randn(4, 8, 8, 8)
    y = torch.randint(0, 8, (4, 8, 8))
    assert tasks.accuracy(out, y) == (float((out.argmax(1) == y).sum()), 256.0)
    assert float(tasks.cross_entropy(out, y)) == pytest.approx(float(F.cross_entropy(out, y)))
    tagged = torch.randn(4, 8, 8)  # a tagger's (B, T, C) with C == T keeps the classes last
    y2 = torch.randint(0, 8, (4, 8))
    assert tasks.accuracy(tagged, y2)[0] == float((tagged.argmax(-1) == y2).sum())


def test_one_output_with_integer_targets_beyond_0_1_is_distilled_as_a_regression():
    ages = torch.tensor([30, 41, 52, 25])
    teacher = ages.float().unsqueeze(1)
    d = tasks.distillation(teacher + 5, teacher, ages, 2.0)
    assert float(d) == pytest.approx(25.0)  # the MSE, not a saturated Bernoulli KL


def test_a_pair_over_no_example_counts_as_nothing():
    assert tasks.metric_value((float("nan"), 0), 8, where="eval batch 2") == (0.0, 0.0)
    with pytest.raises(DataError, match="not finite on eval batch 2"):
        tasks.metric_value((float("nan"), 3), 8, where="eval batch 2")
