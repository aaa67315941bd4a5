"""The engine-neutral pipeline on synthetic tensors, no model: budgets over crops, grouped
method calls, the kept runs, the record, and what it refuses."""

import math

import pytest
import torch
from torch import nn

from zooprune import BudgetError, NonFiniteFeaturesError, PruneError
from zooprune.budget import split_evenly
from zooprune.pipeline import EncodedImages, ImageLayout, Selector, selection_record
from zooprune.select import METHODS, MethodResult
from zooprune.select.registry import register_method

D_V, D_L = 6, 5


def projector() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(D_V, 8), nn.GELU(), nn.Linear(8, D_L))


def encoded(grids, layouts=None, seed=0) -> EncodedImages:
    """Images on the given grids, features random, tokens the projector's."""
    g = torch.Generator().manual_seed(seed)
    features = [torch.randn(h * w, D_V, generator=g) for h, w in grids]
    with torch.no_grad():
        projected = [projector()(f) for f in features]
    return EncodedImages(features, projected, list(grids), None, None, None, layouts)


def two_crops(projected: torch.Tensor, first: int) -> ImageLayout:
    """One image of two crops: tokens [0, first) on a 2-row grid, the rest on one row."""
    n = projected.shape[0]
    index = torch.arange(n)
    crop = (index >= first).long()
    return ImageLayout(
        packed=projected,
        token_slots=index,
        separator_of=torch.full((n,), -1),
        crop=crop,
        cell=torch.stack([torch.zeros(n, dtype=torch.long), index], -1),
        crop_grids=[(2, first // 2), (1, n - first)],
        patch_grids=[(2, first // 2), (1, n - first)],
    )


@pytest.fixture
def spy():
    """A registered method that keeps its first k tokens and logs each call's batch."""
    calls = []

    @register_method("_spy", "test only")
    def keep_first(tokens, k, *, scores: str = "index"):
        calls.append(tuple(tokens.projected.shape))
        batch, n = tokens.projected.shape[:2]
        made = {
            "index": torch.arange(n, dtype=torch.float32).expand(batch, -1) + 1,
            "nan": torch.full((batch, n), math.nan),
            "zero": torch.zeros(batch, n),
            # the first image of the call ranks, the others do not
            "nan_second": torch.cat([torch.ones(1, n), torch.full((batch - 1, n), math.nan)]),
            "zero_second": torch.cat([torch.ones(1, n), torch.zeros(batch - 1, n)]),
        }[scores]
        return MethodResult(torch.arange(k).expand(batch, -1), scores=made)

    yield calls
    del METHODS["_spy"]


def test_units_of_equal_shape_go_through_the_method_in_one_call(spy):
    images = encoded([(4, 4), (3, 3), (4, 4), (4, 4)])
    kept = Selector.build("_spy", keep=3).select(images, projector())
    assert sorted(spy) == [(1, 9, D_L), (3, 16, D_L)]  # ragged N: two calls, not four
    assert [image.indices.tolist() for image in kept.images] == [[0, 1, 2]] * 4
    # A batched call of a real method gives each image what it gets alone.
    together = Selector.build("zoo", keep=3).select(images, projector()).images
    for i, image in enumerate(together):
        one = EncodedImages(
            [images.features[i]], [images.projected[i]], [images.grids[i]], None, None, None
        )
        alone = Selector.build("zoo", keep=3).select(one, projector()).images[0]
        assert torch.equal(image.indices, alone.indices)
        assert torch.equal(image.scores, alone.scores)


def test_ratio_keeps_a_pure_function_of_each_images_n():
    kept = Selector.build("grid", ratio=0.5).select(encoded([(4, 4), (3, 3)]), projector())
    assert [image.indices.numel() for image in kept.images] == [8, 4]


def test_the_budget_is_split_evenly_over_crops_and_a_crop_may_keep_nothing(spy):
    images = encoded([(1, 10)])
    images.layouts = [two_crops(images.projected[0], first=4)]
    kept = Selector.build("_spy", keep=5).select(images, projector()).images[0]
    assert split_evenly(5, [4, 6]) == [3, 2]
    assert kept.indices.tolist() == [0, 1, 2, 4, 5]  # each crop's first tokens
    assert sorted(spy) == [(1, 4, D_L), (1, 6, D_L)]
    # keep=1: the first crop takes it, the second keeps nothing and is never scored.
    spy.clear()
    kept = Selector.build("_spy", keep=1).select(images, projector()).images[0]
    assert kept.indices.tolist() == [0] and spy == [(1, 4, D_L)]
    assert torch.equal(kept.scores[:4], torch.arange(4.0) + 1)
    assert bool(kept.scores[4:].isnan().all())  # NaN where nothing was ranked
    # global: one selection over all N.
    kept = Selector.build(
        "_spy",
        keep=5,
        options={"crop_budget": "global"},
        layout_options={"crop_budget": ("split", "global")},
    ).select(images, projector())
    assert kept.images[0].indices.tolist() == [0, 1, 2, 3, 4]


def test_kept_runs_hold_the_kept_tokens_and_the_separators_policy(spy):
    # Two rows of three tokens, each row closed by a separator: slots t t t s t t t s.
    tokens = torch.arange(6 * D_L, dtype=torch.float32).view(6, D_L)
    newline = torch.full((D_L,), -1.0)
    packed = torch.cat([tokens[:3], newline[None], tokens[3:], newline[None]])
    slots = torch.tensor([0, 1, 2, 4, 5, 6])
    layout = ImageLayout(
        packed=packed,
        token_slots=slots,
        separator_of=torch.tensor([3, 3, 3, 7, 7, 7]),
        crop=torch.zeros(6, dtype=torch.long),
        cell=torch.stack([torch.arange(6) // 3, torch.arange(6) % 3], -1),
        crop_grids=[(2, 3)],
        patch_grids=[(2, 3)],
    )
    images = EncodedImages([torch.randn(6, D_V)], [tokens], [(2, 3)], None, None, None, [layout])
    for policy, kept_slots in (("all", [0, 1, 3, 7]), ("nonempty", [0, 1, 3])):
        selector = Selector.build(
            "_spy",
            keep=2,
            options={"separators": policy},
            layout_options={"separators": ("all", "nonempty")},
        )
        image = selector.select(images, nn.Identity()).images[0]
        assert image.indices.tolist() == [0, 1]
        assert image.slots.tolist() == kept_slots
        assert torch.equal(image.run, packed[kept_slots])
    # The default keeps every separator, as the authors do.
    selector = Selector.build("_spy", keep=2, layout_options={"separators": ("all", "nonempty")})
    assert selector.select(images, nn.Identity()).images[0].slots.tolist() == [0, 1, 3, 7]


def test_a_run_with_one_separator_keeps_it(spy):
    # Two rows of two tokens and one separator between them: slots t t s t t.
    tokens = torch.arange(4 * D_L, dtype=torch.float32).view(4, D_L)
    packed = torch.cat([tokens[:2], torch.full((1, D_L), -1.0), tokens[2:]])
    layout = ImageLayout(
        packed=packed,
        token_slots=torch.tensor([0, 1, 3, 4]),
        separator_of=torch.tensor([2, 2, -1, -1]),
        crop=torch.zeros(4, dtype=torch.long),
        cell=torch.stack([torch.arange(4) // 2, torch.arange(4) % 2], -1),
        crop_grids=[(2, 2)],
        patch_grids=[(2, 2)],
    )
    images = EncodedImages([torch.randn(4, D_V)], [tokens], [(2, 2)], None, None, None, [layout])
    image = Selector.build("_spy", keep=3).select(images, nn.Identity()).images[0]
    assert image.slots.tolist() == [0, 1, 2, 3]
    assert torch.equal(image.run, packed[[0, 1, 2, 3]])


def test_text_separators_place_the_whole_run_from_its_placeholders():
    from zooprune.errors import PlaceholderMismatchError
    from zooprune.families.mistral3 import rows_layout

    # Rows of 3 tokens, a text separator after each row but the last: slots t t t s t t t.
    layout = rows_layout(torch.randn(6, D_L), (2, 3))
    assert layout.text_separators and layout.slots == 7
    placed = torch.tensor([[1] * 6, [10, 11, 12, 14, 15, 16]])  # prompt 1, from position 10
    assert layout.run_positions(placed).tolist() == [[1] * 7, list(range(10, 17))]
    assert layout.run_positions(placed[:, :0]).shape == (2, 0)  # no placeholders: none
    with pytest.raises(PlaceholderMismatchError, match="from prompt 1, position 10 are not"):
        layout.run_positions(torch.tensor([[1] * 6, list(range(10, 16))]))
    # Placeholder separators (a slot of the run each): the placeholders are every slot.
    filled = rows_layout(torch.randn(6, D_L), (2, 3), break_embedding=torch.zeros(D_L))
    every = torch.tensor([[0] * 7, list(range(3, 10))])
    assert torch.equal(filled.run_positions(every), every)


def test_the_record_maps_kept_tokens_to_prompt_positions():
    images = encoded([(4, 4), (3, 3)])
    selector = Selector.build("grid", keep=4)
    kept = selector.select(images, projector())
    # Image 0 in prompt 1 at positions 10.., image 1 in prompt 0 at 2..
    located = [
        torch.stack([torch.ones(16, dtype=torch.long), torch.arange(10, 26)]),
        torch.stack([torch.zeros(9, dtype=torch.long), torch.arange(2, 11)]),
    ]
    record = selection_record(
        kept, located, "grid", selector.budget, encode_seconds=0.5, select_seconds=0.25
    )
    assert [image.prompt for image in record.images] == [1, 0]
    for image, start in zip(record.images, (10, 2), strict=True):
        assert torch.equal(image.positions, start + image.indices)
        width = image.grid[1]
        assert torch.equal(
            image.cells, torch.stack([image.indices // width, image.indices % width], -1)
        )
    assert record.kept == 8 and record.total == 25 and record.budget == "keep=4"
    assert (record.encode_seconds, record.select_seconds) == (0.5, 0.25)
    assert [image.patch_grids for image in record.images] == [((4, 4),), ((3, 3),)]
    assert [image.boxes for image in record.images] == [None, None]
    # An image whose crops carry boxes in the original picture: the record gives them.
    images = encoded([(1, 10)])
    layout = two_crops(images.projected[0], first=4)
    layout.boxes = [(0, 0, 8, 8), (0, 8, 8, 20)]
    images.layouts = [layout]
    kept = Selector.build("grid", keep=4).select(images, projector())
    located = [torch.stack([torch.full((10,), 2), torch.arange(5, 15)])]
    (image,) = selection_record(
        kept, located, "grid", selector.budget, encode_seconds=0.0, select_seconds=0.0
    ).images
    assert image.boxes == ((0, 0, 8, 8), (0, 8, 8, 20)) and image.prompt == 2
    assert image.patch_grids == ((2, 2), (1, 6))


def test_non_finite_features_name_the_image():
    images = encoded([(3, 3), (3, 3)])
    images.features[1][4, 2] = float("nan")
    with pytest.raises(NonFiniteFeaturesError, match="image 1's visual features"):
        Selector.build("divprune", keep=2).select(images, projector())
    images = encoded([(3, 3), (3, 3)])
    images.projected[0][1, 0] = float("inf")
    with pytest.raises(NonFiniteFeaturesError, match="image 0's visual tokens contain NaN"):
        Selector.build("divprune", keep=2).select(images, projector())


def test_items_are_numbered_within_their_kind():
    from zooprune.pipeline import item_keys, item_names

    image = two_crops(torch.zeros(6, D_L), first=2)
    video = ImageLayout.frames(torch.zeros(8, D_L), (2, 2), 2)
    layouts = [image, video, image, image, video]
    assert item_keys(layouts) == [
        ("image", 0),
        ("video", 0),
        ("image", 1),
        ("image", 2),
        ("video", 1),
    ]
    assert item_names(layouts) == ["image 0", "video 0", "image 1", "image 2", "video 1"]


@pytest.mark.parametrize(
    ("scores", "message"), [("nan", "NaN or infinite"), ("zero", "0 for every token")]
)
def test_scores_that_rank_nothing_are_refused(spy, scores, message):
    images = encoded([(3, 3), (2, 2)])
    with pytest.raises(PruneError, match=f"scored image 0 {message}.*scores='{scores}'"):
        Selector.build("_spy", keep=2, options={"scores": scores}).select(images, projector())


def test_a_methods_refusal_names_the_image_and_crop():
    images = encoded([(1, 10)])
    images.layouts = [two_crops(images.projected[0], first=4)]
    # keep=4 over two crops: 2 each, and 2 contextual tokens leave no dominant one.
    images.cls_attention = [torch.rand(10)]
    images.keys = [torch.randn(10, 3)]
    with pytest.raises(PruneError, match="image 0, crop 0: visionzip's contextual=2"):
        Selector.build("visionzip", keep=4, options={"contextual": 2}).select(images, projector())


def test_build_checks_every_value_before_any_call():
    with pytest.raises(PruneError, match="crop_budget must be one of split, global"):
        Selector.build(
            "zoo",
            keep=4,
            options={"crop_budget": "rows"},
            layout_options={"crop_budget": ("split", "global")},
        )
    with pytest.raises(
        PruneError,
        match=r"^crop_budget is a layout option this model's family does not take \(the "
        r"layout options it takes: none\)$",
    ):
        Selector.build("zoo", keep=4, options={"crop_budget": "split"})
    with pytest.raises(PruneError, match=r"it takes: crop_budget, video_budget\)$"):
        Selector.build(
            "zoo",
            keep=4,
            options={"separators": "all"},
            layout_options={"crop_budget": ("split",), "video_budget": ("frame",)},
        )
    selector = Selector.build("zoo", ratio=0.5, options={"num_directions": 8})
    assert selector.options == {"num_directions": 8} and selector.layout == {}
    assert selector.needs == frozenset()
    assert Selector.build("visionzip", keep=4, options={"cls_token": True}).needs == {
        "cls_attention",
        "cls_token",
    }


@pytest.mark.parametrize("method", ["zoo", "zoo-sum", "sensitivity"])
def test_an_estimator_only_an_mlp_has_is_refused_before_any_image(method):
    normed = nn.Sequential(nn.LayerNorm(D_V), *projector())  # a norm before the MLP
    for estimator in ("exact", "lowrank"):
        selector = Selector.build(method, keep=4, options={"estimator": estimator})
        selector.check_projector(projector())  # the plain MLP runs either
        with pytest.raises(PruneError, match=f"estimator '{estimator}' needs a Linear"):
            selector.check_projector(normed)
    for options in ({"estimator": "jvp"}, {"estimator": "zo"}, {}):
        Selector.build(method, keep=4, options=options).check_projector(normed)


def test_an_item_alone_is_every_per_item_quantity_of_that_item():
    call = encoded([(3, 3), (2, 4), (1, 5)])
    n = [9, 8, 5]
    call.cls_attention = [torch.rand(k) for k in n]
    call.keys = [torch.randn(k, 3) for k in n]
    call.cls_features = [torch.randn(D_V) for _ in n]
    call.instruction = [torch.randn(t, D_L) for t in (2, 3, 4)]
    call.encoder_output = object()
    call.features[1][2, 1] = float("nan")
    call.projected[1][0, 0] = float("-inf")
    call.keys[1][3, 1] = float("inf")
    fields = ("features", "projected", "cls_attention", "keys", "cls_features", "instruction")
    one = call.item(1)
    for name in fields:
        (value,) = getattr(one, name)
        assert value is getattr(call, name)[1], name
    assert one.grids == [(2, 4)] and one.layouts == [call.layouts[1]]
    assert one.encoder_output is call.encoder_output
    mended = call.item(1, finite=True)
    for name in fields:
        (value,) = getattr(mended, name)
        given = getattr(call, name)[1]
        assert bool(torch.isfinite(value).all()), name
        bad = ~torch.isfinite(given)
        assert torch.equal(value[~bad], given[~bad]) and bool((value[bad] == 0).all()), name
    assert bool(torch.isnan(call.features[1]).any())  # the call itself is left as it was
    none = encoded([(2, 2)]).item(0)
    assert none.cls_attention is None and none.keys is None and none.instruction is None


def video_call(frames=3, grid=(2, 2), images=1):
    """``images`` images of 3 x 3 tokens, then one video of ``frames`` frames on ``grid``."""
    call = encoded([(3, 3)] * images + [(frames * grid[0], grid[1])])
    video = ImageLayout.frames(call.projected[-1], grid, frames)
    call.layouts = call.layouts[:images] + [video]
    call.grids[-1] = grid
    return call


def test_a_videos_budget_is_shared_over_its_frames_or_over_the_whole_video(spy):
    layout = {"video_budget": ("frame", "global")}
    per_frame = Selector.build("_spy", keep=5, layout_options=layout).select(
        video_call(), projector()
    )
    image, video = per_frame.images
    assert image.indices.numel() == 5 and image.layout.kind == "image"
    # 5 over 3 frames of 4: 2, 2, 1, the first frames taking the remainder, one call.
    assert torch.bincount(video.layout.crop[video.indices], minlength=3).tolist() == [2, 2, 1]
    whole = Selector.build(
        "_spy", keep=5, options={"video_budget": "global"}, layout_options=layout
    ).select(video_call(), projector())
    # global: the first 5 of all 12 tokens, 4 from the first frame and 1 from the second
    video = whole.images[1]
    assert torch.bincount(video.layout.crop[video.indices], minlength=3).tolist() == [4, 1, 0]
    record = selection_record(
        whole,
        [torch.stack([torch.zeros(s, dtype=torch.long), torch.arange(s)]) for s in (9, 12)],
        "_spy",
        Selector.build("_spy", keep=5).budget,
        encode_seconds=0.0,
        select_seconds=0.0,
    )
    assert [(s.kind, s.image) for s in record.images] == [("image", 0), ("video", 0)]
    assert record.videos == [record.images[1]]
    assert torch.equal(record.images[1].crops, record.images[1].indices // 4)


def test_prompts_of_different_lengths_longer_than_the_tokens_width_select_as_alone():
    # CDPruner reads each image's prompt: one call pads them to the longest (13 text
    # tokens, more than the 5 numbers of a token) and must choose as each image alone.
    call = encoded([(3, 3), (3, 3), (3, 3)])
    call.instruction = [
        torch.randn(t, D_L, generator=torch.Generator().manual_seed(t)) for t in (9, 13, 2)
    ]
    selector = Selector.build("cdpruner", keep=4)
    together = selector.select(call, projector()).images
    for i, image in enumerate(together):
        alone = selector.select(call.item(i), projector()).images[0]
        assert torch.equal(image.indices, alone.indices)


def test_frames_of_one_token_each_are_units_of_their_own(spy):
    # 4 frames of a single token: each frame is a unit of one token and keeps it.
    call = video_call(frames=4, grid=(1, 1), images=0)
    kept = Selector.build("_spy", keep=3).select(call, projector()).images[0]
    assert kept.indices.tolist() == [0, 1, 2]  # 3 over 4 frames: 1, 1, 1, 0
    assert torch.equal(kept.layout.crop[kept.indices], torch.tensor([0, 1, 2]))


def test_errors_name_the_video_and_its_frame(spy):
    call = video_call(images=0)
    call.features[0][5, 0] = float("nan")  # frame 1
    with pytest.raises(NonFiniteFeaturesError, match="video 0's visual features"):
        Selector.build("divprune", keep=3).select(call, projector())
    with pytest.raises(BudgetError, match="keep=13 exceeds video 0's 12 visual tokens"):
        Selector.build("divprune", keep=13).select(video_call(images=0), projector())
    with pytest.raises(PruneError, match="scored video 0, frame 0 0 for every token"):
        Selector.build("_spy", keep=3, options={"scores": "zero"}).select(
            video_call(images=0), projector()
        )


def test_a_video_layout_must_fill_its_placeholders():
    with pytest.raises(ValueError, match="fills 13 placeholders, not 12"):
        ImageLayout.frames(torch.zeros(12, D_L), (2, 2), 3, closing=True)
    closed = ImageLayout.frames(torch.zeros(13, D_L), (2, 2), 3, closing=True)
    assert closed.separator_slots.tolist() == [12]
    assert bool((closed.separator_of == 12).all())


def test_frame_and_single_layouts_on_grids_that_are_not_square():
    # 2 frames of 2 x 3 tokens: frame-major, each frame raster order, no separator.
    video = ImageLayout.frames(torch.zeros(12, D_L), (2, 3), 2)
    index = torch.arange(12)
    assert torch.equal(video.token_slots, index)
    assert torch.equal(video.crop, index // 6)
    within = index % 6
    assert torch.equal(video.cell, torch.stack([within // 3, within % 3], -1))
    assert video.cell.dtype == torch.long and video.separator_of.dtype == torch.long
    assert torch.equal(video.separator_of, torch.full((12,), -1))
    assert video.separator_slots.numel() == 0 and video.slots == 12
    assert video.crop_grids == video.patch_grids == [(2, 3), (2, 3)] and video.kind == "video"
    image = ImageLayout.single(torch.zeros(6, D_L), (2, 3))
    assert torch.equal(image.cell, torch.tensor([[0, 0], [0, 1], [0, 2], [1, 0], [1, 1], [1, 2]]))
    assert torch.equal(image.crop, torch.zeros(6, dtype=torch.long))
    assert torch.equal(image.separator_of, torch.full((6,), -1))
    assert image.crop_grids == image.patch_grids == [(2, 3)] and image.kind == "image"
    assert not image.text_separators and image.placeholders == 6


def test_joined_parts_keep_their_order_and_refuse_extras():
    images, videos = encoded([(2, 2)]), video_call(images=0)
    both = EncodedImages.joined([images, videos], {"image": 1, "video": 2})
    assert [layout.kind for layout in both.layouts] == ["image", "video"]
    assert both.features[0] is images.features[0] and both.features[1] is videos.features[0]
    assert both.projected[0] is images.projected[0] and both.projected[1] is videos.projected[0]
    assert both.grids == [(2, 2), (2, 2)] and both.encoder_output == {"image": 1, "video": 2}
    images.keys = [torch.zeros(4, 3)]
    with pytest.raises(ValueError, match="extras"):
        EncodedImages.joined([images, videos], None)


def test_a_unit_that_ranks_nothing_is_named_even_after_a_good_one(spy):
    # Two images of one size go through the method in one call; the second scores NaN.
    call = encoded([(3, 3), (3, 3)])
    selector = Selector.build("_spy", keep=2, options={"scores": "nan_second"})
    with pytest.raises(PruneError, match=r"scored image 1 NaN or infinite \(scores='nan_second'\)"):
        selector.select(call, projector())
    zero = Selector.build("_spy", keep=2, options={"scores": "zero_second"})
    with pytest.raises(PruneError, match="scored image 1 0 for every token"):
        zero.select(call, projector())


def test_items_are_the_chosen_ones_in_the_order_asked_and_left_as_they_are():
    g = torch.Generator().manual_seed(4)
    features = [torch.randn(n, D_V, generator=g) for n in (4, 6, 9)]
    projected = [torch.randn(n, 5, generator=g) for n in (4, 6, 9)]
    features[2][1, 0] = float("nan")
    encoded = EncodedImages(features, projected, [(2, 2), (2, 3), (3, 3)], None, None, None)
    some = encoded.items([2, 0])
    assert some.grids == [(3, 3), (2, 2)] and some.layouts == [
        encoded.layouts[2],
        encoded.layouts[0],
    ]
    assert some.features[0] is features[2] and some.projected[1] is projected[0]  # no copy
    assert some.cls_attention is None and some.instruction is None
    zeroed = encoded.items([2], finite=True).features[0]
    assert bool(torch.isfinite(zeroed).all()) and float(zeroed[1, 0]) == 0.0
    assert torch.equal(zeroed[0], features[2][0])
