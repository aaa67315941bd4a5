"""AnyRes layouts: LLaVA-NeXT and LLaVA-OneVision (their ``...ForConditionalGeneration``).

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

The layout is taken from the model itself: its own ``pack_image_features`` is run on a
tensor carrying each token's crop coordinates, so unpadding and shrinking are never
re-implemented here.
"""

from __future__ import annotations

import functools
import math
from types import SimpleNamespace
from typing import Any

import torch
from torch import Tensor, nn
from transformers import LlavaNextForConditionalGeneration, LlavaOnevisionForConditionalGeneration
from transformers.image_processing_utils import select_best_resolution
from transformers.modeling_outputs import BaseModelOutputWithPooling
from transformers.models.llava_next.modeling_llava_next import (
    get_anyres_image_grid_shape,
    image_size_to_num_patches,
)

from zooprune.adapters.base import (
    CROP_BUDGETS,
    SEPARATOR_POLICIES,
    VIDEO_BUDGETS,
    EncodedImages,
    ImageLayout,
    KeptImage,
    run_capturing,
    square_grid,
)
from zooprune.adapters.llava import LlavaAdapter
from zooprune.errors import PruneError

Box = tuple[float, float, float, float]

# Channels of the coordinate tensor packed alongside the features: kind (0 = separator,
# 1 = base crop, 2 = sub-crop grid), then row and column in the crop's (merged) grid.
_KIND, _ROW, _COL = 0, 1, 2


