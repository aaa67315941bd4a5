"""Idefics3 and SmolVLM on Hugging Face: ``Idefics3ForConditionalGeneration``,
``SmolVLMForConditionalGeneration``.

The layout (crops and a global crop, read off the prompt's markers) and its budget
semantics are the family's (:mod:`zooprune.families.idefics3`); this adapter runs the
model's own image encoding with the connector's projection captured.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn
from transformers import Idefics3ForConditionalGeneration, SmolVLMForConditionalGeneration
from transformers.modeling_outputs import BaseModelOutputWithPooling

from zooprune.adapters.base import CROP_BUDGETS, Adapter, EncodedImages
from zooprune.families import idefics3


class Idefics3Adapter(Adapter):
    """Idefics3 / SmolVLM: crops + a global crop per image, pixel-shuffled, text markers."""

    name = "idefics3"
    model_classes = (Idefics3ForConditionalGeneration, SmolVLMForConditionalGeneration)
    requirement = "(image splitting into crops + a global crop, pixel-shuffle connector)"
    tokens_per_image = (
        "(rows x cols sub-crops + 1 global crop) x (side / patch / scale_factor)^2; the "
        "row/column and `<global-img>` markers excluded"
    )
    extras = {"cls_attention": ""}
    options = {"crop_budget": CROP_BUDGETS}
    image_input_names = ("pixel_values", "pixel_attention_mask")
    reads_prompt = True

    def image_token_id(self, model: nn.Module) -> int:
        return model.config.image_token_id

    def projector(self, model: nn.Module) -> nn.Module:
        return model.model.connector.modality_projection

    def encode(
        self,
        model: nn.Module,
        image_inputs: dict[str, Any],
        needs: frozenset[str],
        input_ids: Tensor | None = None,
    ) -> EncodedImages:
        """Encode every crop once; group the crops into images by the prompt's markers.

        Args:
            image_inputs: ``pixel_values [B, C_max, 3, H, W]`` (all-zero crops pad the
                prompts with fewer) and optionally ``pixel_attention_mask``.
            input_ids: ``[B, L]`` the prompts, read only.

        Returns:
            per image: features ``[N, r^2 d_v]`` and projected ``[N, d_l]`` in prompt
            order (sub-crops, then the global crop) and its layout.
        """
        captured: dict[str, Tensor] = {}

        def on_projector(module: nn.Module, args: tuple, output: Tensor) -> None:
            captured["features"], captured["projected"] = args[0], output

        hook = self.projector(model).register_forward_hook(on_projector)
        try:
            output = model.model.get_image_features(
                pixel_values=image_inputs["pixel_values"],
                pixel_attention_mask=image_inputs.get("pixel_attention_mask"),
                return_dict=True,
            )
        finally:
            hook.remove()
        features, projected = captured["features"], captured["projected"]  # [C, S, .] each
        crops, per_crop = projected.shape[:2]
        groups = idefics3.crops_per_image(input_ids, self.image_token_id(model), per_crop, crops)
        return idefics3.encoded(features, projected, groups, encoder_output=output)

    def encoder_output(self, encoded: EncodedImages, kept_tokens: list[Tensor]) -> Any:
        # One [T, 1, d_l] tensor filled into the placeholders in order: what every
        # transformers from 5.19 takes (SmolVLM before 5.20 reads it as T blocks of one
        # token; later versions and Idefics3 only count and scatter it).
        return BaseModelOutputWithPooling(pooler_output=torch.cat(kept_tokens)[:, None])
