"""The LLaVA family on vLLM: pruned variants of vLLM's LLaVA, LLaVA-NeXT and OneVision.

Each is vLLM's own class with two changes: its processor writes an image's K placeholders
instead of N (plus its row newlines, for AnyRes; K the budget's pure function of the image's
N, the request's own budget or the server's, as in the Hugging Face path); and its tokens
are the K the selection pipeline keeps of the N vLLM's tower and projector made. For AnyRes
the layout (crops, cells, newlines) is the family's (:mod:`zooprune.families.anyres`), fed
with vLLM's own packing, so the two engines keep the same tokens. Checkpoints saved by
transformers 5 (tower keys without ``vision_model``) load too.

What vLLM cannot give is refused at engine start, naming what applies: ``visionzip``
(vLLM's tower fuses q/k/v, so the CLS attention is not reachable) and
``separators="nonempty"`` (vLLM must know each image's placeholder count before the image is
encoded; under ``"all"`` the newlines count is a function of the image's size).
"""

from __future__ import annotations

import functools
from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor, nn
from transformers.models.llava_next.modeling_llava_next import get_anyres_image_grid_shape
from vllm.model_executor.models.llava import (
    LlavaDummyInputsBuilder,
    LlavaForConditionalGeneration,
    LlavaMultiModalProcessor,
    LlavaProcessingInfo,
)
from vllm.model_executor.models.llava_next import (
    LlavaNextForConditionalGeneration,
    LlavaNextMultiModalProcessor,
    LlavaNextProcessingInfo,
)
from vllm.model_executor.models.llava_onevision import (
    LlavaOnevisionDummyInputsBuilder,
    LlavaOnevisionForConditionalGeneration,
    LlavaOnevisionMultiModalProcessor,
    LlavaOnevisionProcessingInfo,
)
from vllm.multimodal import MULTIMODAL_REGISTRY
from vllm.multimodal.parse import ImageProcessorItems

from zooprune.budget import Budget
from zooprune.errors import PruneError
from zooprune.families import anyres, llava
from zooprune.integrations.vllm.checkpoint import hub_key
from zooprune.integrations.vllm.prompts import PrunedProcessor, even_runs, first_tokens
from zooprune.integrations.vllm.selection import PrunedVariant, refuse_embeddings
from zooprune.pipeline import EncodedImages

_TOWERS = ("clip_vision_model", "siglip_vision_model")


class _PrunedLlava(PrunedVariant):
    """What every pruned LLaVA-family class adds: the MLP projector it scores and the key
    layout of transformers 5 checkpoints."""

    projector_prefixes = llava.PROJECTOR_PREFIXES

    def check_config(self, config: Any) -> None:
        if config.vision_config.model_type not in _TOWERS:
            raise PruneError(
                f"zooprune's vLLM variant needs a CLIP or SigLIP tower, not "
                f"{config.vision_config.model_type}"
            )

    def rename_weights(self, weights: Iterable[tuple[str, Tensor]]) -> Iterable[tuple[str, Tensor]]:
        # transformers 5 saves the tower without its ``vision_model`` level; vLLM's has it.
        return ((hub_key(name), tensor) for name, tensor in weights)

    def scoring_projector_from(self, tensors: dict[str, Tensor], dtype: torch.dtype) -> nn.Module:
        return llava.projector_from_tensors(tensors, self.config.projector_hidden_act, dtype)

    def scoring_dtype(self) -> torch.dtype:
        return next(self.multi_modal_projector.parameters()).dtype


# -- LLaVA-1.5 ---------------------------------------------------------------------------


class _LlavaProcessor(PrunedProcessor):
    """A LLaVA-family processor: its model scores the MLP projector."""

    def scores_mlp(self, config: Any) -> bool:
        return llava.is_gelu_mlp(config.projector_hidden_act)


class ZoopruneLlavaMultiModalProcessor(_LlavaProcessor, LlavaMultiModalProcessor):
    """An image's run of N placeholders cut to the request's K."""

    def prompt_rewrites(self, budget: Budget, mm_items: Any) -> dict[str, Any]:
        token = self.info.get_hf_config().image_token_index
        return {"image": functools.partial(even_runs, token, budget)}


