"""InternVL: ``InternVLForConditionalGeneration`` (InternViT tower, pixel-shuffle MLP connector).

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

from typing import Any

import torch
from torch import Tensor, nn
from transformers import InternVLForConditionalGeneration
from transformers.modeling_outputs import BaseModelOutputWithPooling
from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import get_optimal_tiled_canvas

from zooprune.adapters.base import (
    CROP_BUDGETS,
    Adapter,
    EncodedImages,
    ImageLayout,
    run_capturing,
)
from zooprune.errors import PlaceholderMismatchError, PruneError

Box = tuple[float, float, float, float]


class InternVLAdapter(Adapter):
    """InternVL: GotOcr2 tiles (sub-crops + a thumbnail) per image, pixel-shuffled, MLP."""

    name = "internvl"
    model_classes = (InternVLForConditionalGeneration,)
    requirement = "(GotOcr2 tiling into sub-crops + a thumbnail, pixel-shuffle MLP connector)"
    tokens_per_image = (
        "(sub-crops + 1 thumbnail, or 1 tile) x (side / patch x downsample_ratio)^2; "
        "`<img>` / `</img>` excluded"
    )
    extras = {
        "cls_attention": "InternViT tower, `default` feature strategy, one feature layer (not 0)"
    }
    options = {"crop_budget": CROP_BUDGETS}
    image_input_names = (
        "pixel_values",
        "image_sizes",
        "vision_feature_layer",
        "vision_feature_select_strategy",
    )
    reads_prompt = True

    def provides(self, model: nn.Module) -> frozenset[str]:
        # The CLS token exists in InternViT; it is outside the features under "default",
        # and a single layer past the embeddings has an attention to read it from.
        config = model.config
        layer = config.vision_feature_layer
        if (
            config.vision_config.model_type == "internvl_vision"
            and config.vision_feature_select_strategy == "default"
            and isinstance(layer, int)
            and layer != 0
        ):
            return frozenset({"cls_attention"})
        return frozenset()

    def image_token_id(self, model: nn.Module) -> int:
        return model.config.image_token_id

    def projector(self, model: nn.Module) -> nn.Module:
        return model.model.multi_modal_projector

    def encode(
        self,
        model: nn.Module,
        image_inputs: dict[str, Any],
        needs: frozenset[str],
        input_ids: Tensor | None = None,
    ) -> EncodedImages:
        """Encode every tile once; group the tiles into images by the prompt's runs.

        Args:
            image_inputs: ``pixel_values [tiles, 3, H, W]`` (all images' tiles in prompt
                order), optionally ``image_sizes [images, 2]`` (height, width) and the
                call's ``vision_feature_layer`` / ``vision_feature_select_strategy``.
            input_ids: ``[B, L]`` the prompts, read only.

        Returns:
            per image: features ``[N, r^2 d_v]`` and projected ``[N, d_l]`` in prompt
            order (sub-crops, then the thumbnail), its layout, and when ``needs`` has
            ``"cls_attention"``, ``[N]`` CLS attention and ``[N, r^2 d_k]`` keys.
        """
        if input_ids is None:
            raise PruneError("InternVL pruning needs input_ids: images are read off the prompt")
        config = model.config
        pixel_values = image_inputs["pixel_values"]
        layer = image_inputs.get("vision_feature_layer")
        layer = config.vision_feature_layer if layer is None else layer
        strategy = image_inputs.get("vision_feature_select_strategy")
        strategy = config.vision_feature_select_strategy if strategy is None else strategy
        attention = _attention_layer(model, layer, strategy) if "cls_attention" in needs else None
        output, captured = run_capturing(
            lambda: model.model.get_image_features(
                pixel_values=pixel_values,
                vision_feature_layer=layer,
                vision_feature_select_strategy=strategy,
                return_dict=True,
            ),
            self.projector(model),
            attention,
        )
        features, projected = captured["features"], captured["projected"]  # [tiles, T, .]
        tiles, per_tile = projected.shape[:2]
        side = int(round(per_tile**0.5))
        counts = _tiles_per_image(input_ids, self.image_token_id(model), per_tile, tiles)
        sizes = _image_sizes(image_inputs.get("image_sizes"), len(counts))
        tile_size = (int(pixel_values.shape[-2]), int(pixel_values.shape[-1]))

        cls_attention = keys = None
        if "cls_attention" in needs:
            attn, key = _cls_attention_and_keys(attention, captured["attention_input"])
            # The features dropped CLS ("default"): drop it here too, then regroup each
            # r x r window exactly as the model regrouped the features.
            cls_attention = _shuffle(model, attn[:, 1:, None]).sum(dim=-1)  # [tiles, T]
            keys = _shuffle(model, key[:, 1:])  # [tiles, T, r^2 d_k]

        feats, tokens, layouts, attns, key_list = [], [], [], [], []
        first = 0
        for image, count in enumerate(counts):
            span = slice(first, first + count)
            feats.append(features[span].reshape(count * per_tile, -1))
            tokens.append(projected[span].reshape(count * per_tile, -1))
            boxes = None if sizes is None else _boxes(sizes[image], count, tile_size)
            layouts.append(_layout(tokens[-1], count, side, boxes))
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
            encoder_output=output,
            layouts=layouts,
        )

    def encoder_output(self, encoded: EncodedImages, kept_tokens: list[Tensor]) -> Any:
        # The model expects one tensor and fills the placeholders with its rows in order;
        # [1, total kept, d_l] passes its count check (tokens x hidden == numel).
        return BaseModelOutputWithPooling(pooler_output=torch.cat(kept_tokens)[None])


def _attention_layer(model: nn.Module, feature_layer: Any, strategy: str) -> nn.Module:
    """The InternViT attention whose output becomes the feature layer's hidden states."""
    if strategy != "default":
        raise PruneError(
            f"CLS attention needs vision_feature_select_strategy='default', got {strategy!r}"
        )
    if not isinstance(feature_layer, int):
        raise PruneError(
            f"CLS attention needs a single vision_feature_layer, got {feature_layer!r}"
        )
    layers = model.model.vision_tower.encoder.layer
    # hidden_states[j] is the output of layer j - 1 (j = 0: the embeddings); -1 is the
    # last layer's output (after the tower's final norm, an identity under mean pooling).
    index = feature_layer if feature_layer < 0 else feature_layer - 1
    if feature_layer == 0 or not -len(layers) <= index < len(layers):
        raise PruneError(f"vision_feature_layer {feature_layer} has no attention layer")
    return layers[index].attention


