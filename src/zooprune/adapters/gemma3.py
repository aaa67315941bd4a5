"""Gemma 3 on Hugging Face: ``Gemma3ForConditionalGeneration``.

The layout, its budget semantics and the scored projector are the family's
(:mod:`zooprune.families.gemma3`); this adapter runs the model's own image encoding with
the norm's input captured.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn
from transformers import Gemma3ForConditionalGeneration
from transformers.modeling_outputs import BaseModelOutputWithPooling

from zooprune.adapters.base import Adapter, EncodedImages
from zooprune.families import gemma3


class Gemma3Adapter(Adapter):
    """Gemma 3: a fixed ``s x s`` pooled grid per image, marker tokens around it."""

    name = "gemma3"
    model_classes = (Gemma3ForConditionalGeneration,)
    requirement = "(SigLIP tower, average-pooled to `mm_tokens_per_image` tokens)"
    tokens_per_image = (
        "`mm_tokens_per_image` (256): the pooled grid; `<start_of_image>` / `<end_of_image>` "
        "excluded; a pan-and-scan crop counts as an image"
    )
    # SigLIP has no CLS token whose attention VisionZip could rank by.
    extras = {"cls_attention": ""}
    image_input_names = ("pixel_values",)

    def image_token_id(self, model: nn.Module) -> int:
        return model.config.image_token_id

    def projector(self, model: nn.Module) -> nn.Module:
        return gemma3.PooledProjector(model.model.multi_modal_projector)

    def encode(
        self, model: nn.Module, image_inputs: dict[str, Any], needs: frozenset[str]
    ) -> EncodedImages:
        """Encode ``pixel_values`` ``[P, 3, H, W]`` once, capturing the pooled states.

        Returns per image: features ``[N, d_v]`` (the pooled patch states the RMSNorm
        receives), projected ``[N, d_l]`` (the model's own tokens), grid ``(s, s)``.
        """
        projector = model.model.multi_modal_projector
        captured: dict[str, Tensor] = {}

        def on_norm(module: nn.Module, args: tuple) -> None:
            captured["features"] = args[0]

        hook = projector.mm_soft_emb_norm.register_forward_pre_hook(on_norm)
        try:
            output = model.model.get_image_features(
                pixel_values=image_inputs["pixel_values"], return_dict=True
            )
        finally:
            hook.remove()
        features, projected = captured["features"], output.pooler_output  # [P, N, d_v], [P, N, d_l]
        return gemma3.encoded(
            features,
            projected,
            projector.tokens_per_side,
            engine=type(model).__name__,
            encoder_output=output,
        )

    def encoder_output(self, encoded: EncodedImages, kept_tokens: list[Tensor]) -> Any:
        # The model fills placeholders in order from one tensor; runs may differ in length
        # only if N did, so one row of all kept tokens serves every case.
        return BaseModelOutputWithPooling(pooler_output=torch.cat(kept_tokens)[None])