@MULTIMODAL_REGISTRY.register_processor(
    ZoopruneLlavaMultiModalProcessor,
    info=LlavaProcessingInfo,
    dummy_inputs=LlavaDummyInputsBuilder,
)
class ZoopruneLlava(_PrunedLlava, LlavaForConditionalGeneration):
    """vLLM's LLaVA, its visual tokens pruned by the zooprune settings in its HF config."""

    architecture = "LlavaForConditionalGeneration"

    def _process_image_input(self, image_input: Any) -> tuple[Tensor, ...]:
        refuse_embeddings(image_input)
        features = list(self._process_image_pixels(image_input))  # [N, d_v] per image
        sizes = [f.shape[0] for f in features]
        projected = list(self.multi_modal_projector(torch.cat(features)).split(sizes))
        grids = [llava.square_grid(n) for n in sizes]
        kept = self.select(EncodedImages(features, projected, grids, None, None, None))
        return tuple(image.run for image in kept.images)


# -- AnyRes: LLaVA-NeXT and OneVision -------------------------------------------------------


class _AnyResCount:
    """An AnyRes image's run at a budget: K of its N tokens and all its row newlines (their
    count is a function of its size)."""

    def kept_tokens(self, *, image_width: int, image_height: int, budget: Budget) -> int:
        total = self.get_num_image_tokens(image_width=image_width, image_height=image_height)
        config = self.get_hf_config()
        encoder = self.get_vision_encoder_info()
        rows, cols = get_anyres_image_grid_shape(
            image_size=(image_height, image_width),
            grid_pinpoints=config.image_grid_pinpoints,
            patch_size=encoder.get_image_size(),
        )
        _, newlines = self._get_num_unpadded_features(
            original_height=image_height,
            original_width=image_width,
            npatches=encoder.get_patch_grid_length(),
            num_patch_height=rows,
            num_patch_width=cols,
        )
        return budget.tokens_for(total - newlines) + newlines


class ZoopruneLlavaNextProcessingInfo(_AnyResCount, LlavaNextProcessingInfo):
    pass


class ZoopruneLlavaOnevisionProcessingInfo(_AnyResCount, LlavaOnevisionProcessingInfo):
    pass


def anyres_rewrites(info: Any, budget: Budget, mm_items: Any) -> dict[str, Any]:
    """Each image's run of placeholders (its tokens and newlines) cut to its count at the
    budget (:meth:`_AnyResCount.kept_tokens`)."""
    if "image" not in mm_items:
        return {}
    images = mm_items.get_items("image", ImageProcessorItems)
    sizes = [images.get_image_size(i) for i in range(len(images))]
    return {
        "image": [
            functools.partial(
                first_tokens,
                info.kept_tokens(image_width=size.width, image_height=size.height, budget=budget),
            )
            for size in sizes
        ]
    }


class ZoopruneLlavaNextMultiModalProcessor(_LlavaProcessor, LlavaNextMultiModalProcessor):
    """Each image's run cut to K tokens and its newlines."""

    def prompt_rewrites(self, budget: Budget, mm_items: Any) -> dict[str, Any]:
        return anyres_rewrites(self.info, budget, mm_items)


class _PrunedAnyRes(_PrunedLlava):
    """Encodes every crop, packs with vLLM's own code, lays the image out with the family's
    rules, and keeps each image's run of tokens and newlines."""

    #: where a lone crop lies in its image
    single_crop_box = staticmethod(anyres.whole_image_box)

    def _pack_image(self, size: Tensor, crops: Tensor, newline: Tensor | None) -> Tensor:
        """vLLM's own packing of one image's crops into its run."""
        raise NotImplementedError

    def _process_image_input(self, image_input: Any) -> list[Tensor]:
        refuse_embeddings(image_input)
        image_sizes = image_input["image_sizes"]
        crops = anyres.crops_per_image(self.config, image_sizes)
        pixels = torch.cat([p[:n] for p, n in zip(image_input["pixel_values"], crops, strict=True)])
        features = self._image_pixels_to_features(self.vision_tower, pixels)
        projected = self.multi_modal_projector(features)
        packed = [
            self._pack_image(size, tokens, None)
            for size, tokens in zip(image_sizes, projected.split(crops), strict=True)
        ]

        def pack(per_image: list[Tensor], newline: Tensor) -> list[Tensor]:
            return [
                self._pack_image(size, carried, newline)
                for size, carried in zip(image_sizes, per_image, strict=True)
            ]

        encoded = anyres.encoded(
            self.config,
            features,
            packed,
            image_sizes.tolist(),
            crops,
            pack,
            single_crop_box=self.single_crop_box,
            strategy=self.config.vision_feature_select_strategy,
        )
        return [image.run for image in self.select(encoded).images]


