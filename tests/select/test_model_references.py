"""ZOO-Prune, its ablations and DivPrune on real models, against references written here.

The kernels have their own tests against plain loops; these check what reaches them on a
model: which tensors are scored (the projector's inputs) and which are compared for
diversity (its outputs, what fills the placeholders), how the scores are normalised, and
how a multi-crop image's budget is shared. The references read the model's own tensors,
captured by hooks on an unpruned call, and spell the published rules out step by step:

- sensitivity (``exact``, what ``auto`` runs on a GELU MLP projector): the Frobenius norm
  of the projector's Jacobian at the token, over sqrt(d_v), the Jacobian by autograd;
- ``zoo``: weights min-max normalised over the unit, first the heaviest token, then the
  argmax of weight x the min over kept tokens of (1 - cosine) of the projected tokens;
  ``zoo-sum`` adds the diversity over its maximum instead; ``sensitivity`` takes the top k;
- ``divprune``: the same greedy without weights, from the token whose nearest neighbour is
  farthest.
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from torch import nn

import zooprune
from tests.adapters.test_llava_next import IMAGE as NEXT_IMAGE
from tests.adapters.test_llava_next import AnyResTester
from tests.select.reference import naive_maxmin_select

LLAVA_IMAGE = 1  # the tiny LLaVA's <image> id


def captured(model: nn.Module, projector: nn.Module, batch: dict) -> tuple[torch.Tensor, ...]:
    """The projector's input and output, and the language model's input embeddings, of an
    unpruned call on ``batch``."""
    seen: dict[str, torch.Tensor] = {}

    def projector_hook(module, args, output):
        seen["features"], seen["projected"] = args[0].detach(), output.detach()

    def lm_hook(module, args, kwargs):
        seen["embeds"] = kwargs["inputs_embeds"].detach()

    hooks = [
        projector.register_forward_hook(projector_hook),
        model.model.language_model.register_forward_pre_hook(lm_hook, with_kwargs=True),
    ]
    try:
        with torch.no_grad():
            model(**batch)
    finally:
        for hook in hooks:
            hook.remove()
    return seen["features"], seen["projected"], seen["embeds"]


def reference_sensitivity(projector: nn.Module, features: torch.Tensor) -> torch.Tensor:
    """``[N, d_v] -> [N]``: ||J(x)||_F / sqrt(d_v) per token, J by autograd in float64."""
    module = copy.deepcopy(projector).double()
    jacobians = torch.func.vmap(torch.func.jacrev(module))(features.double())  # [N, d_l, d_v]
    return jacobians.flatten(1).norm(dim=-1) / features.shape[-1] ** 0.5


def reference_picks(
    method: str, projector: nn.Module, features: torch.Tensor, projected: torch.Tensor, k: int
) -> list[int]:
    """One unit's k picks (indices into its rows) by the published rule of ``method``."""
    z = projected.double()
    if method == "divprune":
        return naive_maxmin_select(z, k, first="farthest_neighbour")
    s = reference_sensitivity(projector, features)
    weights = (s - s.min()) / (s.max() - s.min())
    if method == "sensitivity":
        return sorted(range(len(s)), key=lambda i: (-float(s[i]), i))[:k]
    fusion = "sum" if method == "zoo-sum" else "product"
    return naive_maxmin_select(z, k, weights=weights, fusion=fusion)


METHODS = ["zoo", "zoo-sum", "sensitivity", "divprune"]


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("keep", [5, 12, 24, 40])
def test_llava_keeps_what_the_reference_keeps(model, processor, images, method, keep):
    batch = processor(images=images[:1], text=["<s> user <image> describe"], return_tensors="pt")
    projector = model.model.multi_modal_projector
    features, projected, _ = captured(model, projector, batch)
    with zooprune.prune(model, method, keep=keep) as handle:
        model(**batch)
    (image,) = handle.selection.images
    expected = reference_picks(method, projector, features[0], projected[0], keep)
    assert image.indices.tolist() == sorted(expected)
    if method != "divprune":
        assert handle.selection.details["estimator"] == "exact"
        torch.testing.assert_close(
            image.scores.double(),
            reference_sensitivity(projector, features[0]),
            rtol=1e-5,
            atol=1e-7,
        )


@pytest.fixture(scope="module")
def next_model(tmp_path_factory: pytest.TempPathFactory) -> tuple[nn.Module, object, list]:
    tester = AnyResTester("llava-next")
    path: Path = tester.build(tmp_path_factory.mktemp("llava-next-references"))
    return tester.load(path), tester.processor(), tester.pictures()


def even_shares(total: int, sizes: list[int]) -> list[int]:
    """``total`` shared over groups: equal shares, the remainder one each to the first."""
    shares = [total // len(sizes) + (1 if g < total % len(sizes) else 0) for g in range(len(sizes))]
    assert all(s <= n for s, n in zip(shares, sizes, strict=True))  # no group overflows here
    return shares


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("crop_budget", ["split", "global"])
@pytest.mark.parametrize("picture", [0, 3])
def test_llava_next_keeps_what_the_reference_keeps_crop_by_crop(
    next_model, method, crop_budget, picture
):
    vlm, proc, pictures = next_model
    batch = proc(
        images=[pictures[picture]], text=["<s> user <image> describe"], return_tensors="pt"
    )
    projector = vlm.model.multi_modal_projector
    features, projected, embeds = captured(vlm, projector, batch)
    # The image's run as the model filled it: the base crop's and the sub-crops' projected
    # tokens (unpadded, in the model's order) and the newlines. N counts the tokens only,
    # in the run's order; each is one row of the projector's output, found by equality.
    ids = batch["input_ids"][0]
    run = embeds[0, ids == NEXT_IMAGE]
    newline = (run == vlm.model.image_newline.detach()).all(dim=-1)
    tokens = run[~newline]
    rows = projected.flatten(0, 1)
    match = (tokens[:, None, :] == rows[None, :, :]).all(dim=-1)
    assert bool((match.sum(dim=-1) == 1).all())
    row_of = match.int().argmax(dim=-1)  # token j -> its crop * P + patch
    crop_of = row_of // projected.shape[1]
    flat_features = features.flatten(0, 1)

    keep = 9
    units = (
        [torch.nonzero(crop_of == c)[:, 0] for c in range(projected.shape[0])]
        if crop_budget == "split"
        else [torch.arange(len(tokens))]
    )
    shares = even_shares(keep, [len(u) for u in units])
    expected = []
    for unit, share in zip(units, shares, strict=True):
        picks = reference_picks(method, projector, flat_features[row_of[unit]], tokens[unit], share)
        expected += unit[picks].tolist()

    with zooprune.prune(vlm, method, keep=keep, crop_budget=crop_budget) as handle:
        vlm(**batch)
    (image,) = handle.selection.images
    assert image.num_tokens == len(tokens)
    assert image.indices.tolist() == sorted(expected)
    # The record's crops are the crops the kept tokens were matched to.
    assert image.crops.tolist() == crop_of[image.indices].tolist()