class LlavaNextAdapter(LlavaAdapter):
    """LLaVA-NeXT: AnyRes crops with an ``image_newline`` after each row of the grid."""

    name = "llava-next"
    model_classes = (LlavaNextForConditionalGeneration,)
    requirement = "with a CLIP or SigLIP vision tower (AnyRes crops, row newlines)"
    tokens_per_image = "base crop (side / patch)^2 + the unpadded sub-crop grid, newlines excluded"
    options = {"crop_budget": CROP_BUDGETS, "separators": SEPARATOR_POLICIES}
    # A CLS state per crop has no placeholder of its own in AnyRes layouts.
    extras = {"cls_attention": LlavaAdapter.extras["cls_attention"], "cls_token": ""}
    image_input_names = (
        "pixel_values",
        "image_sizes",
        "vision_feature_layer",
        "vision_feature_select_strategy",
    )

    # -- what differs between NeXT and OneVision ----------------------------------------

    def _image_features_kwargs(self, model: nn.Module, image_inputs: dict[str, Any]) -> dict:
        """Arguments of ``get_image_features`` beyond pixels, sizes, layer and strategy."""
        return {}

    def _crops_per_image(self, model: nn.Module, image_inputs: dict[str, Any]) -> list[int]:
        """How many crops (base included) the model encodes per image."""
        config = model.config
        return [
            image_size_to_num_patches(
                size, config.image_grid_pinpoints, config.vision_config.image_size
            )
            for size in image_inputs["image_sizes"]
        ]

    def _pack(
        self,
        model: nn.Module,
        per_image: list[Tensor],
        image_inputs: dict[str, Any],
        strategy: str,
        newline: Tensor,
    ) -> list[Tensor]:
        packed, _ = model.model.pack_image_features(
            per_image,
            image_inputs["image_sizes"],
            vision_feature_select_strategy=strategy,
            image_newline=newline,
        )
        return packed

    # -- encoding -----------------------------------------------------------------------

    def encode(
        self, model: nn.Module, image_inputs: dict[str, Any], needs: frozenset[str]
    ) -> EncodedImages:
        if image_inputs.get("image_sizes") is None:
            raise PruneError(f"{type(model).__name__} needs image_sizes with pixel_values")
        layer, strategy = self._feature_choice(model, image_inputs)
        extra = self._image_features_kwargs(model, image_inputs)
        output, features, _, cls_attention, keys, _ = self._encode_hooked(
            model,
            needs,
            layer,
            strategy,
            lambda: model.model.get_image_features(
                pixel_values=image_inputs["pixel_values"],
                image_sizes=image_inputs["image_sizes"],
                vision_feature_layer=layer,
                vision_feature_select_strategy=strategy,
                return_dict=True,
                **extra,
            ),
        )
        return self.encoded_from(
            model,
            features,
            list(output.pooler_output),
            image_inputs,
            strategy,
            cls_attention=cls_attention,
            keys=keys,
            encoder_output=output,
        )

    def encoded_from(
        self,
        model: Any,
        features: Tensor,
        packed_tokens: list[Tensor],
        image_inputs: dict[str, Any],
        strategy: str,
        *,
        cls_attention: Tensor | None = None,
        keys: Tensor | None = None,
        encoder_output: Any = None,
    ) -> EncodedImages:
        """The call's images from what the model computed, whatever engine computed it.

        Args:
            model: anything with the model's ``config`` and ``model.pack_image_features``
                (the Hugging Face model; another engine passes a stand-in with the HF
                class's packing, see :func:`packing_stand_in`).
            features: ``[P, T, d_v]`` the projector inputs of all P crops.
            packed_tokens: per image, ``[S, d_l]`` the run the model packed (tokens and
                newlines).
            image_inputs: ``image_sizes`` and the family's other image inputs.
            cls_attention, keys: ``[P, T]`` and ``[P, T, d_k]`` when VisionZip needs them.
        """
        config = model.config
        side = config.vision_config.image_size // config.vision_config.patch_size
        crops = self._crops_per_image(model, image_inputs)
        total, per_crop, d_v = features.shape
        if per_crop != side * side or total != sum(crops):
            raise PruneError(
                f"{type(model).__name__}: the projector saw {total} crops of {per_crop} tokens, "
                f"expected {sum(crops)} crops of {side} x {side}; is the feature strategy "
                f"{strategy!r} right for this tower?"
            )
        sizes = [tuple(int(v) for v in size) for size in image_inputs["image_sizes"]]
        grids = [self._crop_grid(model, size, n) for size, n in zip(sizes, crops, strict=True)]
        # Everything per crop token that must follow the model's packing, in one tensor:
        # features, coordinates, and the CLS attention and keys when asked for.
        parts = [features.float(), _coordinates(side, crops, grids).to(features.device)]
        if cls_attention is not None:
            parts += [cls_attention[..., None].float(), keys.float()]
        carried = torch.cat(parts, dim=-1)
        newline = torch.zeros(carried.shape[-1], device=carried.device)
        packed_carried = self._pack(
            model, list(carried.split(crops)), image_inputs, strategy, newline
        )

        layouts, feats, projected, attn, key_list = [], [], [], [], []
        for i, (carry, tokens) in enumerate(zip(packed_carried, packed_tokens, strict=True)):
            if carry.shape[0] != tokens.shape[0]:
                raise RuntimeError(
                    f"image {i}: packing the coordinates gave {carry.shape[0]} slots, the "
                    f"model's own features {tokens.shape[0]}"
                )
            coords = carry[:, d_v : d_v + 3]
            layout = _layout(tokens, coords, side, grids[i], self._boxes(model, sizes[i], grids[i]))
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

    def _crop_grid(self, model: nn.Module, size: tuple[int, int], crops: int) -> tuple[int, int]:
        """``(rows, cols)`` of the image's sub-crops; ``(0, 0)`` when it has none."""
        if crops == 1:
            return (0, 0)
        config = model.config
        return tuple(
            get_anyres_image_grid_shape(
                list(size), config.image_grid_pinpoints, config.vision_config.image_size
            )
        )

    def _boxes(self, model: nn.Module, size: tuple[int, int], grid: tuple[int, int]) -> list[Box]:
        """Each crop's ``(top, left, bottom, right)`` in the original image's pixels.

        The base crop is the whole image resized (squashed) to the tower's input; the
        sub-crops tile the image resized into the best pinpoint with its aspect kept and
        centred (the image processor's ``get_image_patches``).
        """
        height, width = size
        if grid == (0, 0):
            return [self._single_crop_box(size)]
        best_h, best_w = select_best_resolution((height, width), model.config.image_grid_pinpoints)
        # get_patch_output_size: fit the image into the pinpoint, the other side rounded up.
        if best_w / width < best_h / height:
            new_h, new_w = min(math.ceil(height * best_w / width), best_h), best_w
        else:
            new_h, new_w = best_h, min(math.ceil(width * best_h / height), best_w)
        top, left = (best_h - new_h) // 2, (best_w - new_w) // 2
        scale_y, scale_x = new_h / height, new_w / width
        crop = model.config.vision_config.image_size
        boxes: list[Box] = [(0.0, 0.0, float(height), float(width))]
        for r in range(grid[0]):
            for c in range(grid[1]):
                boxes.append(
                    (
                        (r * crop - top) / scale_y,
                        (c * crop - left) / scale_x,
                        ((r + 1) * crop - top) / scale_y,
                        ((c + 1) * crop - left) / scale_x,
                    )
                )
        return boxes

    def _single_crop_box(self, size: tuple[int, int]) -> Box:
        height, width = size
        return (0.0, 0.0, float(height), float(width))


