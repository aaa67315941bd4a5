"""DART before the language model: the kernel against a plain loop written from the
published algorithm (pivots by norm, each pivot claiming the tokens least similar to it),
its properties, its options, and a run on a model."""

import math

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

import zooprune
from zooprune import PruneError
from zooprune.pipeline import Selector
from zooprune.select import METHODS, TokenSet
from zooprune.select.dart import dart_select, pivot_shares, similarity


def reference_dart(z: torch.Tensor, k: int, pivots: int, norm: str) -> list[int]:
    """One image, plain Python: the pivots (largest norm first, lower index on a tie), then
    each pivot in that order claims its share of the unclaimed tokens, least similar first
    (lower index on a tie)."""
    rows = [[float(v) for v in row] for row in z]
    n = len(rows)

    def size(i: int) -> float:
        return (
            sum(abs(v) for v in rows[i]) if norm == "l1" else math.sqrt(sum(v * v for v in rows[i]))
        )

    def cos(i: int, j: int) -> float:
        if size_l2[i] == 0 or size_l2[j] == 0:
            return 0.0
        return sum(a * b for a, b in zip(rows[i], rows[j], strict=True)) / (size_l2[i] * size_l2[j])

    size_l2 = [math.sqrt(sum(v * v for v in r)) for r in rows]
    count = min(pivots, k)
    chosen = sorted(range(n), key=lambda i: (-size(i), i))[:count]
    rest = k - count
    shares = [rest // count + (1 if p < rest % count else 0) for p in range(count)]
    kept = list(chosen)
    for pivot, share in zip(chosen, shares, strict=True):
        free = [i for i in range(n) if i not in kept]
        kept += sorted(free, key=lambda i: (cos(i, pivot), i))[:share]
    return kept


def token_set(z: torch.Tensor) -> TokenSet:
    return TokenSet(features=z, projected=z, projector=nn.Identity(), grid=(1, z.shape[1]))


@pytest.mark.parametrize("k", [1, 3, 8, 9, 17, 40])
@pytest.mark.parametrize("norm", ["l2", "l1"])
def test_dart_equals_the_reference(k, norm):
    g = torch.Generator().manual_seed(k)
    z = torch.randn(3, 40, 12, generator=g, dtype=torch.float64)
    picks = dart_select(z, k, pivots=8, norm=norm)
    for b in range(3):
        assert picks[b].tolist() == reference_dart(z[b], k, 8, norm)


@st.composite
def problems(draw):
    """Random tokens with exact duplicates, equal norms (sign flips) and zero rows."""
    n = draw(st.integers(1, 20))
    d = draw(st.integers(1, 6))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    z = torch.randn(n, d, generator=g, dtype=torch.float64)
    for _ in range(draw(st.integers(0, n // 2))):
        i, j = draw(st.integers(0, n - 1)), draw(st.integers(0, n - 1))
        z[i] = z[j] * draw(st.sampled_from([1.0, -1.0]))  # a duplicate, or its opposite
    if draw(st.booleans()):
        z[draw(st.integers(0, n - 1))] = 0
    return z, draw(st.integers(1, n)), draw(st.integers(1, 10)), draw(st.sampled_from(["l2", "l1"]))


@given(problems())
def test_dart_matches_the_reference_with_ties(problem):
    z, k, pivots, norm = problem
    picks = dart_select(z[None], k, pivots=pivots, norm=norm)[0].tolist()
    assert len(set(picks)) == k
    assert picks == reference_dart(z, k, pivots, norm)


def test_pivot_shares_split_the_rest_evenly():
    for k in range(1, 30):
        for pivots in range(1, k + 1):
            shares = pivot_shares(k, pivots)
            assert sum(shares) == k - pivots and len(shares) == pivots
            assert shares == sorted(shares, reverse=True) and shares[0] - shares[-1] <= 1


def test_a_pivots_duplicates_are_claimed_last():
    g = torch.Generator().manual_seed(0)
    z = torch.randn(1, 12, 4, generator=g)
    z[0, 0] *= 10  # the pivot
    z[0, 5] = z[0, 0] * 0.5  # its duplicate (same direction)
    z[0, 7] = -z[0, 0] * 0.1  # its opposite: the least duplicated of all
    assert dart_select(z, 2, pivots=1).tolist() == [[0, 7]]
    assert 5 not in dart_select(z, 11, pivots=1)[0].tolist()  # 11 of 12: all but the duplicate


def test_method_keeps_k_distinct_ascending_tokens_batch_equals_alone():
    g = torch.Generator().manual_seed(2)
    z = torch.randn(5, 36, 16, generator=g)
    z[2, 10:20] = z[2, 3]  # a flat region: duplicates
    method = METHODS["dart"]
    for options in ({}, {"pivots": 3, "pivot_norm": "l1"}, {"pivots": 50}):
        together = method(token_set(z), 12, **options)
        assert torch.equal(together.indices, method(token_set(z), 12, **options).indices)
        assert (together.indices.diff(dim=-1) > 0).all()
        assert together.scores is None
        pivots, norm = options.get("pivots", 8), options.get("pivot_norm", "l2")
        for b in range(5):
            alone = method(token_set(z[b : b + 1]), 12, **options)
            assert torch.equal(alone.indices[0], together.indices[b])
            # float32 kernel, float64 reference: the same tokens
            assert together.indices[b].tolist() == sorted(
                reference_dart(z[b].double(), 12, pivots, norm)
            )


def test_options_are_checked():
    for bad in (0, -1, 2.5, True, "8"):
        with pytest.raises(PruneError, match="pivots must be an int"):
            Selector.build("dart", keep=4, options={"pivots": bad})
    with pytest.raises(PruneError, match="pivot_norm must be one of l2, l1, got 'l3'"):
        Selector.build("dart", keep=4, options={"pivot_norm": "l3"})
    options = {"pivots": np.int64(4), "pivot_norm": "l1"}
    assert Selector.build("dart", keep=4, options=options).options == {
        "pivots": 4,
        "pivot_norm": "l1",
    }
    Selector.build("dart", keep=4).check_provided(frozenset(), "vLLM model")  # needs nothing more


def test_dart_on_a_model_keeps_what_the_reference_keeps(model, processor, images):
    batch = processor(images=images[:1], text=["<s> user <image> describe"], return_tensors="pt")
    with torch.no_grad():
        image = model.model.get_image_features(pixel_values=batch["pixel_values"], return_dict=True)
    projected = image.pooler_output[0].double()  # [64, 48]: what fills the placeholders
    with zooprune.prune(model, "dart", keep=12, pivots=4) as handle:
        model.generate(**batch, max_new_tokens=2, do_sample=False)
    assert handle.selection.images[0].indices.tolist() == sorted(
        reference_dart(projected, 12, 4, "l2")
    )


def test_defaults_are_eight_pivots_by_l2_norm():
    z = torch.randn(2, 30, 6, generator=torch.Generator().manual_seed(5))
    assert torch.equal(dart_select(z, 12), dart_select(z, 12, pivots=8, norm="l2"))


def test_ties_among_many_duplicates_go_to_the_lowest_index():
    # 600 tokens, 5 distinct: the claims tie in hundreds; only a stable sort (on a CPU,
    # for long rows) gives the lowest indices, as the reference does.
    g = torch.Generator().manual_seed(6)
    base = torch.randn(5, 4, generator=g, dtype=torch.float64)
    z = base[torch.randint(0, 5, (600,), generator=g)]
    assert dart_select(z[None], 40, pivots=3)[0].tolist() == reference_dart(z, 40, 3, "l2")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_identical_tokens_get_identical_similarities_wherever_they_sit(dtype):
    # A matrix product may compute a row in an edge tile by another kernel (here: rows
    # 0 and n - 1 of 9 x 64 differ by a rounding), which broke "lowest index on a tie".
    g = torch.Generator().manual_seed(0)
    for n in (9, 23, 100):
        for d in (17, 64, 129):
            x = torch.randn(1, n, d, generator=g, dtype=dtype)
            x[:, -1] = x[:, 0]
            unit = x / x.norm(dim=-1, keepdim=True)
            s = similarity(unit, unit[:, 1])
            assert torch.equal(s[:, 0], s[:, -1]), (n, d)
