"""A served model's selection never raises at run time (``select_or_fall_back``): an item
whose selection can only fail once encoded falls back alone to ``grid`` over its values with
NaN and inf zeroed, and the other items keep what they keep alone. Pure tensors: no engine
needed (``test_vllm.py`` plants the same fault in a running vLLM engine)."""

import pytest
import torch
from torch import nn

from zooprune import NonFiniteFeaturesError, PruneError
from zooprune.integrations.vllm.selection import TALLY, select_or_fall_back
from zooprune.pipeline import EncodedImages, Selector

D_V, D_L = 6, 5


def projector() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(D_V, 8), nn.GELU(), nn.Linear(8, D_L))


def images(grids, bad=()) -> EncodedImages:
    """Random images on ``grids``; those in ``bad`` get a NaN and an inf in their features
    and tokens (a tower gone wrong)."""
    g = torch.Generator().manual_seed(0)
    features = [torch.randn(h * w, D_V, generator=g) for h, w in grids]
    with torch.no_grad():
        projected = [projector()(f) for f in features]
    for i in bad:
        features[i][1, 2] = float("nan")
        projected[i][3, 0] = float("inf")
    return EncodedImages(features, projected, list(grids), None, None, None)


@pytest.fixture(autouse=True)
def fresh_tally():
    TALLY.reset()
    yield
    TALLY.reset()


def test_a_non_finite_image_falls_back_alone_and_the_others_keep_their_choice():
    grids = [(3, 4), (4, 4), (2, 5)]
    selector = Selector.build("zoo", keep=4, options={"num_directions": 8})
    with pytest.raises(NonFiniteFeaturesError):  # what the HF handle raises
        selector.select(images(grids, bad=[1]), projector())
    kept = select_or_fall_back(selector, images(grids, bad=[1]), projector())
    assert TALLY.fallbacks == 1
    # The others: what the selector keeps of them alone.
    for i in (0, 2):
        alone = selector.select(images(grids).item(i), projector()).images[0]
        assert torch.equal(kept.images[i].indices, alone.indices)
        assert torch.equal(kept.images[i].run, alone.run)
    # The bad one: grid's tokens, its run the zeroed values (nothing non-finite goes on).
    zeroed = images(grids, bad=[1]).item(1, finite=True)
    grid = Selector.build("grid", keep=4).select(zeroed, projector()).images[0]
    assert torch.equal(kept.images[1].indices, grid.indices)
    assert bool(torch.isfinite(kept.images[1].run).all())
    assert torch.equal(kept.images[1].run, zeroed.projected[0][grid.indices])


def test_scores_that_rank_nothing_fall_back_and_a_good_batch_is_untouched():
    grids = [(3, 4), (4, 4)]
    # A step far below float32's resolution: every central difference is 0.
    flat = Selector.build("sensitivity", keep=3, options={"estimator": "zo", "step": 1e-30})
    with pytest.raises(PruneError, match="nothing to rank by"):
        flat.select(images(grids), projector())
    kept = select_or_fall_back(flat, images(grids), projector())
    grid = Selector.build("grid", keep=3).select(images(grids), projector())
    assert [k.indices.tolist() for k in kept.images] == [k.indices.tolist() for k in grid.images]
    assert TALLY.fallbacks == 2
    # No fault, no fallback: the batch's own selection, as it is.
    selector = Selector.build("divprune", keep=3)
    kept = select_or_fall_back(selector, images(grids), projector())
    expected = selector.select(images(grids), projector())
    assert [k.indices.tolist() for k in kept.images] == [
        k.indices.tolist() for k in expected.images
    ]
    assert TALLY.fallbacks == 2


def test_a_fault_the_fallback_cannot_mend_still_raises():
    # A budget error is no run-time fault: it fails the fallback too, and is raised.
    selector = Selector.build("zoo", keep=30, options={"num_directions": 8})
    with pytest.raises(PruneError, match="keep=30 exceeds image 0's 12 visual tokens"):
        select_or_fall_back(selector, images([(3, 4)], bad=[0]), projector())