@MULTIMODAL_REGISTRY.register_processor(
    ZoopruneLlavaNextMultiModalProcessor,
    info=ZoopruneLlavaNextProcessingInfo,
    dummy_inputs=LlavaDummyInputsBuilder,
)
class ZoopruneLlavaNext(_PrunedAnyRes, LlavaNextForConditionalGeneration):
    """vLLM's LLaVA-NeXT, pruned (``crop_budget`` split or global; every newline kept)."""

    architecture = "LlavaNextForConditionalGeneration"

    def _pack_image(self, size: Tensor, crops: Tensor, newline: Tensor | None) -> Tensor:
        if newline is None:
            return self._merge_image_patch_embeddings(size, crops, strategy="spatial_unpad")
        # vLLM's NeXT packs with its own ``image_newline`` (no argument for it): an instance
        # attribute shadows the parameter for this one call, the parameter untouched.
        self.__dict__["image_newline"] = newline
        try:
            return self._merge_image_patch_embeddings(size, crops, strategy="spatial_unpad")
        finally:
            del self.__dict__["image_newline"]


class ZoopruneLlavaOnevisionMultiModalProcessor(_LlavaProcessor, LlavaOnevisionMultiModalProcessor):
    """Each image's run cut to K tokens and its newlines; a video's run of N pooled tokens
    and its closing newline cut to K and the newline."""

    def prompt_rewrites(self, budget: Budget, mm_items: Any) -> dict[str, Any]:
        return {
            **anyres_rewrites(self.info, budget, mm_items),
            "video": functools.partial(_video_run, budget),
        }


def _video_run(budget: Budget, tokens: list[int]) -> list[int]:
    # One token per placeholder, the newline last: K of the N before it, then it. (The
    # count stays vLLM's N + 1 in the processing info, which sizes the profiling video by
    # adding frames until the count outgrows the model length: a fixed K never would.)
    return tokens[: budget.tokens_for(len(tokens) - 1) + 1]


@MULTIMODAL_REGISTRY.register_processor(
    ZoopruneLlavaOnevisionMultiModalProcessor,
    info=ZoopruneLlavaOnevisionProcessingInfo,
    dummy_inputs=LlavaOnevisionDummyInputsBuilder,
)
class ZoopruneLlavaOnevision(_PrunedAnyRes, LlavaOnevisionForConditionalGeneration):
    """vLLM's LLaVA-OneVision, its images and videos pruned (a video: K of its pooled
    tokens, shared per frame or global, and its closing newline)."""

    architecture = "LlavaOnevisionForConditionalGeneration"

    single_crop_box = staticmethod(anyres.padded_square_box)

    def _pack_image(self, size: Tensor, crops: Tensor, newline: Tensor | None) -> Tensor:
        return self._merge_image_patch_embeddings(
            size,
            crops,
            image_newline=self.image_newline if newline is None else newline,
            strategy="spatial_unpad",
        )

    def _process_video_pixels(self, inputs: Any) -> list[Tensor]:
        """Every video of the batch: its frames encoded as crops, projected and pooled as
        vLLM does, laid out by the family (:func:`~zooprune.families.anyres.onevision_videos`)
        and selected; each video's run is its kept tokens and its newline."""
        videos = list(inputs["pixel_values_videos"])  # [V, F, ...] or V of [F_i, ...]
        frames = [len(video) for video in videos]
        features = self.vision_tower(
            torch.cat(videos), feature_select_strategy=self.config.vision_feature_select_strategy
        )
        tokens = self.apply_pooling(self.multi_modal_projector(features))
        newline = self.image_newline[None, :].to(tokens.dtype)
        runs = [torch.cat([video.flatten(0, 1), newline]) for video in tokens.split(frames)]
        encoded = anyres.onevision_videos(self.apply_pooling(features), runs, frames)
        return [image.run for image in self.select(encoded).images]
