import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from zooprune.select.spatial import grid_indices, nearest_centre, pool_to_centres, random_indices


@given(st.integers(1, 30), st.integers(1, 30), st.data())
def test_grid_indices_are_k_distinct_sorted_cells(height, width, data):
    k = data.draw(st.integers(1, height * width))
    cells = grid_indices(height, width, k)
    assert cells.shape == (k,)
    assert cells.tolist() == sorted(set(cells.tolist()))
    assert 0 <= int(cells.min()) and int(cells.max()) < height * width


def test_square_budgets_are_strided_subsampling():
    # 64 of 24 x 24: the centre cell of every 3 x 3 window, as plain striding would give.
    cells = grid_indices(24, 24, 64)
    expected = [r * 24 + c for r in range(1, 24, 3) for c in range(1, 24, 3)]
    assert cells.tolist() == expected
    assert grid_indices(24, 24, 576).tolist() == list(range(576))


def test_grid_is_spread_over_the_whole_image():
    cells = grid_indices(24, 24, 63)
    rows, cols = cells // 24, cells % 24
    for part in (rows < 12, rows >= 12, cols < 12, cols >= 12):
        assert 25 <= int(part.sum()) <= 38  # about half the points on each side


def test_pooling_averages_each_cell_into_its_nearest_centre():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 6 * 6, 3, generator=g, dtype=torch.float64)
    centres = grid_indices(6, 6, 4)
    assign = nearest_centre(6, 6, centres)
    pooled = pool_to_centres(x, assign, 4)
    for j, centre in enumerate(centres.tolist()):
        cy, cx = divmod(centre, 6)
        members = []
        for cell in range(36):
            y, xx = divmod(cell, 6)
            dists = [((y - c // 6) ** 2 + (xx - c % 6) ** 2) for c in centres.tolist()]
            if min(range(4), key=lambda i: (dists[i], i)) == j:
                members.append(cell)
        assert assign[members].eq(j).all()
        torch.testing.assert_close(pooled[:, j], x[:, members].mean(dim=1))
    # 2 x 2 pooling windows of 3 x 3 on a 6 x 6 grid
    assert centres.tolist() == [7, 10, 25, 28]


def test_random_indices_reproducible_and_uniform():
    assert torch.equal(random_indices(100, 10, seed=3), random_indices(100, 10, seed=3))
    assert not torch.equal(random_indices(100, 10, seed=3), random_indices(100, 10, seed=4))
    counts = torch.zeros(20)
    for seed in range(400):
        counts[random_indices(20, 5, seed=seed)] += 1
    assert counts.min() > 60 and counts.max() < 140  # expectation 100 each


@pytest.mark.parametrize("k", [0, 37])
def test_bad_k(k):
    with pytest.raises(ValueError):
        grid_indices(6, 6, k)
    with pytest.raises(ValueError):
        random_indices(36, k, seed=0)


def test_grid_rows_grow_until_no_row_is_wider_than_the_grid():
    # 10 points on 2 x 9: sqrt(10 * 2 / 9) rounds to 1 row, which cannot hold 10 of 9
    # columns, so two rows of 5 at the centres of 5 equal bins of the width.
    assert grid_indices(2, 9, 10).tolist() == [0, 2, 4, 6, 8, 9, 11, 13, 15, 17]
    assert grid_indices(5, 7, 1).tolist() == [2 * 7 + 3]  # one point: the centre cell
    assert grid_indices(1, 1, 1).tolist() == [0]
    assert grid_indices(3, 5, 15).tolist() == list(range(15))


def test_every_cell_goes_to_its_nearest_centre_on_a_grid_that_is_not_square():
    height, width = 3, 7
    centres = grid_indices(height, width, 4)
    got = nearest_centre(height, width, centres).tolist()
    for cell in range(height * width):
        y, x = divmod(cell, width)
        dists = [(y - c // width) ** 2 + (x - c % width) ** 2 for c in centres.tolist()]
        assert got[cell] == min(range(4), key=lambda i: (dists[i], i))


def test_random_keeps_one_or_all():
    assert random_indices(9, 1, seed=0).shape == (1,)
    assert random_indices(9, 9, seed=0).tolist() == list(range(9))
