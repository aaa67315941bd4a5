"""Mistral 3 (``Mistral3ForConditionalGeneration``: Pixtral tower, patch merger).

How the model lays out one image (transformers v5): the processor resizes the image so
that each side is a multiple of ``patch * merge`` (``merge = spatial_merge_size``, 2 in
the released models; ``image_sizes[i]`` is the processed ``(height, width)``), and the
Pixtral tower turns it into an ``hp x wp`` grid of patch states (``hp = height / patch``),
all images of a call packed into one sequence with block attention between them. The
multi-modal projector then RMS-normalises each patch state, merges every ``merge x merge``
window of patches into one vector (``Mistral3PatchMerger``: an unfold, then one Linear
without bias) and runs a Linear -> GELU -> Linear MLP on it. Each image thus gives
``N = (hp / merge) * (wp / merge)`` tokens on the merged ``gh x gw`` grid, raster order.

The prompt holds, per image, one row of ``gw`` ``[IMG]`` placeholders per grid row, each
row followed by ``[IMG_BREAK]``, except the last, which is followed by ``[IMG_END]``.
Those two are *text* tokens of the prompt that the model embeds itself (unlike
LLaVA-NeXT's ``image_newline``, a placeholder the model fills with a learned vector): the
layout declares them ``ImageLayout(text_separators=True)``, so the image's run in the
prompt is its tokens and its breaks, the model gets only the kept tokens, and a dropped
break leaves ``input_ids`` as a dropped placeholder does.

What "projector" means here: the patch merger mixes the ``merge^2`` patches of a window,
so the projector is token-wise only on grouped vectors (as Qwen2-VL's merger). The
projector the methods score is the whole multi-modal projector, norm included, on one
window's ``merge^2`` patch states concatenated (:class:`MergedPatchProjector`); the
projector inputs X are the tower's feature-layer states grouped so, ``[N, merge^2 * C]``.
The norm in front (and the merging Linear) make it more than a plain GELU MLP, so
``estimator="auto"`` runs ``jvp``; ``exact`` and ``lowrank`` are refused with a message
naming ``jvp`` and ``zo``.

Budget semantics:

- **N** = ``(height / patch / merge) * (width / patch / merge)`` for ``image_sizes[i] =
  (height, width)``: the merged tokens. ``[IMG_BREAK]`` and ``[IMG_END]`` are text, never
  scored, selected or counted. N differs between images of different sizes, and so does
  K under ``ratio=``.
- ``separators="all"`` (default, the row structure the model was trained on survives):
  every ``[IMG_BREAK]`` stays, also after a row whose tokens were all pruned;
  ``separators="nonempty"``: the break of such a row goes too. ``[IMG_END]`` always
  stays (it closes the image, not a row).
- One image is one crop: ``handle.selection`` gives crop 0 for every kept token, its
  ``cells`` (row, column) in the merged grid, ``grid == patch_grids[0] == (gh, gw)``,
  and the kept breaks' prompt positions as ``separators``. The processor's resize is
  unknown to the model, so ``boxes`` is None (draw over the image as processed).

Positions are 1-D: ``positions="compact"`` (default) renumbers the shortened prompt,
``"original"`` keeps every kept token's (and break's) unpruned position. Pixtral has no
CLS token: ``visionzip`` is refused, naming the methods that apply.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn
from transformers import Mistral3ForConditionalGeneration
from transformers.modeling_outputs import BaseModelOutputWithPooling

from zooprune.adapters.base import SEPARATOR_POLICIES, Adapter, EncodedImages, run_capturing
from zooprune.errors import PruneError
from zooprune.pipeline import ImageLayout


class MergedPatchProjector(nn.Module):
    """Mistral 3's projector as a token-wise map on grouped vectors: ``[..., u*C] -> [..., d_l]``.

    ``u = merge^2``; a vector holds one window's patch states in raster order within the
    window. Normalises each patch state with the projector's own RMSNorm, orders the
    window's entries as the merger's unfold does (channel-major) and runs the merging
    Linear and the MLP: equal, row for row, to ``multi_modal_projector`` on the patch
    states the vectors were grouped from.
    """

    def __init__(self, projector: nn.Module, merge: int) -> None:
        super().__init__()
        # A child, not a copy: the estimators read (and may recast) the live weights.
        self.projector = projector
        self.unit = merge * merge

    def forward(self, x: Tensor) -> Tensor:
        p = self.projector
        patches = x.unflatten(-1, (self.unit, x.shape[-1] // self.unit))  # [..., u, C]
        normed = p.norm(patches)
        # unfold lays a window out as channel * u + position in the window.
        merged = p.patch_merger.merging_layer(normed.transpose(-1, -2).flatten(-2))
        return p.linear_2(p.act(p.linear_1(merged)))


class Mistral3Adapter(Adapter):
    """Mistral 3: one merged grid per image, ``[IMG_BREAK]`` text tokens between its rows."""

    name = "mistral3"
    model_classes = (Mistral3ForConditionalGeneration,)
    requirement = (
        "(Pixtral tower, patch merger of `spatial_merge_size`^2 patches, [IMG_BREAK] after "
        "each row)"
    )
    # No "|" here: the README's table would split the cell at it.
    tokens_per_image = (
        "(height / patch / `spatial_merge_size`) x (width / patch / `spatial_merge_size`) "
        "for `image_sizes`: the merged grid; [IMG_BREAK] / [IMG_END] excluded"
    )
    # Pixtral has no CLS token whose attention VisionZip could rank by.
    extras = {"cls_attention": ""}
    options = {"separators": SEPARATOR_POLICIES}
    image_input_names = ("pixel_values", "image_sizes", "vision_feature_layer")

    def image_token_id(self, model: nn.Module) -> int:
        return model.config.image_token_id

    def projector(self, model: nn.Module) -> nn.Module:
        return MergedPatchProjector(
            model.model.multi_modal_projector, model.config.spatial_merge_size
        )

    def encode(
        self, model: nn.Module, image_inputs: dict[str, Any], needs: frozenset[str]
    ) -> EncodedImages:
        """Encode every image once, capturing the multi-modal projector's input.

        Args:
            image_inputs: ``pixel_values [I, 3, H, W]`` (padded to the call's largest
                image) and ``image_sizes [I, 2]`` (each image's processed size).

        Returns:
            per image: features ``[N_i, u*C]`` (patch states grouped by merge window,
            raster order), projected ``[N_i, d_l]`` (the model's own tokens), grid
            ``(gh_i, gw_i)``, and its layout with the breaks as text separators.
        """
        sizes = image_inputs.get("image_sizes")
        if sizes is None:
            raise PruneError(f"{type(model).__name__} needs image_sizes with pixel_values")
        inner = model.model
        output, captured = run_capturing(
            lambda: inner.get_image_features(
                pixel_values=image_inputs["pixel_values"],
                image_sizes=sizes,
                vision_feature_layer=image_inputs.get("vision_feature_layer"),
                return_dict=True,
            ),
            inner.multi_modal_projector,
        )
        patch = inner.vision_tower.patch_size
        merge = model.config.spatial_merge_size
        patch_grids = [
            (int(h) // patch, int(w) // patch) for h, w in torch.as_tensor(sizes).tolist()
        ]
        states = captured["features"].split([h * w for h, w in patch_grids])  # [hp*wp, C] each
        projected = list(output.pooler_output)
        features, grids = [], []
        for image, (grid_states, patches, tokens) in enumerate(
            zip(states, patch_grids, projected, strict=True)
        ):
            grouped, grid = _group_windows(grid_states, patches, merge)
            if grouped.shape[0] != tokens.shape[0]:
                raise RuntimeError(
                    f"image {image}: {grouped.shape[0]} merge windows, but the model made "
                    f"{tokens.shape[0]} tokens"
                )
            features.append(grouped)
            grids.append(grid)
        return EncodedImages(
            features=features,
            projected=projected,
            grids=grids,
            cls_attention=None,
            keys=None,
            encoder_output=output,
            layouts=[_rows_layout(t, g) for t, g in zip(projected, grids, strict=True)],
        )

    def encoder_output(self, encoded: EncodedImages, kept_tokens: list[Tensor]) -> Any:
        # The model concatenates the per-image tuple and fills [IMG] placeholders in order;
        # with text separators each kept run is the image's kept tokens only.
        return BaseModelOutputWithPooling(pooler_output=tuple(kept_tokens))


def _group_windows(states: Tensor, patches: tuple[int, int], merge: int) -> tuple[Tensor, tuple]:
    """``[gh * gw, merge^2 * C]`` each merge window's patch states, and ``(gh, gw)``.

    Windows in raster order, a window's patches in raster order within it; patches past
    the last whole window (none from the processor) are left out, as the merger's unfold
    leaves them.
    """
    hp, wp = patches
    gh, gw = hp // merge, wp // merge
    grid = states.view(hp, wp, -1)[: gh * merge, : gw * merge]
    windows = grid.reshape(gh, merge, gw, merge, -1).permute(0, 2, 1, 3, 4)
    return windows.reshape(gh * gw, -1), (gh, gw)


def _rows_layout(tokens: Tensor, grid: tuple[int, int]) -> ImageLayout:
    """One image's run: ``gh`` rows of ``gw`` tokens, a break (text) after every row but
    the last; the ``[IMG_END]`` after the last row is outside the run and always stays."""
    gh, gw = grid
    device = tokens.device
    index = torch.arange(gh * gw, device=device)
    row, col = index // gw, index % gw
    token_slots = row * (gw + 1) + col
    slots = gh * (gw + 1) - 1 if gh else 0
    # Break rows of the run hold no token the model places: left zero.
    packed = tokens.new_zeros(slots, tokens.shape[-1])
    packed[token_slots] = tokens
    return ImageLayout(
        packed=packed,
        token_slots=token_slots,
        separator_of=torch.where(row < gh - 1, row * (gw + 1) + gw, -1),
        crop=torch.zeros_like(index),
        cell=torch.stack([row, col], dim=-1),
        crop_grids=[grid],
        patch_grids=[grid],
        text_separators=True,
    )
