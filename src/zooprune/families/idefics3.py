"""Idefics3 and SmolVLM (crops + a global crop, pixel-shuffle connector), any engine.

How the model lays out one image (transformers v5): the processor resizes the image and,
with image splitting on, cuts it into ``rows x cols`` square crops plus a *global* crop
(the whole image at the crop size); without splitting the image is its global crop alone.
Every crop goes through the SigLIP-style tower (``p x p`` patch states) and the connector:
a pixel shuffle that concatenates each ``r x r`` window of patch states into one vector
(``r = scale_factor``), then a Linear (``modality_projection``). Each crop thus gives
``S = (p / r)^2`` tokens on an ``s x s`` grid (``s = p / r``), raster order. The prompt
spells the layout out in text tokens around the image placeholders::

    <fake_token_around_image><row_1_col_1><image>*S <fake_token_around_image><row_1_col_2>...
    ... <fake_token_around_image><global-img><image>*S<fake_token_around_image>

so the sub-crops come in raster order and the global crop last. The model itself never
learns which crops form an image (``pooler_output`` is per prompt); the adapter reads it
off the prompt (``reads_prompt``): every run of S placeholders preceded by the marker that
precedes the batch's last run (always a global crop, whatever its id) closes an image.

What "projector" means here: the pixel shuffle is a fixed regrouping, so the token-wise
projector is ``modality_projection`` (a Linear) on one shuffled vector; the projector
inputs X are the shuffled vectors ``[S, r^2 d_v]``, one per LM token. A Linear is not a
GELU MLP, so ``estimator="auto"`` runs ``jvp``. The Jacobian of a Linear is its weight,
the same at every token, so ``jvp`` gives every token the same sensitivity and ZOO-Prune
becomes max-min diversity started from each unit's first token. ``estimator="zo"`` differs
between tokens by float rounding only (about 1e-5 relative), which the per-image min-max
normalisation stretches to [0, 1]: there it ranks by rounding noise; prefer ``jvp``.

Budget semantics:

- **N** = the image's visual tokens, ``(rows * cols + 1) * S`` (``S`` without splitting).
  The marker tokens (``<fake_token_around_image>``, ``<row_i_col_j>``, ``<global-img>``,
  the newlines) are ordinary text: never scored, selected nor counted, always kept.
- ``crop_budget="split"`` (default): the image's K is shared evenly over its crops, the
  global crop first, then the sub-crops in raster order (the remainder goes to the first
  ones), and the method runs inside each crop on its ``s x s`` grid.
  ``crop_budget="global"``: one selection over all N tokens; ``grid`` and ``pool`` then
  see one ``(1, N)`` row in prompt order.
- ``handle.selection`` gives each kept token's ``crops`` (0 = the global crop, 1.. the
  sub-crops in raster order, as LLaVA-NeXT's base crop and sub-crops) and ``cells`` (row,
  column in that crop's ``s x s`` shuffled grid; each cell covers ``r x r`` patches).
  Crop boxes are unknown to the model (``boxes`` is None).

The tower has no CLS token: ``visionzip`` is refused, naming the methods that apply.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from zooprune.budget import split_evenly
from zooprune.errors import PlaceholderMismatchError
from zooprune.families.tiles import tiles_layout
from zooprune.pipeline import EncodedImages, ImageLayout

#: where the connector's projection lives in a checkpoint (transformers 5, and the hub's)
PROJECTOR_PREFIXES = (
    "model.connector.modality_projection.",
    "connector.modality_projection.",
)


def projector_from_tensors(tensors: Mapping[str, Tensor], dtype: torch.dtype) -> nn.Module:
    """The connector's projection (one Linear, no bias: the projector the methods score,
    on the shuffled vectors), rebuilt from its checkpoint tensors."""
    weight = tensors["proj.weight"]
    projection = nn.Linear(weight.shape[1], weight.shape[0], bias="proj.bias" in tensors)
    projection.load_state_dict({k.removeprefix("proj."): v for k, v in tensors.items()})
    return nn.Sequential(projection).to(dtype).eval().requires_grad_(False)


def encoded(
    features: Tensor, projected: Tensor, groups: list[list[bool]], *, encoder_output: Any = None
) -> EncodedImages:
    """Every image of a call from its crops' tensors.

    Args:
        features: ``[crops, S, r^2 d_v]`` the shuffled vectors the projection receives.
        projected: ``[crops, S, d_l]`` the tokens.
        groups: per image, ``is_global`` per crop run, in prompt order
            (:func:`crops_per_image`).
    """
    per_crop = projected.shape[1]
    side = int(round(per_crop**0.5))
    feats, tokens, layouts = [], [], []
    first = 0
    for is_global in groups:
        count = len(is_global)
        feats.append(features[first : first + count].reshape(count * per_crop, -1))
        tokens.append(projected[first : first + count].reshape(count * per_crop, -1))
        layouts.append(layout(tokens[-1], is_global, side))
        first += count
    return EncodedImages(
        features=feats,
        projected=tokens,
        grids=[(side, side) if len(g) == 1 else (1, len(g) * per_crop) for g in groups],
        cls_attention=None,
        keys=None,
        encoder_output=encoder_output,
        layouts=layouts,
    )


def crops_per_image(
    input_ids: Tensor, image_token_id: int, per_crop: int, crops: int
) -> list[list[bool]]:
    """Which crop runs of the prompts form each image: per image, ``is_global`` per run.

    A run is ``per_crop`` consecutive placeholders; runs follow the model's fill order
    (prompt by prompt). An image ends with its global crop, whose marker is the one
    before the batch's last run.
    """
    rows, cols = (input_ids == image_token_id).nonzero(as_tuple=True)
    if rows.numel() != crops * per_crop:
        raise PlaceholderMismatchError(
            f"the prompts hold {rows.numel()} image tokens but the images give {crops} crops "
            f"of {per_crop} tokens; build the prompt with the model's processor from the "
            "same images"
        )
    rows, cols = rows.view(crops, per_crop), cols.view(crops, per_crop)
    contiguous = (rows == rows[:, :1]).all() & (cols[:, 1:] == cols[:, :-1] + 1).all()
    if not bool(contiguous) or bool((cols[:, 0] == 0).any()):
        raise PlaceholderMismatchError(
            f"the image tokens do not form runs of {per_crop} after a marker token, one per "
            "crop; build the prompt with the model's processor"
        )
    markers = input_ids[rows[:, 0], cols[:, 0] - 1]
    is_global = (markers == markers[-1]).tolist()
    last_of_prompt = torch.ones(crops, dtype=torch.bool, device=rows.device)
    last_of_prompt[:-1] = rows[1:, 0] != rows[:-1, 0]
    if not all(is_global[r] for r in last_of_prompt.nonzero().flatten().tolist()):
        raise PlaceholderMismatchError(
            "a prompt's image tokens do not end with a global crop (`<global-img>`): "
            "an image is split across prompts or the markers are missing"
        )
    groups: list[list[bool]] = [[]]
    for flag in is_global:
        groups[-1].append(flag)
        if flag:
            groups.append([])
    return groups[:-1]


def kept_per_run(kept: int, runs: int, per_crop: int) -> list[int]:
    """How many of an image's ``kept`` tokens each of its ``runs`` crop runs holds under
    ``crop_budget="split"``, in prompt order (the sub-crops, then the global crop): the
    pipeline shares K over the crops in crop order (:func:`layout`: the global crop is
    crop 0), a pure function of the run count, so an engine can size each run before it
    encodes the image."""
    shares = split_evenly(kept, [per_crop] * runs)
    return shares[1:] + shares[:1]


def layout(tokens: Tensor, is_global: list[bool], side: int) -> ImageLayout:
    """One image's layout: its runs in prompt order, no separator placeholders.

    Args:
        tokens: ``[n * S, d_l]`` the image's tokens in prompt order (sub-crops, global).
        is_global: per run, whether it is the global crop (the last one).
    """
    # Crop 0 is the global crop (the whole image, as LLaVA-NeXT's base crop); sub-crops
    # keep their raster order from 1.
    crop_of_run = [
        0 if g else 1 + sum(not h for h in is_global[:r]) for r, g in enumerate(is_global)
    ]
    return tiles_layout(tokens, crop_of_run, side)