def _cls_attention_and_keys(attention: nn.Module, hidden: Tensor) -> tuple[Tensor, Tensor]:
    """CLS-row attention (summed over heads) and head-averaged keys of an InternViT layer.

    Computed from the layer's own projections and q/k norms, in float32.

    Args:
        hidden: ``[B, 1 + P, d_v]`` the attention's (normalised) input, CLS first.

    Returns:
        ``[B, 1 + P]`` attention from CLS to every token, ``[B, 1 + P, head_dim]`` keys.
    """
    batch, length, _ = hidden.shape
    heads, head_dim = attention.num_heads, attention.head_dim
    # The norms act on the whole projected vector (before the head split), per token.
    q = attention.q_norm(attention.q_proj(hidden[:, :1]))
    k = attention.k_norm(attention.k_proj(hidden))
    q = q.view(batch, 1, heads, head_dim).transpose(1, 2).float()
    k = k.view(batch, length, heads, head_dim).transpose(1, 2).float()
    logits = (q @ k.transpose(-1, -2)) * attention.scale  # [B, H, 1, 1 + P]
    return logits.softmax(dim=-1).sum(dim=1)[:, 0], k.mean(dim=1)


def _shuffle(model: nn.Module, per_patch: Tensor) -> Tensor:
    """``[B, P, c]`` per-patch values -> ``[B, T, r^2 c]`` by the model's own pixel shuffle."""
    batch, patches, channels = per_patch.shape
    side = int(round(patches**0.5))
    grid = per_patch.reshape(batch, side, side, channels).contiguous()
    shuffled = model.model.pixel_shuffle(grid, scale_factor=model.config.downsample_ratio)
    return shuffled.reshape(batch, -1, shuffled.shape[-1])


def _tiles_per_image(
    input_ids: Tensor, image_token_id: int, per_tile: int, tiles: int
) -> list[int]:
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


def _image_sizes(sizes: Any, images: int) -> list[tuple[int, int]] | None:
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


def _boxes(size: tuple[int, int], tiles: int, tile_size: tuple[int, int]) -> list[Box]:
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


def _layout(tokens: Tensor, tiles: int, side: int, boxes: list[Box] | None) -> ImageLayout:
    """One image's layout: its tiles' runs in prompt order, no separator placeholders.

    Args:
        tokens: ``[tiles * T, d_l]`` the image's tokens in prompt order (sub-crops, then
            the thumbnail).
    """
    device = tokens.device
    per_tile = side * side
    # Prompt order is sub-crops 1.. then the thumbnail; the thumbnail is crop 0 (the
    # whole image, as LLaVA-NeXT's base crop), so "split" serves it first.
    crop_of_run = torch.arange(1, tiles + 1, device=device)
    crop_of_run[-1] = 0
    index = torch.arange(tiles * per_tile, device=device)
    cell = index % per_tile
    return ImageLayout(
        packed=tokens,
        token_slots=index,
        separator_of=torch.full_like(index, -1),
        crop=crop_of_run.repeat_interleave(per_tile),
        cell=torch.stack([cell // side, cell % side], dim=-1),
        crop_grids=[(side, side)] * tiles,
        patch_grids=[(side, side)] * tiles,
        boxes=boxes,
    )
