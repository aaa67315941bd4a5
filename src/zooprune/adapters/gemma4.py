"""Gemma 4 on Hugging Face: ``Gemma4ForConditionalGeneration``.

The layout, its budget semantics and the scored projector (``embed_vision``) are the
family's (:mod:`zooprune.families.gemma4`); this adapter runs the model's own image
encoding with the projector's input captured, and refuses calls mixing images with the
modalities it passes through unpruned.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn
from transformers import Gemma4ForConditionalGeneration
from transformers.modeling_outputs import BaseModelOutputWithPooling

from zooprune.adapters.base import Adapter, EncodedImages
from zooprune.errors import PruneError
from zooprune.families import gemma4

#: the inputs of the modalities this adapter does not prune, by name in the refusal
_OTHER_MODALITIES = {"videos": "pixel_values_videos", "audio": "input_features"}


class Gemma4Adapter(Adapter):
    """Gemma 4: one pooled grid per image, its size set by the image's aspect ratio."""

    name = "gemma4"
    model_classes = (Gemma4ForConditionalGeneration,)
    requirement = "(k x k pooled vision tower; videos and audio pass unpruned)"
    tokens_per_image = (
        "the pooled grid of the resized image, at most `max_soft_tokens` (280); "
        "`<start_of_image>` / `<end_of_image>` excluded"
    )
    # The tower has no CLS token whose attention VisionZip could rank by.
    extras = {"cls_attention": ""}
    # The other modalities' inputs are taken too, so that a call mixing them with images
    # reaches encode() and is refused there (only calls with pixel_values get that far).
    image_input_names = (
        "pixel_values",
        "image_position_ids",
        "pixel_values_videos",
        "video_position_ids",
        "num_frames_per_video",
        "input_features",
        "input_features_mask",
    )

    def image_token_id(self, model: nn.Module) -> int:
        return model.config.image_token_id

    def projector(self, model: nn.Module) -> nn.Module:
        return model.model.embed_vision

    def encode(
        self, model: nn.Module, image_inputs: dict[str, Any], needs: frozenset[str]
    ) -> EncodedImages:
        """Encode every image once, capturing ``embed_vision``'s input.

        Args:
            image_inputs: ``pixel_values [I, P, 3 p^2]`` (the processor's padded patch
                rows) and ``image_position_ids [I, P, 2]``.

        Returns:
            per image: features ``[N_i, d_v]`` (the pooled states, raster order),
            projected ``[N_i, d_l]`` (the model's own tokens), grid ``(rows, cols)``.
        """
        others = [
            what for what, key in _OTHER_MODALITIES.items() if image_inputs.get(key) is not None
        ]
        if others:
            raise PruneError(
                f"pruning a call with both images and {' and '.join(others)} is not supported "
                f"for {type(model).__name__}; {' and '.join(others)} pass through unpruned only "
                "in calls without pixel_values"
            )
        positions = image_inputs.get("image_position_ids")
        if positions is None:
            raise PruneError(
                f"{type(model).__name__} needs image_position_ids with pixel_values "
                "(the processor returns them)"
            )
        grids = gemma4.pooled_grids(positions, model.config.vision_config.pooling_kernel_size)
        captured: dict[str, Tensor] = {}

        def on_projector(module: nn.Module, args: tuple, kwargs: dict) -> None:
            # The model passes the pooled states by keyword (``inputs_embeds=``).
            captured["features"] = kwargs["inputs_embeds"] if "inputs_embeds" in kwargs else args[0]

        hook = self.projector(model).register_forward_pre_hook(on_projector, with_kwargs=True)
        try:
            output = model.model.get_image_features(
                pixel_values=image_inputs["pixel_values"],
                image_position_ids=positions,
                return_dict=True,
            )
        finally:
            hook.remove()
        return gemma4.encoded(
            captured["features"],
            list(output.pooler_output),
            grids,
            engine=type(model).__name__,
            encoder_output=output,
        )

    def encoder_output(self, encoded: EncodedImages, kept_tokens: list[Tensor]) -> Any:
        # The model concatenates the per-image tuple and fills placeholders in order.
        return BaseModelOutputWithPooling(pooler_output=tuple(kept_tokens))
