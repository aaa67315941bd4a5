"""Sharing an image's budget over its crops (``split_evenly``)."""

from hypothesis import given
from hypothesis import strategies as st

from zooprune.budget import split_evenly


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
