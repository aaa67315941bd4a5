import pytest
import torch
from hypothesis import assume, given
from hypothesis import strategies as st

import zooprune.select.greedy as greedy_module
from tests.select.reference import TIE_DISTANCE, naive_maxmin_select
from zooprune.select.greedy import DUPLICATE_DISTANCE, maxmin_select, pairwise_distances
from zooprune.select.sensitivity import minmax_normalize


@st.composite
def problems(draw):
    """Random features with optional duplicated rows and coarse (tie-prone) weights."""
    n = draw(st.integers(1, 24))
    d = draw(st.integers(1, 6))
    seed = draw(st.integers(0, 2**31 - 1))
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, d, generator=g, dtype=torch.float64)
    for _ in range(draw(st.integers(0, n // 2))):  # exact duplicates of earlier rows
        i, j = draw(st.integers(0, n - 1)), draw(st.integers(0, n - 1))
        z[i] = z[j]
    levels = draw(st.sampled_from([2, 4, 1000]))  # few levels -> many exact weight ties
    w = minmax_normalize(torch.randint(0, levels, (1, n), generator=g).double())[0]
    k = draw(st.integers(1, n))
    return z, w, k


def check_greedy_property(z, w, picks, fusion):
    """At every step the kernel's pick maximises the brute-force score (within rounding)."""
    unit = z / z.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    dist = 1 - unit @ unit.T
    dist[dist < TIE_DISTANCE] = 0
    for step in range(1, len(picks)):
        chosen = picks[:step]
        rest = [i for i in range(len(z)) if i not in chosen]
        div = dist[rest][:, chosen].amin(dim=1)
        if fusion == "product":
            score = w[rest] * div
        else:
            score = w[rest] + (div / div.max() if div.max() > 0 else 0 * div)
        best = score.max()
        assert picks[step] in rest
        assert score[rest.index(picks[step])] >= best - 1e-9


@given(problems(), st.sampled_from(["product", "sum"]), st.sampled_from(["matrix", "rows"]))
def test_weighted_greedy_matches_reference(problem, fusion, distances):
    z, w, k = problem
    picks = maxmin_select(z[None], k, weights=w[None], fusion=fusion, distances=distances)
    picks = picks[0].tolist()
    reference = naive_maxmin_select(z, k, weights=w, fusion=fusion)
    assert len(set(picks)) == k
    assert picks[0] == reference[0]  # argmax of the weights, lowest index on ties
    check_greedy_property(z, w, picks, fusion)
    if picks != reference:  # only a rounding-level near-tie may separate them
        step = next(i for i, (a, b) in enumerate(zip(picks, reference, strict=True)) if a != b)
        check_greedy_property(z, w, reference[: step + 1], fusion)


@given(problems())
def test_divprune_matches_reference(problem):
    z, _, k = problem
    picks = maxmin_select(z[None], k, first="farthest_neighbour")[0].tolist()
    reference = naive_maxmin_select(z, k, first="farthest_neighbour")
    assert len(set(picks)) == k
    assert picks[0] == reference[0]
    check_greedy_property(z, torch.ones(len(z), dtype=z.dtype), picks, "product")


@pytest.mark.parametrize("distances", ["matrix", "rows", "auto"])
def test_exact_results_on_random_float64_inputs(distances):
    g = torch.Generator().manual_seed(1)
    for n, k in [(50, 1), (50, 5), (50, 17), (50, 50), (7, 3)]:
        z = torch.randn(n, 12, generator=g, dtype=torch.float64)
        w = torch.rand(n, generator=g, dtype=torch.float64)
        for fusion in ("product", "sum"):
            picks = maxmin_select(z[None], k, weights=w[None], fusion=fusion, distances=distances)
            assert picks[0].tolist() == naive_maxmin_select(z, k, weights=w, fusion=fusion)
        assert maxmin_select(z[None], k, first="farthest_neighbour")[0].tolist() == (
            naive_maxmin_select(z, k, first="farthest_neighbour")
        )


def test_the_kernel_uses_the_documented_duplicate_threshold():
    assert DUPLICATE_DISTANCE == TIE_DISTANCE


@st.composite
def float32_problems(draw):
    """float32 tokens, some exact or near duplicates (relative noise 1e-5: 1 - cos about
    1e-10, a duplicate under the documented threshold), continuous weights, k up to N so
    that the last picks are often among duplicates of kept tokens, all scoring 0."""
    n = draw(st.integers(2, 32))
    d = draw(st.integers(2, 12))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    z = torch.randn(n, d, generator=g)
    for _ in range(draw(st.integers(1, n // 2 + 1))):
        i, j = draw(st.integers(0, n - 1)), draw(st.integers(0, n - 1))
        noise = draw(st.sampled_from([0.0, 1e-5]))
        z[i] = z[j] * (1 + noise * torch.randn(d, generator=g))
    w = minmax_normalize(torch.rand(1, n, generator=g))[0]
    k = draw(st.sampled_from([n, max(1, n - 1), draw(st.integers(1, n))]))
    return z, w, k


@given(float32_problems(), st.sampled_from(["product", "sum"]))
def test_rows_and_matrix_agree_in_float32_with_duplicates(problem, fusion):
    # Exact ties arise here only between duplicates of kept tokens (distance 0 by the
    # threshold, both paths): the lowest index must win them. Anything closer than 1e-4
    # but not equal in float64 is a rounding-level near tie, where float32 may differ.
    z, w, k = problem
    margins: list[float] = []
    reference = naive_maxmin_select(
        z.double(), k, weights=w.double(), fusion=fusion, margins=margins
    )
    assume(all(m == 0 or m > 1e-4 for m in margins))
    picks = {
        mode: maxmin_select(z[None], k, weights=w[None], fusion=fusion, distances=mode)[0].tolist()
        for mode in ("matrix", "rows")
    }
    assert picks["matrix"] == picks["rows"] == reference


def test_distances_are_exactly_symmetric():
    # A plain float64 product gave d(i, j) != d(j, i) in the last bit here, which broke the
    # tie of a mutual nearest pair (DivPrune's first pick) towards the higher index.
    z = torch.tensor(
        [
            [-0.0885, -0.8177, -0.0859, 1.0580, -1.1850],
            [0.7234, 0.3948, -1.1193, 1.7883, -1.0398],
            [-0.0409, -1.4316, -2.0372, 1.2282, 0.4258],
            [0.0113, -0.1685, -0.8224, 1.2477, 0.4109],
            [0.4661, -0.8619, 1.0094, 0.1516, 0.2915],
            [-0.4963, -0.2369, 0.7369, -0.7099, 0.4032],
            [-1.0474, -0.1393, 0.7425, 0.5063, -0.1901],
            [0.6725, 0.4140, -0.7273, 1.5317, -0.5618],
            [0.0297, 1.1535, -0.1104, 1.1242, -0.6462],
            [-1.1536, 0.1411, 0.9456, 0.8198, -1.8845],
        ],
        dtype=torch.float64,
    )
    g = torch.Generator().manual_seed(4)
    for x in (z[None], torch.randn(2, 500, 40, generator=g)):  # several blocks too
        d = pairwise_distances(x)
        assert torch.equal(d, d.mT)
        unit = x / x.norm(dim=-1, keepdim=True)
        torch.testing.assert_close(d, (1 - unit @ unit.mT).clamp_min(0), atol=1e-5, rtol=0)


def test_rows_and_matrix_pick_alike_on_a_batch():
    g = torch.Generator().manual_seed(5)
    z = torch.randn(3, 300, 24, generator=g)
    w = torch.rand(3, 300, generator=g)
    mask = torch.ones(3, 300, dtype=torch.bool)
    mask[1, 200:] = False
    rows = maxmin_select(z, 30, weights=w, mask=mask, distances="rows")
    matrix = maxmin_select(z, 30, weights=w, mask=mask, distances="matrix")
    assert torch.equal(rows, matrix)
    with pytest.raises(ValueError, match="needs every distance"):
        maxmin_select(z, 3, first="farthest_neighbour", distances="rows")


def test_ties_go_to_the_lowest_index_and_zero_scores_come_last():
    # Orthonormal rows make every distance exactly 0 or 1.
    e = torch.eye(4, dtype=torch.float64)
    z = torch.stack([e[0], e[1], e[1], e[2], e[3], e[0]])  # rows 2 and 5 duplicate 1 and 0
    w = torch.tensor([1.0, 0.5, 0.5, 0.0, 0.5, 1.0], dtype=torch.float64)
    picks = maxmin_select(z[None], 6, weights=w[None])[0].tolist()
    # 0 (max weight, lowest index of the tie with 5); then 1 (w 0.5, div 1, beats 4 by
    # index); then 4; then everything left scores 0 (duplicates, or weight 0): index order.
    assert picks == [0, 1, 4, 2, 3, 5]
    assert picks == naive_maxmin_select(z, 6, weights=w)


def test_batched_with_masks_equals_each_image_alone():
    g = torch.Generator().manual_seed(2)
    z = torch.randn(3, 20, 8, generator=g)
    w = torch.rand(3, 20, generator=g)
    mask = torch.ones(3, 20, dtype=torch.bool)
    mask[1, 12:] = False  # image 1 has only 12 real tokens
    mask[2, 5:] = False
    picks = maxmin_select(z, 9, weights=w, mask=mask)
    for b, n in enumerate([20, 12, 5]):
        alone = maxmin_select(z[b : b + 1, :n], min(9, n), weights=w[b : b + 1, :n])[0]
        assert picks[b, : min(9, n)].tolist() == alone.tolist()
        assert (picks[b, min(9, n) :] == -1).all()


def test_masked_farthest_neighbour_ignores_padding():
    z = torch.tensor([[[1.0, 0], [0.9, 0.1], [-1, 0], [0, 1]]])
    mask = torch.tensor([[True, True, False, True]])
    picks = maxmin_select(z, 3, mask=mask, first="farthest_neighbour")[0].tolist()
    assert 2 not in picks and sorted(picks) == [0, 1, 3]


def test_rejects_bad_k():
    with pytest.raises(ValueError, match="k must be in"):
        maxmin_select(torch.randn(1, 5, 3), 6, first="farthest_neighbour")
    with pytest.raises(ValueError, match="needs weights"):
        maxmin_select(torch.randn(1, 5, 3), 2)


def test_half_precision_inputs_are_scored_in_float32():
    g = torch.Generator().manual_seed(3)
    z = torch.randn(1, 40, 16, generator=g)
    w = torch.rand(1, 40, generator=g)
    half = maxmin_select(z.bfloat16(), 10, weights=w)
    full = maxmin_select(z.bfloat16().float(), 10, weights=w)
    assert torch.equal(half, full)


def test_normalize():
    s = torch.tensor([[2.0, 4.0, 3.0], [5.0, 5.0, 5.0]])
    out = minmax_normalize(s)
    torch.testing.assert_close(out[0], torch.tensor([0.0, 1.0, 0.5]), atol=1e-6, rtol=0)
    assert torch.equal(out[1], torch.ones(3))
    masked = minmax_normalize(torch.tensor([[1.0, 9.0, 3.0]]), torch.tensor([[True, False, True]]))
    torch.testing.assert_close(masked, torch.tensor([[0.0, 0.0, 1.0]]), atol=1e-6, rtol=0)


def test_auto_takes_rows_where_they_pay_and_the_matrix_elsewhere():
    from zooprune.select.greedy import MATRIX_BYTES, ROWS_BELOW, distance_mode

    assert ROWS_BELOW == 4 and MATRIX_BYTES == 2**30
    # On a CPU: rows for k * 4 <= N, else the matrix.
    assert distance_mode("auto", 1, 576, 144, "max_weight", "cpu") == "rows"
    assert distance_mode("auto", 1, 576, 145, "max_weight", "cpu") == "matrix"
    # Elsewhere, or for DivPrune's first pick (every distance), the matrix...
    assert distance_mode("auto", 1, 576, 8, "max_weight", "meta") == "matrix"
    assert distance_mode("auto", 1, 576, 8, "farthest_neighbour", "cpu") == "matrix"
    # ...unless the batch's N x N float32 matrices would pass 1 GiB.
    side = 2**14  # 2^28 entries: exactly 1 GiB for one image
    assert distance_mode("auto", 1, side, side, "max_weight", "meta") == "matrix"
    assert distance_mode("auto", 2, side, side, "max_weight", "meta") == "rows"
    assert distance_mode("auto", 1, side + 1, side, "max_weight", "meta") == "rows"
    assert distance_mode("matrix", 9, 10**6, 1, "max_weight", "cpu") == "matrix"
    assert distance_mode("rows", 1, 10, 9, "max_weight", "cpu") == "rows"
    with pytest.raises(ValueError, match="unknown distances mode"):
        distance_mode("both", 1, 10, 2, "max_weight", "cpu")


def test_divprunes_first_pick_ignores_padding_even_where_it_is_nearest():
    # Token 0's nearest neighbour is the padded token 3: with the padding ignored, token 0
    # is the farthest from its nearest real neighbour and is picked first.
    z = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [0.1, 1.0], [1.0, 0.01]]])
    mask = torch.tensor([[True, True, True, False]])
    picks = maxmin_select(z, 2, mask=mask, first="farthest_neighbour")[0].tolist()
    assert picks[0] == 0 and 3 not in picks
    lone = maxmin_select(
        z, 2, mask=torch.tensor([[False, True, False, False]]), first="farthest_neighbour"
    )
    assert lone[0].tolist() == [1, -1]  # one real token: it, then an empty slot


def test_top_k_breaks_ties_towards_the_lower_index_in_long_rows():
    from zooprune.select.methods import _top_k

    scores = torch.randint(0, 3, (2, 900), generator=torch.Generator().manual_seed(2)).float()
    picks = _top_k(None, 100, scores)
    for b in range(2):
        expected = sorted(range(900), key=lambda i: (-float(scores[b, i]), i))[:100]
        assert picks[b].tolist() == expected


def test_float64_scores_are_ranked_in_float64():
    # Two candidates whose scores differ by 1e-12: float32 would call it a tie (lowest
    # index), float64 sees the larger one.
    z = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, -1.0]], dtype=torch.float64)
    w = torch.tensor([1.0, 0.5, 0.5 + 1e-12], dtype=torch.float64)
    for distances in ("matrix", "rows"):
        picks = maxmin_select(z[None], 2, weights=w[None], distances=distances)[0].tolist()
        assert picks == [0, 2]


