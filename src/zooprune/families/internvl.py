"""InternVL (InternViT tower, pixel-shuffle MLP connector), whatever engine runs it.

How the model lays out one image (transformers v5): the GotOcr2 image processor with
``crop_to_patches`` resizes the image, squashing it, onto a canvas of ``cols x rows``
tiles of the tower's input size (the grid whose aspect ratio is closest to the image's,
between ``min_patches`` and ``max_patches`` tiles) and cuts it into those sub-crops in
raster order, followed by a *thumbnail* (the whole image at tile size) when there is more
than one sub-crop; an image that gets one tile (or ``crop_to_patches=False``) is that tile
alone. Every tile goes through InternViT (a CLS token and ``p x p`` patch states,
``p = image_size / patch``); ``get_image_features`` takes the ``vision_feature_layer``
hidden states, drops the CLS token (strategy ``"default"``), pixel-shuffles each
``r x r`` window of patch states into one vector (``r = 1 / downsample_ratio``) and
applies ``multi_modal_projector`` (LayerNorm, Linear, GELU, Linear) to each. A tile thus
gives ``T = (p / r)^2`` tokens on an ``s x s`` grid (``s = p / r``), raster order;
``pooler_output`` is one ``[tiles, T, d_l]`` tensor for the whole call. The prompt holds,
per image, ``<img>``, its ``tiles * T`` placeholders (sub-crops, then the thumbnail), and
``</img>``.

Nothing the model receives says how tiles form images: the adapter reads it off the
prompt (``reads_prompt``). The model fills placeholders with tile rows in order, so each
maximal run of consecutive placeholders (between ``<img>`` and ``</img>``) is one image
and its length divided by T is its tile count. A video frame, which the processor passes
as a one-tile image between the same markers, counts as an image.

What "projector" means here: the pixel shuffle is a fixed regrouping, so the token-wise
projector is ``multi_modal_projector`` on one shuffled vector, and the projector inputs X
are the shuffled vectors ``[T, r^2 d_v]``, one per LM token. The LayerNorm in front makes
it more than a Linear -> GELU -> Linear MLP, so ``estimator="auto"`` runs ``jvp``;
``exact`` and ``lowrank`` are refused with a message naming ``jvp`` and ``zo``.

Budget semantics:

- **N** = the image's visual tokens, ``tiles * T`` (``tiles`` = sub-crops + 1 thumbnail,
  or 1). ``<img>`` and ``</img>`` are ordinary text tokens: never scored, selected nor
  counted, always kept.
- ``crop_budget="split"`` (default): the image's K is shared evenly over its tiles, the
  thumbnail first, then the sub-crops in raster order (the remainder goes to the first
  ones), and the method runs inside each tile on its ``s x s`` grid. The thumbnail goes
  first as LLaVA-NeXT's base crop and Idefics3's global crop do: it is the one tile that
  sees the whole image, so it is the one that keeps a token when K < tiles.
  ``crop_budget="global"``: one selection over all N tokens; ``grid`` and ``pool`` then
  see one ``(1, N)`` row in prompt order.
- ``handle.selection`` gives each kept token's ``crops`` (0 = the thumbnail or the only
  tile, 1.. the sub-crops in raster order) and ``cells`` (row, column in that tile's
  ``s x s`` shuffled grid; each cell covers ``r x r`` patches). The processor returns no
  image sizes, so crop ``boxes`` are None unless the call passes ``image_sizes``
  (``[images, 2]`` (height, width) of the original images, in prompt order; a keyword
  ``InternVLForConditionalGeneration.forward`` accepts and ignores): the sub-crop grid
  with ``tiles - 1`` cells is then the one GotOcr2's canvas choice makes for that size,
  whatever the processor's ``min_patches`` / ``max_patches`` were (below), and the boxes
  follow its squashing resize.

VisionZip: InternViT has a CLS token, so ``cls_attention`` is the attention from CLS to
each patch in the feature layer's attention (summed over heads, from the layer's own
q/k projections and norms, so the tower keeps SDPA), and the keys that layer's
head-averaged keys. Both are pixel-shuffled as the features are: a token's attention is
the sum over its ``r x r`` window, its key the window's keys concatenated (so the cosine
between two tokens compares their windows patch by patch). Contextual merging then
averages shuffled vectors, the projector inputs. It needs the ``"default"`` strategy and
one feature layer other than 0 (the embeddings have no attention).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn
from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import get_optimal_tiled_canvas

from zooprune.errors import PlaceholderMismatchError, PruneError
from zooprune.families.llava import activation
from zooprune.families.tiles import tiles_layout
from zooprune.pipeline import Box, EncodedImages, ImageLayout

#: where the projector's tensors live in a checkpoint (transformers 5)
PROJECTOR_PREFIXES = ("model.multi_modal_projector.", "multi_modal_projector.")


class _Projector(nn.Module):
    """InternVL's connector as plain modules: LayerNorm, Linear, activation, Linear."""

    def __init__(self, tensors: Mapping[str, Tensor], config: Any) -> None:
        super().__init__()
        first, second = tensors["linear_1.weight"], tensors["linear_2.weight"]
        self.layer_norm = nn.LayerNorm(first.shape[1])
        self.linear_1 = nn.Linear(first.shape[1], first.shape[0])
        self.act = activation(config.projector_hidden_act)
        self.linear_2 = nn.Linear(second.shape[1], second.shape[0])

    def forward(self, x: Tensor) -> Tensor:
        return self.linear_2(self.act(self.linear_1(self.layer_norm(x))))


