"""Budgets: what ``keep=`` / ``ratio=`` keep of an image, and sharing an image's budget over
its crops (``split_evenly``)."""

from fractions import Fraction

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from zooprune.budget import Budget, split_evenly
from zooprune.errors import BudgetError


def test_equal_shares_with_the_remainder_to_the_first_groups():
    assert split_evenly(7, [16, 12, 12, 12, 12]) == [2, 2, 1, 1, 1]
    assert split_evenly(3, [16, 12, 12, 12, 12]) == [1, 1, 1, 0, 0]


def test_a_small_group_passes_on_what_it_cannot_take():
    assert split_evenly(10, [16, 1, 0, 16]) == [5, 1, 0, 4]
    assert split_evenly(33, [16, 1, 16]) == [16, 1, 16]


@given(st.lists(st.integers(0, 40), min_size=1, max_size=12), st.integers(0, 500))
def test_shares_fill_up_evenly(sizes, total):
    total = min(total, sum(sizes))
    shares = split_evenly(total, sizes)
    assert sum(shares) == total
    assert all(0 <= share <= size for share, size in zip(shares, sizes, strict=True))
    # Even: a group below its size holds at least as much as any other group, less one.
    for share, size in zip(shares, sizes, strict=True):
        if share < size:
            assert all(other <= share + 1 for other in shares)


def test_a_group_that_fills_up_in_a_later_round_passes_on_the_rest():
    # Round 1 gives 5 each (the first group holds 1); round 2 gives 2 each, of which the
    # second group has room for 1 only: its other one goes to the third.
    assert split_evenly(15, [1, 6, 100]) == [1, 6, 8]


def test_an_empty_group_never_takes_a_remainder_token():
    assert split_evenly(1, [0, 5]) == [0, 1]
    assert split_evenly(2, [0, 0, 5, 5]) == [0, 0, 1, 1]


def test_budget_values_become_plain_python_numbers():
    assert type(Budget(keep=np.int64(5)).keep) is int
    assert type(Budget(ratio=np.float32(0.5)).ratio) is float
    assert type(Budget(ratio=Fraction(1, 4)).ratio) is float


@pytest.mark.parametrize("ratio", ["0.5", [0.5], b"1"])
def test_a_ratio_that_is_no_number_is_refused(ratio):
    with pytest.raises(BudgetError, match="ratio must be a number"):
        Budget(ratio=ratio)


def test_a_budget_prints_as_its_argument():
    assert str(Budget(keep=7)) == "keep=7"
    assert str(Budget(ratio=0.25)) == "ratio=0.25"


def test_a_ratio_may_keep_exactly_one_token():
    assert Budget(ratio=0.25).tokens_for(4) == 1
    assert Budget(ratio=0.25).tokens_for(7) == 1
    with pytest.raises(BudgetError, match="keeps no token"):
        Budget(ratio=0.25).tokens_for(3)


def test_refusals_name_the_image():
    with pytest.raises(BudgetError, match="exceeds image 0's 3 visual tokens"):
        Budget(keep=5).tokens_for(3)
    with pytest.raises(BudgetError, match="exceeds image 2's 3 visual tokens"):
        Budget(keep=5).tokens_for(3, 2)
    with pytest.raises(BudgetError, match="keeps no token of video 1 "):
        Budget(ratio=0.1).tokens_for(3, "video 1")
