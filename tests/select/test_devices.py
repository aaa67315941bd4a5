"""Selection runs where its inputs are, whatever the default device.

A user who calls ``torch.set_default_device("cuda")`` and prunes a model on the GPU must
get what a CPU run gives, and so must one whose default stays the CPU while the model runs
on the GPU: every tensor a method or the pipeline makes must follow its inputs' device
(helpers that must be on the CPU, such as seeded generators, say so). There is no GPU
here, so the default device is set to ``meta`` (tensors without data) while the inputs
stay on the CPU: a tensor made on the default device instead of the inputs' fails to mix
with them or to give its values, and the run breaks.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch
from torch import nn

from zooprune.pipeline import EncodedImages, ImageLayout, Selector, selection_record
from zooprune.select.cdpruner import conditional_kernel, greedy_dpp_map
from zooprune.select.greedy import maxmin_select

D_V, D_L = 6, 5


@pytest.fixture
def foreign_default() -> Iterator[None]:
    """The default device set to ``meta`` for the test's calls, the CPU again after."""
    torch.set_default_device("meta")
    try:
        yield
    finally:
        torch.set_default_device("cpu")


def projector() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(D_V, 8), nn.GELU(), nn.Linear(8, D_L)).eval()


def tensors(seed: int = 0) -> dict:
    """Two images of 3 x 4 tokens (CLS attention, keys, CLS states and the instruction
    included), a two-crop image with a separator, and a video of two 2 x 3 frames: the
    tensors, made on the CPU."""
    g = torch.Generator().manual_seed(seed)
    project = projector()
    sizes = [12, 12, 10, 12]
    features = [torch.randn(n, D_V, generator=g) for n in sizes]
    with torch.no_grad():
        projected = [project(f) for f in features]
    return {
        "features": features,
        "projected": projected,
        "run": torch.cat([projected[2][:6], torch.zeros(1, D_L), projected[2][6:]]),
        "cls_attention": [torch.rand(n, generator=g) for n in sizes],
        "keys": [torch.randn(n, 4, generator=g) for n in sizes],
        "cls_features": [torch.randn(D_V, generator=g) for _ in sizes],
        "instruction": [torch.randn(t, D_L, generator=g) for t in (3, 5, 4, 2)],
        "places": [
            torch.stack([torch.zeros(n, dtype=torch.long), torch.arange(n)])
            for n in (12, 12, 11, 12)
        ],
        "two_crops": {
            "token_slots": torch.tensor([0, 1, 2, 3, 4, 5, 7, 8, 9, 10]),
            "separator_of": torch.tensor([6, 6, 6, 6, 6, 6, -1, -1, -1, -1]),
            "crop": torch.tensor([0] * 6 + [1] * 4),
            "cell": torch.tensor(
                [[0, 0], [0, 1], [0, 2], [1, 0], [1, 1], [1, 2], [0, 0], [0, 1], [1, 0], [1, 1]]
            ),
        },
        "projector": project,
    }


def call(made: dict) -> EncodedImages:
    """The call an adapter would hand over, its layouts made now (on the default device
    an adapter runs under)."""
    projected = made["projected"]
    two_crops = ImageLayout(
        packed=made["run"],
        crop_grids=[(2, 3), (2, 2)],
        patch_grids=[(2, 3), (2, 2)],
        **made["two_crops"],
    )
    layouts = [
        ImageLayout.single(projected[0], (3, 4)),
        ImageLayout.single(projected[1], (3, 4)),
        two_crops,
        ImageLayout.frames(projected[3], (2, 3), 2),
    ]
    return EncodedImages(
        features=made["features"],
        projected=projected,
        grids=[(3, 4), (3, 4), (1, 10), (2, 3)],
        cls_attention=made["cls_attention"],
        keys=made["keys"],
        encoder_output=None,
        layouts=layouts,
        cls_features=made["cls_features"],
        instruction=made["instruction"],
    )


CASES = [
    ("zoo", {}),
    ("zoo", {"estimator": "zo", "num_directions": 4}),
    ("zoo", {"estimator": "jvp", "num_directions": 4}),
    ("zoo", {"estimator": "lowrank", "rank": 2, "num_directions": 4}),
    ("zoo-sum", {}),
    ("sensitivity", {}),
    ("divprune", {}),
    ("visionzip", {"contextual": 1}),
    ("visionzip", {"contextual": 1, "cls_token": True}),
    ("cdpruner", {}),
    ("cdpruner", {"theta": 0.5}),
    ("dart", {"pivots": 2}),
    ("random", {"seed": 4}),
    ("grid", {}),
    ("pool", {}),
]
LAYOUTS = {
    "crop_budget": ("split", "global"),
    "separators": ("all", "nonempty"),
    "video_budget": ("frame", "global"),
}


def run_selection(method: str, options: dict, layout: dict, made: dict) -> list[tuple]:
    selector = Selector.build(method, keep=4, options=options | layout, layout_options=LAYOUTS)
    kept = selector.select(call(made), made["projector"])
    record = selection_record(
        kept, made["places"], method, selector.budget, encode_seconds=0.0, select_seconds=0.0
    )
    return [
        (
            image.indices,
            image.run,
            image.slots,
            image.scores,
            r.positions,
            r.separators,
            r.crops,
            r.cells,
        )
        for image, r in zip(kept.images, record.images, strict=True)
    ]


@pytest.mark.parametrize(
    "layout",
    [
        {"crop_budget": "split", "video_budget": "frame"},
        {"crop_budget": "global", "separators": "nonempty", "video_budget": "global"},
    ],
)
@pytest.mark.parametrize(("method", "options"), CASES)
def test_every_method_and_the_pipeline_follow_their_inputs_device(method, options, layout, request):
    expected = run_selection(method, options, layout, tensors())
    made = tensors()
    request.getfixturevalue("foreign_default")
    got = run_selection(method, options, layout, made)
    for want, have in zip(expected, got, strict=True):
        for a, b in zip(want, have, strict=True):
            if a is None:
                assert b is None
                continue
            assert b.device.type == "cpu"
            torch.testing.assert_close(b, a, equal_nan=True, rtol=0, atol=0)


@pytest.mark.parametrize("distances", ["rows", "matrix"])
def test_the_greedy_kernels_follow_their_inputs_device(distances, request):
    g = torch.Generator().manual_seed(1)
    z, w = torch.randn(2, 30, 8, generator=g), torch.rand(2, 30, generator=g)
    kernel = conditional_kernel(z, torch.rand(2, 30, generator=g), None)
    expected = maxmin_select(z, 5, weights=w, distances=distances)
    divprune = maxmin_select(z, 5, first="farthest_neighbour")
    dpp = greedy_dpp_map(kernel, 5)
    request.getfixturevalue("foreign_default")
    assert torch.equal(maxmin_select(z, 5, weights=w, distances=distances), expected)
    assert torch.equal(maxmin_select(z, 5, first="farthest_neighbour"), divprune)
    assert torch.equal(greedy_dpp_map(kernel, 5), dpp)
