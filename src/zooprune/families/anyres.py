"""AnyRes layouts: LLaVA-NeXT and LLaVA-OneVision, whatever engine runs them.

How the model lays out one image (transformers v5, ``pack_image_features``): the image is
encoded as a *base* crop (the whole image resized to the tower's square input) and, when
AnyRes applies, ``rows x cols`` sub-crops of the image resized into the best grid
pinpoint. The prompt holds, for that image, one run of ``<image>`` placeholders:

- the base crop's ``side x side`` tokens (``side = image_size / patch``), no separator;
- the sub-crops merged into one ``(rows * side) x (cols * side)`` grid, cut back to the
  image's aspect ratio (unpadding), for OneVision bilinearly shrunk when larger than
  ``anyres_max_m`` allows, each of its rows followed by the learned ``image_newline``.

A OneVision image in a multi-image prompt is its base crop alone, then one newline.

Budget semantics:

- **N** (what ``keep=`` / ``ratio=`` count) is the image's visual tokens: base crop plus
  the unpadded grid. The newline separators are **not** visual tokens: they are never
  scored nor selected and not counted in N or K.
- ``crop_budget="split"`` (default, the ZOO-Prune authors' choice for LLaVA-NeXT): the
  image's K is shared evenly over its crops (base first, then the sub-crops in raster
  order; the remainder goes to the first crops; a crop left with fewer tokens than its
  share after unpadding passes the rest on), and the method runs inside each crop on its
  own, on the grid the crop's tokens form in the prompt. ``crop_budget="global"``: one
  selection over all N tokens; spatial methods (``grid``, ``pool``) then see them as one
  ``(1, N)`` row in prompt order.
- ``separators="all"`` (default, as the authors): every newline stays, also after a row
  whose tokens were all pruned, so the language model still sees the row structure.
  ``separators="nonempty"``: the newline of a row with no kept token goes too. A kept
  newline keeps its place (after its row).

For OneVision images that ``anyres_max_m`` shrank, the candidates are the shrunk tokens
(the ones the language model sees); their "projector inputs" for sensitivity scores are
the same bilinear shrink of the crops' projector inputs, an approximation, since the
projector is not linear. ``handle.selection`` maps each kept token to its crop and to the
patch cell of that crop (for shrunk tokens: the cell nearest the token's sample point),
with each crop's box in the original image, so heatmaps can be drawn.

The layout is taken from the engine's own packing: :func:`encoded` runs it on a tensor
carrying each token's crop coordinates, so unpadding and shrinking are never
re-implemented here, and each engine's tokens get the layout its own packing gives them.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor
from transformers.image_processing_utils import select_best_resolution
from transformers.models.llava_next.modeling_llava_next import (
    get_anyres_image_grid_shape,
    image_size_to_num_patches,
)

from zooprune.errors import PruneError
from zooprune.families.llava import square_grid
from zooprune.pipeline import Box, EncodedImages, ImageLayout

#: ``pack(per_image, newline)``: an engine's packing of each image's crop tokens
#: (``[crops, T, c]``) into its run, ``newline`` (``[c]``) after each row of the grid
Pack = Callable[[list[Tensor], Tensor], list[Tensor]]

# Channels of the coordinate tensor packed alongside the features: kind (0 = separator,
# 1 = base crop, 2 = sub-crop grid), then row and column in the crop's (merged) grid.
_KIND, _ROW, _COL = 0, 1, 2


def crops_per_image(
    config: Any, image_sizes: Sequence[Any], images_per_prompt: Sequence[int] | None = None
) -> list[int]:
    """How many crops (base included) the model encodes per image. With
    ``images_per_prompt`` (OneVision's ``batch_num_images``), only an image alone in its
    prompt is split into crops, as OneVision does."""
    crops = [
        image_size_to_num_patches(
            size, config.image_grid_pinpoints, config.vision_config.image_size
        )
        for size in image_sizes
    ]
    if images_per_prompt is None:
        return crops
    alone = [int(n) == 1 for n in images_per_prompt for _ in range(int(n))]
    return [n if single else 1 for n, single in zip(crops, alone, strict=True)]


def crop_grid(config: Any, size: tuple[int, int], crops: int) -> tuple[int, int]:
    """``(rows, cols)`` of the image's sub-crops; ``(0, 0)`` when it has none."""
    if crops == 1:
        return (0, 0)
    return tuple(
        get_anyres_image_grid_shape(
            list(size), config.image_grid_pinpoints, config.vision_config.image_size
        )
    )


def whole_image_box(size: tuple[int, int]) -> Box:
    """LLaVA-NeXT's lone crop: the whole image, squashed to the tower's input."""
    height, width = size
    return (0.0, 0.0, float(height), float(width))


def padded_square_box(size: tuple[int, int]) -> Box:
    """OneVision's lone crop (an image in a multi-image prompt): the image padded to a
    centred square, then resized."""
    height, width = size
    side = max(height, width)
    top, left = (side - height) // 2, (side - width) // 2
    return (float(-top), float(-left), float(side - top), float(side - left))


def boxes(
    config: Any,
    size: tuple[int, int],
    grid: tuple[int, int],
    single_crop_box: Callable[[tuple[int, int]], Box] = whole_image_box,
) -> list[Box]:
    """Each crop's ``(top, left, bottom, right)`` in the original image's pixels.

    The base crop is the whole image resized (squashed) to the tower's input; the
    sub-crops tile the image resized into the best pinpoint with its aspect kept and
    centred (the image processor's ``get_image_patches``).
    """
    height, width = size
    if grid == (0, 0):
        return [single_crop_box(size)]
    best_h, best_w = select_best_resolution((height, width), config.image_grid_pinpoints)
    # get_patch_output_size: fit the image into the pinpoint, the other side rounded up.
    if best_w / width < best_h / height:
        new_h, new_w = min(math.ceil(height * best_w / width), best_h), best_w
    else:
        new_h, new_w = best_h, min(math.ceil(width * best_h / height), best_w)
    top, left = (best_h - new_h) // 2, (best_w - new_w) // 2
    scale_y, scale_x = new_h / height, new_w / width
    crop = config.vision_config.image_size
    found: list[Box] = [(0.0, 0.0, float(height), float(width))]
    for r in range(grid[0]):
        for c in range(grid[1]):
            found.append(
                (
                    (r * crop - top) / scale_y,
                    (c * crop - left) / scale_x,
                    ((r + 1) * crop - top) / scale_y,
                    ((c + 1) * crop - left) / scale_x,
                )
            )
    return found


def encoded(
    config: Any,
    features: Tensor,
    packed_tokens: list[Tensor],
    image_sizes: Sequence[Any],
    crops: list[int],
    pack: Pack,
    *,
    single_crop_box: Callable[[tuple[int, int]], Box] = whole_image_box,
    strategy: str = "default",
    cls_attention: Tensor | None = None,
    keys: Tensor | None = None,
    encoder_output: Any = None,
) -> EncodedImages:
    """The call's images from what an engine computed.

    Args:
        config: the model's (HF) config: its vision config and ``image_grid_pinpoints``.
        features: ``[P, T, d_v]`` the projector inputs of all P crops.
        packed_tokens: per image, ``[S, d_l]`` the run the engine packed (tokens and
            newlines).
        image_sizes: per image, its ``(height, width)``.
        crops: per image, its crops (:func:`crops_per_image`).
        pack: the engine's own packing (see :data:`Pack`).
        single_crop_box: where a lone crop lies in its image (:func:`whole_image_box`,
            or OneVision's :func:`padded_square_box`).
        strategy: the vision feature strategy, named in the refusal of a mismatch.
        cls_attention, keys: ``[P, T]`` and ``[P, T, d_k]`` when VisionZip needs them.
    """
    side = config.vision_config.image_size // config.vision_config.patch_size
    total, per_crop, d_v = features.shape
    if per_crop != side * side or total != sum(crops):
        raise PruneError(
            f"the projector saw {total} crops of {per_crop} tokens, expected {sum(crops)} "
            f"crops of {side} x {side}; is the feature strategy {strategy!r} right for this "
            "tower?"
        )
    sizes = [tuple(int(v) for v in size) for size in image_sizes]
    grids = [crop_grid(config, size, n) for size, n in zip(sizes, crops, strict=True)]
    # Everything per crop token that must follow the engine's packing, in one tensor:
    # features, coordinates, and the CLS attention and keys when asked for.
    parts = [features.float(), _coordinates(side, crops, grids).to(features.device)]
    if cls_attention is not None:
        parts += [cls_attention[..., None].float(), keys.float()]
    carried = torch.cat(parts, dim=-1)
    newline = torch.zeros(carried.shape[-1], device=carried.device)
    packed_carried = pack(list(carried.split(crops)), newline)

    layouts, feats, projected, attn, key_list = [], [], [], [], []
    for i, (carry, tokens) in enumerate(zip(packed_carried, packed_tokens, strict=True)):
        if carry.shape[0] != tokens.shape[0]:
            raise RuntimeError(
                f"image {i}: packing the coordinates gave {carry.shape[0]} slots, the "
                f"engine's own features {tokens.shape[0]}"
            )
        coords = carry[:, d_v : d_v + 3]
        crop_boxes = boxes(config, sizes[i], grids[i], single_crop_box)
        layout = _layout(tokens, coords, side, grids[i], crop_boxes)
        layouts.append(layout)
        slots = layout.token_slots
        feats.append(carry[slots, :d_v].to(features.dtype))
        projected.append(tokens[slots])
        if cls_attention is not None:
            attn.append(carry[slots, d_v + 3])
            key_list.append(carry[slots, d_v + 4 :])
    return EncodedImages(
        features=feats,
        projected=projected,
        grids=[_image_grid(layout) for layout in layouts],
        cls_attention=attn if cls_attention is not None else None,
        keys=key_list if cls_attention is not None else None,
        encoder_output=encoder_output,
        layouts=layouts,
    )


def _coordinates(side: int, crops: list[int], grids: list[tuple[int, int]]) -> Tensor:
    """``[P, side * side, 3]`` (kind, row, column) of every token of every crop.

    Base crop tokens: kind 1 and their cell. Sub-crop tokens: kind 2 and their cell in the
    merged ``(rows * side) x (cols * side)`` grid, which the model then unpads and maybe
    shrinks: coordinates are linear, so the bilinear shrink yields each token's sample
    point in that grid.
    """
    cell = torch.arange(side * side)
    row, col = (cell // side).float(), (cell % side).float()
    out = []
    for count, (_, cols) in zip(crops, grids, strict=True):
        coords = torch.zeros(count, side * side, 3)
        coords[:, :, _KIND] = 2.0
        coords[0, :, _KIND] = 1.0
        coords[0, :, _ROW], coords[0, :, _COL] = row, col
        for q in range(count - 1):
            coords[q + 1, :, _ROW] = (q // cols) * side + row
            coords[q + 1, :, _COL] = (q % cols) * side + col
        out.append(coords)
    return torch.cat(out)


def _layout(
    tokens: Tensor, coords: Tensor, side: int, grid: tuple[int, int], boxes: list[Box]
) -> ImageLayout:
    """One image's layout from its packed coordinates.

    Args:
        tokens: ``[S, d_l]`` the model's packed run for the image.
        coords: ``[S, 3]`` the packed (kind, row, column); separators are all zero.
        grid: ``(rows, cols)`` of its sub-crops, ``(0, 0)`` for none.
    """
    device = tokens.device
    coords = coords.to(device)
    kind = coords[:, _KIND]
    is_token = kind > 0.5
    token_slots = is_token.nonzero().flatten()
    separator_slots = (~is_token).nonzero().flatten()
    in_grid = kind[token_slots] > 1.5  # a sub-crop token (else the base crop)
    rows, cols = max(grid[0], 1) * side, max(grid[1], 1) * side
    r = coords[token_slots, _ROW].round().long().clamp(0, rows - 1)
    c = coords[token_slots, _COL].round().long().clamp(0, cols - 1)
    crop = torch.where(in_grid, 1 + (r // side) * grid[1] + c // side, 0)
    cell = torch.stack([r % side, c % side], dim=-1)

    # A token's separator is the next one after it, unless the base crop ends first (the
    # base crop has no newline of its own when sub-crops follow).
    separator_of = torch.full_like(token_slots, -1)
    if separator_slots.numel():
        nxt = torch.searchsorted(separator_slots, token_slots)
        has = nxt < separator_slots.numel()
        candidate = separator_slots[nxt.clamp(max=separator_slots.numel() - 1)]
        same_part = (kind[(candidate - 1).clamp(min=0)] > 1.5) == in_grid
        separator_of = torch.where(has & same_part, candidate, separator_of)

    # The grid each crop's tokens form in the prompt: its distinct prompt rows x the rest.
    prompt_row = torch.cumsum(~is_token, dim=0)[token_slots]
    crops = 1 + grid[0] * grid[1]
    crop_grids = [(side, side)]
    for q in range(1, crops):
        members = crop == q
        count = int(members.sum())
        height = int(prompt_row[members].unique().numel())
        if count and height * (count // height) == count:
            crop_grids.append((height, count // height))
        else:  # unpadded away (empty), or not a rectangle: no grid to speak of
            crop_grids.append((1, count))
    return ImageLayout(
        packed=tokens,
        token_slots=token_slots,
        separator_of=separator_of,
        crop=crop,
        cell=cell,
        crop_grids=crop_grids,
        patch_grids=[(side, side)] * crops,
        boxes=boxes,
    )


def _image_grid(layout: ImageLayout) -> tuple[int, int]:
    """The image's grid for the record: its one crop's, else one row of all N tokens."""
    used = layout.crop.unique()
    if used.numel() == 1:
        return layout.crop_grids[int(used[0])]
    return (1, layout.token_slots.numel())


def onevision_videos(
    pooled: Tensor,
    runs: list[Tensor],
    frames: list[int],
    *,
    encoder_output: Any = None,
    attention: Tensor | None = None,
) -> EncodedImages:
    """OneVision's videos as items: each frame is one crop, its projected tokens pooled
    bilinearly to half the side (the model's ``apply_pooling``), and one ``image_newline``
    closes the video's run (a separator, always kept). A video's N is frames x the pooled
    grid; ``video_budget`` shares its K over the frames or over all of them.

    The tokens' "projector inputs" for sensitivity are the same bilinear pool of the
    frames' projector inputs: an approximation, since the model pools after its
    (non-linear) projector.

    Args:
        pooled: ``[sum(frames), T', d_v]`` each frame's projector inputs, pooled.
        runs: per video ``[frames_i * T' + 1, d_l]`` the run the model fills: its pooled
            tokens, frame after frame, then the newline.
        frames: each video's frame count.
        attention: ``[sum(frames), T']`` the attention each token receives in the tower,
            pooled as the tokens are, or None.
    """
    per_frame = pooled.shape[1]
    grid = square_grid(per_frame)
    counts = [f * per_frame for f in frames]
    return EncodedImages(
        features=[v.reshape(n, -1) for v, n in zip(pooled.split(frames), counts, strict=True)],
        projected=[run[:n] for run, n in zip(runs, counts, strict=True)],
        grids=[grid] * len(runs),
        cls_attention=None,
        keys=None,
        encoder_output=encoder_output,
        layouts=[
            ImageLayout.frames(run, grid, f, closing=True)
            for run, f in zip(runs, frames, strict=True)
        ],
        tower_attention=None
        if attention is None
        else [v.reshape(-1) for v in attention.split(frames)],
    )