def projector_from_tensors(
    tensors: Mapping[str, Tensor], config: Any, dtype: torch.dtype
) -> nn.Module:
    """The connector, rebuilt from its checkpoint tensors (keys relative to it): equal to
    the Hugging Face model's ``multi_modal_projector``, the projector the methods score."""
    projector = _Projector(tensors, config)
    projector.load_state_dict(dict(tensors))
    return projector.to(dtype).eval().requires_grad_(False)


def encoded(
    features: Tensor,
    projected: Tensor,
    counts: list[int],
    tile_size: tuple[int, int],
    sizes: list[tuple[int, int]] | None = None,
    *,
    cls_attention: Tensor | None = None,
    keys: Tensor | None = None,
    encoder_output: Any = None,
) -> EncodedImages:
    """Every image of a call from its tiles' tensors.

    Args:
        features: ``[tiles, T, r^2 d_v]`` the shuffled vectors the connector receives.
        projected: ``[tiles, T, d_l]`` the tokens.
        counts: tiles per image, in prompt order (:func:`tiles_per_image`).
        tile_size: ``(height, width)`` of a tile, in pixels.
        sizes: per image its original ``(height, width)``, for the crops' boxes, or None.
        cls_attention, keys: ``[tiles, T]`` and ``[tiles, T, r^2 d_k]`` when asked for.
    """
    per_tile = projected.shape[1]
    side = int(round(per_tile**0.5))
    feats, tokens, layouts, attns, key_list = [], [], [], [], []
    first = 0
    for image, count in enumerate(counts):
        span = slice(first, first + count)
        feats.append(features[span].reshape(count * per_tile, -1))
        tokens.append(projected[span].reshape(count * per_tile, -1))
        crop_boxes = None if sizes is None else boxes(sizes[image], count, tile_size)
        layouts.append(layout(tokens[-1], count, side, crop_boxes))
        if cls_attention is not None:
            attns.append(cls_attention[span].reshape(-1))
            key_list.append(keys[span].reshape(count * per_tile, -1))
        first += count
    return EncodedImages(
        features=feats,
        projected=tokens,
        grids=[(side, side) if n == 1 else (1, n * per_tile) for n in counts],
        cls_attention=attns if cls_attention is not None else None,
        keys=key_list if cls_attention is not None else None,
        encoder_output=encoder_output,
        layouts=layouts,
    )


