"""AnyRes on Hugging Face: ``LlavaNextForConditionalGeneration`` and
``LlavaOnevisionForConditionalGeneration``.

The layout, its budget semantics and the crops' boxes are the family's
(:mod:`zooprune.families.anyres`); this adapter runs the model's own vision side (its
``get_image_features`` with the projector's input captured) and hands
:func:`~zooprune.families.anyres.encoded` the model's own ``pack_image_features``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn
from transformers import LlavaNextForConditionalGeneration, LlavaOnevisionForConditionalGeneration
from transformers.modeling_outputs import BaseModelOutputWithPooling

from zooprune.adapters.base import (
    CROP_BUDGETS,
    SEPARATOR_POLICIES,
    VIDEO_BUDGETS,
    EncodedImages,
    KeptImage,
    run_capturing,
)
from zooprune.adapters.llava import LlavaAdapter, attention_received
from zooprune.errors import PruneError
from zooprune.families import anyres


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
        return anyres.crops_per_image(model.config, image_inputs["image_sizes"])

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
        return anyres.encoded(
            model.config,
            features,
            list(output.pooler_output),
            image_inputs["image_sizes"],
            self._crops_per_image(model, image_inputs),
            lambda per_image, newline: self._pack(
                model, per_image, image_inputs, strategy, newline
            ),
            single_crop_box=self.single_crop_box,
            strategy=strategy,
            cls_attention=cls_attention,
            keys=keys,
            encoder_output=output,
        )

    #: where a lone crop lies in its image
    single_crop_box = staticmethod(anyres.whole_image_box)


class LlavaOnevisionAdapter(LlavaNextAdapter):
    """LLaVA-OneVision: the NeXT layout with ``anyres_max`` shrinking; SigLIP tower, no CLS.

    Videos: each frame is encoded as one crop, its projected tokens pooled and one newline
    closing the video (:func:`~zooprune.families.anyres.onevision_videos`, shared with
    vLLM); ``video_budget="frame"`` (default) shares K evenly over the frames, ``"global"``
    over all the video's tokens.
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
    extras = {
        "cls_attention": "",
        "cls_token": "",
        # holitom's: every video frame's attention in the feature layer
        "tower_attention": "videos (its images are refused), one feature layer",
    }
    image_input_names = (
        *LlavaNextAdapter.image_input_names,
        "vision_aspect_ratio",
        "batch_num_images",
        "pixel_values_videos",
        "image_sizes_videos",
    )

    def provides(self, model: nn.Module) -> frozenset[str]:
        single_layer = isinstance(model.config.vision_feature_layer, int)
        return frozenset({"tower_attention"}) if single_layer else frozenset()

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
            parts.append(self._encode_videos(model, image_inputs, needs))
        return EncodedImages.joined(parts, [part.encoder_output for part in parts])

    def _encode_videos(
        self, model: nn.Module, inputs: dict[str, Any], needs: frozenset[str]
    ) -> EncodedImages:
        """Every video of the call: ``pixel_values_videos [V, F, 3, H, W]``; with
        ``"tower_attention"`` needed, the attention each frame's tokens receive in the
        feature layer, pooled as the tokens are."""
        layer, strategy = self._feature_choice(model, inputs)
        videos = inputs["pixel_values_videos"]
        attention = (
            self._feature_layer(model, layer).self_attn if "tower_attention" in needs else None
        )
        output, captured = run_capturing(
            lambda: model.model.get_video_features(
                videos,
                vision_feature_layer=layer,
                vision_feature_select_strategy=strategy,
                return_dict=True,
            ),
            self.projector(model),
            attention=attention,
        )
        count, frames = videos.shape[:2]
        # The model's own pooling, on the projector inputs: the candidates' features.
        pooled = model.model.apply_pooling(captured["features"])  # [V*F, T', d_v]
        received = None
        if attention is not None:
            received = attention_received(attention, captured["attention_input"])
            # Aligned with the features: without the CLS token under "default".
            received = received[:, 1:] if strategy == "default" else received
            received = model.model.apply_pooling(received[..., None])[..., 0]  # [V*F, T']
        runs = list(output.pooler_output)  # per video [F*T' + 1, d_l]
        return anyres.onevision_videos(
            pooled, runs, [frames] * count, encoder_output=output, attention=received
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
        return anyres.crops_per_image(
            model.config, image_inputs["image_sizes"], image_inputs.get("batch_num_images")
        )

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

    # An image in a multi-image prompt is padded to a centred square, then resized.
    single_crop_box = staticmethod(anyres.padded_square_box)
