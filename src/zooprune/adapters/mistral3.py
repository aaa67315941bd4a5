"""Mistral 3 on Hugging Face: ``Mistral3ForConditionalGeneration``.

The layout (rows with ``[IMG_BREAK]`` text separators), its budget semantics and the
scored projector are the family's (:mod:`zooprune.families.mistral3`); this adapter runs
the model's own image encoding with the projector's input captured.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn
from transformers import Mistral3ForConditionalGeneration
from transformers.modeling_outputs import BaseModelOutputWithPooling

from zooprune.adapters.base import SEPARATOR_POLICIES, Adapter, EncodedImages, run_capturing
from zooprune.errors import PruneError
from zooprune.families import mistral3


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
        return mistral3.MergedPatchProjector(
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
        return mistral3.encoded(
            list(states),
            patch_grids,
            list(output.pooler_output),
            merge,
            engine=type(model).__name__,
            encoder_output=output,
        )

    def encoder_output(self, encoded: EncodedImages, kept_tokens: list[Tensor]) -> Any:
        # The model concatenates the per-image tuple and fills [IMG] placeholders in order;
        # with text separators each kept run is the image's kept tokens only.
        return BaseModelOutputWithPooling(pooler_output=tuple(kept_tokens))
