"""Gemma 3 and Gemma 4 on vLLM, pruned.

Each image (and each of its pan-and-scan crops, as on Hugging Face: a crop counts as an
image) gets K of its ``mm_tokens_per_image`` placeholders: its ``<start_of_image>`` /
``<end_of_image>`` run is written with K image tokens, and the kept tokens fill them. The
pooled grid, the scored projector (the norm and matrix after the pool) and the layout are
the family's (:mod:`zooprune.families.gemma3`); the kept tokens stay one contiguous block,
so vLLM's bidirectional image attention covers exactly them.

Gemma 4 writes an image's K placeholders between its markers, K the budget of the N of its
pooled grid (which follows the image's aspect ratio); the pooled grids, the scored
projector (``embed_vision``) and the layout are :mod:`zooprune.families.gemma4`'s.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor, nn
from vllm.model_executor.models.gemma3_mm import (
    Gemma3DummyInputsBuilder,
    Gemma3ForConditionalGeneration,
    Gemma3MultiModalProcessor,
    Gemma3ProcessingInfo,
)
from vllm.model_executor.models.gemma4_mm import (
    Gemma4DummyInputsBuilder,
    Gemma4ForConditionalGeneration,
    Gemma4MultiModalProcessor,
    Gemma4ProcessingInfo,
)
from vllm.multimodal import MULTIMODAL_REGISTRY
from vllm.multimodal.processing import PromptUpdateDetails

from zooprune.budget import Budget
from zooprune.families import gemma3, gemma4
from zooprune.integrations.vllm.checkpoint import hub_key
from zooprune.integrations.vllm.prompts import PrunedProcessor, even_runs
from zooprune.integrations.vllm.selection import (
    PrunedVariant,
    cut_runs,
    input_of,
    refuse_embeddings,
    run_lengths,
)


class ZoopruneGemma3MultiModalProcessor(PrunedProcessor, Gemma3MultiModalProcessor):
    """Each crop's run of ``mm_tokens_per_image`` placeholders cut to the request's K (a
    pan-and-scan crop counts as an image); the markers around it stay."""

    def prompt_rewrites(self, budget: Budget, mm_items: Any) -> dict[str, Any]:
        tokenizer = self.info.get_hf_processor().tokenizer
        token = tokenizer.convert_tokens_to_ids(tokenizer.image_token)
        return {"image": functools.partial(_crop_runs, token, budget)}


def _crop_runs(token: int, budget: Budget, details: PromptUpdateDetails) -> PromptUpdateDetails:
    sizes = run_lengths(details.full, token)
    cut = cut_runs(details.full, token, [budget.tokens_for(size) for size in sizes])
    return PromptUpdateDetails.select_token_id(cut, token)


@MULTIMODAL_REGISTRY.register_processor(
    ZoopruneGemma3MultiModalProcessor,
    info=Gemma3ProcessingInfo,
    dummy_inputs=Gemma3DummyInputsBuilder,
)
class ZoopruneGemma3(PrunedVariant, Gemma3ForConditionalGeneration):
    """vLLM's Gemma 3, its visual tokens pruned per image (and per pan-and-scan crop)."""

    architecture = "Gemma3ForConditionalGeneration"
    projector_prefixes = gemma3.PROJECTOR_PREFIXES

    def rename_weights(self, weights: Iterable[tuple[str, Tensor]]) -> Iterable[tuple[str, Tensor]]:
        # transformers 5 saves the SigLIP tower without its ``vision_model`` level.
        return ((hub_key(name), tensor) for name, tensor in weights)

    def scoring_projector_from(self, tensors: dict[str, Tensor], dtype: torch.dtype) -> nn.Module:
        return gemma3.projector_from_tensors(tensors, self.config, dtype)

    def scoring_dtype(self) -> torch.dtype:
        return self.multi_modal_projector.mm_input_projection_weight.dtype

    def _process_image_input(self, image_input: Any) -> list[Tensor]:
        refuse_embeddings(image_input)
        features = self._image_pixels_to_features(self.vision_tower, image_input["pixel_values"])
        projector = self.multi_modal_projector
        with input_of(projector.mm_soft_emb_norm) as captured:
            tokens = projector(features)  # [crops, N, d_l]
        encoded = gemma3.encoded(
            captured["x"], tokens, projector.tokens_per_side, engine=type(self).__name__
        )
        crops = image_input["num_patches"].tolist()
        # A crop is selected as an image, with the settings of the image it belongs to.
        per_image = self.item_selectors(len(crops))
        selectors = [s for s, n in zip(per_image, crops, strict=True) for _ in range(n)]
        runs = [image.run for image in self.select(encoded, selectors).images]
        starts = [sum(crops[:i]) for i in range(len(crops))]
        return [torch.cat(runs[s : s + n]) for s, n in zip(starts, crops, strict=True)]


# -- Gemma 4 -------------------------------------------------------------------------------


class ZoopruneGemma4MultiModalProcessor(PrunedProcessor, Gemma4MultiModalProcessor):
    """An image's run between its markers cut to the request's K of its pooled grid's N
    soft tokens (videos and audio unchanged)."""

    def prompt_rewrites(self, budget: Budget, mm_items: Any) -> dict[str, Any]:
        token = self.info.get_hf_processor().image_token_id
        return {"image": functools.partial(even_runs, token, budget)}


@MULTIMODAL_REGISTRY.register_processor(
    ZoopruneGemma4MultiModalProcessor,
    info=Gemma4ProcessingInfo,
    dummy_inputs=Gemma4DummyInputsBuilder,
)
class ZoopruneGemma4(PrunedVariant, Gemma4ForConditionalGeneration):
    """vLLM's Gemma 4, its images pruned (videos and audio pass unpruned)."""

    architecture = "Gemma4ForConditionalGeneration"
    projector_prefixes = gemma4.PROJECTOR_PREFIXES

    def scoring_projector_from(self, tensors: dict[str, Tensor], dtype: torch.dtype) -> nn.Module:
        return gemma4.projector_from_tensors(tensors, self.config, dtype)

    def scoring_dtype(self) -> torch.dtype:
        return self.model_dtype

    def _process_image_input(self, image_input: Any) -> list[Tensor]:
        refuse_embeddings(image_input)
        with input_of(self.embed_vision, "inputs_embeds") as captured:
            tokens = super()._process_image_input(image_input)
        positions = image_input["pixel_position_ids"]
        kernel = self.config.vision_config.pooling_kernel_size
        grids = gemma4.pooled_grids(list(positions), kernel)
        encoded = gemma4.encoded(
            captured["x"].reshape(-1, captured["x"].shape[-1]),
            list(tokens),
            grids,
            engine=type(self).__name__,
        )
        return [image.run for image in self.select(encoded).images]
