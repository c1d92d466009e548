import pytest
import torch

from mesimp_compress.batches import batch_size, count_batches, first_batch, split_batch
from mesimp_compress.errors import DataError


def test_split_accepts_tensor_or_tuple_inputs():
    x, y = torch.zeros(3, 2), torch.zeros(3)
    assert split_batch((x, y))[0] == (x,)
    inputs, _ = split_batch(((x, x), y))
    assert len(inputs) == 2 and batch_size(inputs) == 3


@pytest.mark.parametrize("bad, match", [
    ({"x": 1}, "dict"), ((1, 2, 3), "length 3"), ("abc", "str"), ((None, 1), "inputs must be"),
])
def test_malformed_batches_are_data_errors(bad, match):
    with pytest.raises(DataError, match=match):
        split_batch(bad)


def test_generators_and_empty_data_are_refused():
    with pytest.raises(DataError, match="re-iterable"):
        count_batches((b for b in [1]), where="train data")
    with pytest.raises(DataError, match="no batches"):
        count_batches([], where="train data")
    with pytest.raises(DataError, match="no batches"):
        first_batch([], where="eval data")
    assert count_batches([(torch.zeros(1), torch.zeros(1))] * 3, where="x") == (3, "its len()")


def test_data_that_is_not_iterable_is_a_data_error():
    from mesimp_compress.batches import check_reiterable

    with pytest.raises(DataError, match="eval data: expected an iterable .* got int"):
        check_reiterable(5, where="eval data")


def test_a_length_that_fails_is_counted_by_a_pass_instead():
    from mesimp_compress.batches import count_batches

    class NoLen(list):
        def __len__(self):
            raise RuntimeError("no len")

    assert count_batches(NoLen([1, 2, 3]), where="train data") == (3, "its first pass")


def test_epoch_batches_cuts_a_pass_and_spares_the_counting_pass():
    from mesimp_compress.batches import count_batches

    class Endless:  # no len(): without a limit, counting it would never end
        def __iter__(self):
            while True:
                yield 1

    assert count_batches(Endless(), where="train data", limit=7) == (7, "epoch_batches")
    assert count_batches([1] * 5, where="train data", limit=3) == (3, "epoch_batches")
    assert count_batches([1] * 5, where="train data", limit=9) == (5, "its len()")


def _forward(input_ids, attention_mask=None, token_type_ids=None):
    """A forward's signature, as Hugging Face models have it."""


class _Model:
    forward = staticmethod(_forward)


def test_dict_batches_pass_their_inputs_in_the_order_of_forward():
    from collections import UserDict

    from mesimp_compress.batches import KeywordBatches
    from mesimp_compress.inputs import forward_order

    ids, mask, types, y = torch.ones(2, 5), torch.zeros(2, 5), torch.full((2, 5), 2), torch.ones(2)
    order = forward_order(_Model())
    assert order == ["input_ids", "attention_mask", "token_type_ids"]
    data = KeywordBatches(
        [{"labels": y, "token_type_ids": types, "input_ids": ids, "attention_mask": mask},
         ((ids,), y)],  # other batches pass unchanged
        order, "train data")
    assert len(data) == 2
    (a, b, c), d = next(iter(data))
    assert (a is ids, b is mask, c is types, d is y) == (True,) * 4
    assert split_batch(list(data)[1]) == ((ids,), y)
    # a BatchEncoding is a UserDict; train and eval data share what the first batch gave
    keys: dict = {}
    train = KeywordBatches([UserDict({"input_ids": ids, "label": y})], order, "train data", keys)
    assert split_batch(next(iter(train))) == ((ids,), y)
    evaluation = KeywordBatches([{"input_ids": ids, "attention_mask": mask, "label": y}], order,
                                "eval data", keys)
    with pytest.raises(DataError, match=r"eval data batch 1 gives the inputs \['attention_mask', "
                                        r"'input_ids'\], train data batch 1 gave \['input_ids'\]"):
        list(evaluation)


@pytest.mark.parametrize(
    ("batch", "match"),
    [
        ({"input_ids": 1}, r"train data batch 1: a dict batch keeps its targets under 'labels' "
                           r"\(or 'label', 'targets', 'target'\); got keys \['input_ids'\]"),
        ({"pixels": 1, "labels": 2}, r"batch key 'pixels' is not a parameter of the model's "
                                     r"forward \(input_ids, attention_mask, token_type_ids\)"),
        ({"input_ids": 1, "token_type_ids": 1, "labels": 2},
         r"give \['input_ids', 'token_type_ids'\] but not 'attention_mask', which the model's "
         r"forward takes before them"),
        ({"labels": 2}, "a dict batch holds no inputs besides its targets 'labels'"),
    ],
)
def test_dict_batches_that_do_not_fit_forward_are_named(batch, match):
    from mesimp_compress.batches import KeywordBatches
    from mesimp_compress.inputs import forward_order

    with pytest.raises(DataError, match=match):
        list(KeywordBatches([batch], forward_order(_Model()), "train data"))