@pytest.mark.parametrize("distances", ["rows", "matrix"])
@pytest.mark.parametrize("fusion", ["product", "sum"])
def test_a_batch_picks_what_each_image_picks_alone_whatever_their_spreads(fusion, distances):
    # The sum fusion scales each image's distances by that image's largest one: a tight
    # cluster beside a spread-out image must not borrow the other's scale.
    g = torch.Generator().manual_seed(5)
    centre = torch.randn(1, 8, generator=g)
    tight = centre + 0.05 * torch.randn(12, 8, generator=g)
    spread = torch.randn(12, 8, generator=g)
    features = torch.stack([tight, spread])
    weights = torch.rand(2, 12, generator=g)
    batch = maxmin_select(features, 6, weights=weights, fusion=fusion, distances=distances)
    for i in range(2):
        alone = maxmin_select(
            features[i : i + 1], 6, weights=weights[i : i + 1], fusion=fusion, distances=distances
        )
        assert batch[i].tolist() == alone[0].tolist()


def clustered(images: int, n: int, d: int, seed: int) -> torch.Tensor:
    """Tokens around a few centres each, as an image's are: the greedy's next picks are
    then often not the highest scores of the step before, so rows mode computes its rows
    in many blocks."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(images, 12, d, generator=g)
    label = torch.randint(0, 12, (images, n), generator=g)
    near = centres.gather(1, label[..., None].expand(-1, -1, d))
    return near + 0.5 * torch.randn(images, n, d, generator=g)


@pytest.fixture
def row_stores(monkeypatch) -> list:
    """Every rows-mode store maxmin_select makes in the test, in order."""
    made = []

    class Recorded(greedy_module._PickRows):
        def __init__(self, *args):
            super().__init__(*args)
            made.append(self)

    monkeypatch.setattr(greedy_module, "_PickRows", Recorded)
    return made


def test_rows_in_blocks_pick_as_the_matrix_does_and_each_image_as_alone(monkeypatch, row_stores):
    greedy = greedy_module
    made = row_stores
    z, w = (
        clustered(3, 400, 24, seed=6),
        torch.rand(3, 400, generator=torch.Generator().manual_seed(7)),
    )
    mask = torch.ones(3, 400, dtype=torch.bool)
    mask[1, 250:] = False
    k = 200  # more rows than the first store holds (4 blocks): it grows
    rows = maxmin_select(z, k, weights=w, mask=mask, distances="rows")
    assert torch.equal(rows, maxmin_select(z, k, weights=w, mask=mask, distances="matrix"))
    (batch,) = made
    assert batch.kept.shape[1] > 4 * greedy.ROW_BLOCK
    assert (batch.count > k).any()  # speculative rows were computed, not only the picks'
    for i in range(3):
        alone = maxmin_select(
            z[i : i + 1], k, weights=w[i : i + 1], mask=mask[i : i + 1], distances="rows"
        )
        assert torch.equal(alone[0], rows[i])
    # Where the matrices would not fit, each pick's row alone: no rows kept
    monkeypatch.setattr(greedy, "MATRIX_BYTES", 1)
    assert torch.equal(maxmin_select(z, k, weights=w, mask=mask, distances="rows"), rows)
    assert len(made) == 1 + 3


def test_rows_mode_computes_the_picks_rows_in_few_products(monkeypatch):
    # The point of computing the likeliest next picks' rows with a missing one: on Gaussian
    # tokens the next picks mostly are among them, so a few products serve every pick
    # (measured: 3 products of 32 rows for 64 picks, 5 for 144), where one row per pick
    # would take a product per pick.
    greedy = greedy_module
    products = []

    class Counted(greedy._PickRows):
        def _compute(self, image, pick, scores):
            products.append(image)
            super()._compute(image, pick, scores)

    monkeypatch.setattr(greedy, "_PickRows", Counted)
    g = torch.Generator().manual_seed(3)
    z, w = torch.randn(2, 576, 64, generator=g), torch.rand(2, 576, generator=g)
    for k in (64, 144):
        products.clear()
        rows = maxmin_select(z, k, weights=w, distances="rows")
        assert torch.equal(rows, maxmin_select(z, k, weights=w, distances="matrix"))
        for image in (0, 1):
            assert products.count(image) <= k // 16


@pytest.mark.parametrize("first", ["max_weight", "farthest_neighbour"])
def test_precomputed_distances_pick_as_the_kernels_own(first):
    # A caller's [B, N, N] distances (the kernel benchmark passes them) are used as they
    # are: the same picks as the kernel's own matrix of cosines, and as the reference.
    g = torch.Generator().manual_seed(8)
    z = clustered(2, 60, 8, seed=9)
    w = torch.rand(2, 60, generator=g)
    weights = w if first == "max_weight" else None
    given = maxmin_select(z, 20, weights=weights, first=first, distances=pairwise_distances(z))
    own = maxmin_select(z, 20, weights=weights, first=first, distances="matrix")
    assert torch.equal(given, own)
    # with padding: a padded token is nobody's neighbour and never picked
    mask = torch.rand(2, 60, generator=g) > 0.3
    given_masked = maxmin_select(
        z, 20, weights=weights, mask=mask, first=first, distances=pairwise_distances(z)
    )
    own_masked = maxmin_select(z, 20, weights=weights, mask=mask, first=first, distances="matrix")
    assert torch.equal(given_masked, own_masked)
    assert mask.gather(1, given_masked.clamp_min(0)).all()
    for i in range(2):
        reference = naive_maxmin_select(
            z[i].double(), 20, weights=None if weights is None else w[i].double(), first=first
        )
        assert given[i].tolist() == reference


def test_rows_mode_keeps_rows_up_to_exactly_the_matrix_budget(monkeypatch, row_stores):
    greedy, made = greedy_module, row_stores
    z, w = clustered(1, 100, 8, seed=10), torch.rand(1, 100)
    expected = maxmin_select(z, 10, weights=w, distances="matrix")
    for budget, kept in ((100 * 100 * 4, True), (100 * 100 * 4 - 1, False)):
        monkeypatch.setattr(greedy, "MATRIX_BYTES", budget)
        made.clear()
        assert torch.equal(maxmin_select(z, 10, weights=w, distances="rows"), expected)
        assert bool(made) is kept  # 1 x N x N float32 bytes fit the budget, or one past it