class LlavaOnevisionAdapter(LlavaNextAdapter):
    """LLaVA-OneVision: the NeXT layout with ``anyres_max`` shrinking; SigLIP tower, no CLS.

    Videos: the model encodes each frame as one crop, projects its tokens and pools the
    projected grid bilinearly to half its side (``apply_pooling``: 27 x 27 -> 14 x 14 in
    the released models), then appends one ``image_newline`` after the last frame. A video
    is one item: N = frames x pooled tokens, each frame a crop of the record (``kind ==
    "video"``) on the pooled grid; the closing newline is a separator (kept under both
    policies, since a video always keeps a token). ``video_budget="frame"`` (default)
    shares K evenly over the frames, ``"global"`` over all the video's tokens. As for
    shrunk images, the tokens' "projector inputs" for sensitivity are the same bilinear
    pool of the frames' projector inputs: an approximation, since the model pools after
    its (non-linear) projector.
    """

    name = "llava-onevision"
    model_classes = (LlavaOnevisionForConditionalGeneration,)
    requirement = "with a SigLIP (or CLIP) vision tower (AnyRes crops, row newlines; videos)"
    tokens_per_image = (
        "as LLaVA-NeXT, the sub-crop grid shrunk where `anyres_max_m` says; a multi-image "
        "prompt's image: its base crop; a video: frames x the pooled grid, its newline excluded"
    )
    options = {**LlavaNextAdapter.options, "video_budget": VIDEO_BUDGETS}
    pixel_input_names = ("pixel_values", "pixel_values_videos")
    # OneVision's SigLIP tower has no CLS token whose attention VisionZip could rank by.
    extras = {"cls_attention": "", "cls_token": ""}
    image_input_names = (
        *LlavaNextAdapter.image_input_names,
        "vision_aspect_ratio",
        "batch_num_images",
        "pixel_values_videos",
        "image_sizes_videos",
    )

    def provides(self, model: nn.Module) -> frozenset[str]:
        return frozenset()

    def video_token_id(self, model: nn.Module) -> int:
        return model.config.video_token_id

    def encode(
        self, model: nn.Module, image_inputs: dict[str, Any], needs: frozenset[str]
    ) -> EncodedImages:
        """The images as LLaVA-NeXT encodes them, then the videos (:meth:`_encode_videos`)."""
        parts = []
        if image_inputs.get("pixel_values") is not None:
            parts.append(super().encode(model, image_inputs, needs))
        if image_inputs.get("pixel_values_videos") is not None:
            parts.append(self._encode_videos(model, image_inputs))
        return EncodedImages.joined(parts, [part.encoder_output for part in parts])

    def _encode_videos(self, model: nn.Module, inputs: dict[str, Any]) -> EncodedImages:
        """Every video of the call: ``pixel_values_videos [V, F, 3, H, W]``."""
        layer, strategy = self._feature_choice(model, inputs)
        videos = inputs["pixel_values_videos"]
        output, captured = run_capturing(
            lambda: model.model.get_video_features(
                videos,
                vision_feature_layer=layer,
                vision_feature_select_strategy=strategy,
                return_dict=True,
            ),
            self.projector(model),
        )
        count, frames = videos.shape[:2]
        # The model's own pooling, on the projector inputs: the candidates' features.
        pooled = model.model.apply_pooling(captured["features"])  # [V*F, T', d_v]
        per_frame = pooled.shape[1]
        grid = square_grid(per_frame)
        runs = list(output.pooler_output)  # per video [F*T' + 1, d_l]
        layouts = [ImageLayout.frames(run, grid, frames, closing=True) for run in runs]
        return EncodedImages(
            features=list(pooled.reshape(count, frames * per_frame, -1)),
            projected=[run[: frames * per_frame] for run in runs],
            grids=[grid] * count,
            cls_attention=None,
            keys=None,
            encoder_output=output,
            layouts=layouts,
        )

    def kind_encoder_output(self, encoded: EncodedImages, kind: str, kept: list[KeptImage]) -> Any:
        if kind != "video":
            return super().kind_encoder_output(encoded, kind, kept)
        # The model flattens its [V, S, d] video output into one run in prompt order: one
        # [1, S', d] row holding every video's kept run fills it the same way.
        runs = torch.cat([item.run for item in kept])
        return BaseModelOutputWithPooling(pooler_output=runs[None])

    def _aspect_ratio(self, model: nn.Module, image_inputs: dict[str, Any]) -> str:
        ratio = image_inputs.get("vision_aspect_ratio")
        return model.config.vision_aspect_ratio if ratio is None else ratio

    def _image_features_kwargs(self, model: nn.Module, image_inputs: dict[str, Any]) -> dict:
        return {
            "vision_aspect_ratio": self._aspect_ratio(model, image_inputs),
            "batch_num_images": image_inputs.get("batch_num_images"),
        }

    def _crops_per_image(self, model: nn.Module, image_inputs: dict[str, Any]) -> list[int]:
        crops = super()._crops_per_image(model, image_inputs)
        counts = image_inputs.get("batch_num_images")
        if counts is None:
            return crops
        # As the model: only an image alone in its prompt is split into crops.
        alone = [int(n) == 1 for n in counts for _ in range(int(n))]
        return [n if single else 1 for n, single in zip(crops, alone, strict=True)]

    def _pack(
        self,
        model: nn.Module,
        per_image: list[Tensor],
        image_inputs: dict[str, Any],
        strategy: str,
        newline: Tensor,
    ) -> list[Tensor]:
        packed, _ = model.model.pack_image_features(
            per_image,
            image_inputs["image_sizes"],
            image_newline=newline,
            vision_aspect_ratio=self._aspect_ratio(model, image_inputs),
        )
        return packed

    def _single_crop_box(self, size: tuple[int, int]) -> Box:
        # An image in a multi-image prompt is padded to a centred square, then resized.
        height, width = size
        side = max(height, width)
        top, left = (side - height) // 2, (side - width) // 2
        return (float(-top), float(-left), float(side - top), float(side - left))


def packing_stand_in(model_class: type, config: Any) -> Any:
    """What :meth:`LlavaNextAdapter.encoded_from` needs of a model, for an engine that
    runs its own: the config, and the Hugging Face class's own ``pack_image_features``
    (which reads nothing of the model but its config) bound to it."""
    inner = SimpleNamespace(config=config)
    pack = model_class.pack_image_features
    inner.pack_image_features = functools.partial(pack, inner)
    return SimpleNamespace(config=config, model=inner)


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
