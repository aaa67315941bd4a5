"""Small tensor helpers: the finiteness check every encoded item goes through."""

import pytest
import torch

from zooprune.select.ops import all_finite


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_all_finite_finds_one_nan_or_infinity_anywhere(dtype):
    x = torch.randn(300, 33).to(dtype)
    assert all_finite(x) is True
    for value in (float("nan"), float("inf"), float("-inf")):
        for at in (0, 17, x.numel() - 1):  # the first, a middle, the last element
            bad = x.clone().view(-1)
            bad[at] = value
            assert all_finite(bad.view(300, 33)) is False, (value, at)
    big = torch.full((4,), torch.finfo(dtype).max, dtype=dtype)
    assert all_finite(big) and all_finite(-big)  # the largest values are finite
    assert all_finite(torch.empty(0, 5, dtype=dtype))
    assert all_finite(torch.arange(5))  # integers hold no NaN
