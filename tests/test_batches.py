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