def tiles_per_image(input_ids: Tensor, image_token_id: int, per_tile: int, tiles: int) -> list[int]:
    """How many tiles each image has: its run of placeholders over ``per_tile``.

    A run is a maximal stretch of consecutive placeholders in one prompt, bracketed by
    text tokens (``<img>`` before, ``</img>`` after); runs follow the model's fill order.
    """
    rows, cols = (input_ids == image_token_id).nonzero(as_tuple=True)
    if rows.numel() != tiles * per_tile:
        raise PlaceholderMismatchError(
            f"the prompts hold {rows.numel()} image tokens but the images give {tiles} tiles "
            f"of {per_tile} tokens ({tiles * per_tile}); build the prompt with the model's "
            "processor from the same images"
        )
    if rows.numel() == 0:
        return []
    starts = torch.ones_like(rows, dtype=torch.bool)
    starts[1:] = (rows[1:] != rows[:-1]) | (cols[1:] != cols[:-1] + 1)
    first = starts.nonzero().flatten()
    lengths = torch.diff(first, append=first.new_tensor([rows.numel()]))
    last = first + lengths - 1
    width = input_ids.shape[1]
    bracketed = bool(((cols[first] > 0) & (cols[last] < width - 1)).all())
    if not bracketed or bool((lengths % per_tile != 0).any()):
        raise PlaceholderMismatchError(
            f"the image tokens do not form runs of whole tiles ({per_tile} tokens each), each "
            f"with a text token (the `<img>` / `</img>` markers) on both sides: run lengths "
            f"{lengths.tolist()}; build the prompt with the model's processor"
        )
    return (lengths // per_tile).tolist()


def image_sizes(sizes: Any, images: int) -> list[tuple[int, int]] | None:
    """The call's ``image_sizes`` as (height, width) pairs, one per image, or None."""
    if sizes is None:
        return None
    pairs = [
        tuple(int(v) for v in size)
        for size in (sizes.tolist() if isinstance(sizes, Tensor) else sizes)
    ]
    if len(pairs) != images or any(len(pair) != 2 for pair in pairs):
        raise PruneError(
            f"image_sizes must hold one (height, width) per image: the prompts hold {images} "
            f"image(s), image_sizes gives {len(pairs)} entries"
        )
    return pairs


def boxes(size: tuple[int, int], tiles: int, tile_size: tuple[int, int]) -> list[Box]:
    """Each crop's ``(top, left, bottom, right)`` in the original image's pixels.

    Crop 0 (the thumbnail, or the only tile) is the whole image resized. The sub-crops
    tile the image squashed onto a ``cols x rows`` canvas. GotOcr2 picks the grid closest
    in aspect ratio over all allowed tile counts; the winner is also the winner among
    the grids of its own count (with the same tie-break, which depends on the count
    only), so asking GotOcr2's own chooser with ``min = max = tiles - 1`` recovers it.
    """
    height, width = size
    whole: Box = (0.0, 0.0, float(height), float(width))
    if tiles == 1:
        return [whole]
    cols, rows = get_optimal_tiled_canvas((height, width), tile_size, tiles - 1, tiles - 1)
    step_y, step_x = height / rows, width / cols
    return [whole] + [
        (r * step_y, c * step_x, (r + 1) * step_y, (c + 1) * step_x)
        for r in range(rows)
        for c in range(cols)
    ]


def layout(tokens: Tensor, tiles: int, side: int, boxes: list[Box] | None) -> ImageLayout:
    """One image's layout: its tiles' runs in prompt order, no separator placeholders.

    Args:
        tokens: ``[tiles * T, d_l]`` the image's tokens in prompt order (sub-crops, then
            the thumbnail).
    """
    # Prompt order is sub-crops 1.. then the thumbnail; the thumbnail is crop 0 (the
    # whole image, as LLaVA-NeXT's base crop), so "split" serves it first.
    crop_of_run = [*range(1, tiles), 0]
    return tiles_layout(tokens, crop_of_run, side, boxes)
