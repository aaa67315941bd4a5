"""InternVL (``InternVLForConditionalGeneration``, which vLLM serves as InternS1) on vLLM,
pruned.

An image's tiles (sub-crops, then the thumbnail) fill one run of placeholders between
``<img>`` and ``</img>``; the run gets K of its N = tiles x T, and the kept tokens fill it
in order, whatever the crop budget (the tiles leave no marker between them). The layout,
the budget's split over tiles and the connector the methods score are the family's
(:mod:`zooprune.families.internvl`). Videos pass through unpruned.
"""

from __future__ import annotations

import functools
from typing import Any

import torch
from torch import Tensor, nn
from vllm.model_executor.models.interns1 import (
    InternS1DummyInputsBuilder,
    InternS1ForConditionalGeneration,
    InternS1MultiModalProcessor,
    InternS1ProcessingInfo,
)
from vllm.multimodal import MULTIMODAL_REGISTRY

from zooprune.budget import Budget
from zooprune.families import internvl
from zooprune.integrations.vllm.prompts import PrunedProcessor, even_runs
from zooprune.integrations.vllm.selection import PrunedVariant, input_of, refuse_embeddings


class ZoopruneInternVLMultiModalProcessor(PrunedProcessor, InternS1MultiModalProcessor):
    """An image's run of N placeholders, cut to the request's K."""

    def prompt_rewrites(self, budget: Budget, mm_items: Any) -> dict[str, Any]:
        token = self.info.get_hf_config().image_token_id
        return {"image": functools.partial(even_runs, token, budget)}


@MULTIMODAL_REGISTRY.register_processor(
    ZoopruneInternVLMultiModalProcessor,
    info=InternS1ProcessingInfo,
    dummy_inputs=InternS1DummyInputsBuilder,
)
class ZoopruneInternVL(PrunedVariant, InternS1ForConditionalGeneration):
    """vLLM's InternVL (InternS1 class), its images pruned (``crop_budget`` split or global)."""

    architecture = "InternVLForConditionalGeneration"
    projector_prefixes = internvl.PROJECTOR_PREFIXES

    def scoring_projector_from(self, tensors: dict[str, Tensor], dtype: torch.dtype) -> nn.Module:
        return internvl.projector_from_tensors(tensors, self.config, dtype)

    def scoring_dtype(self) -> torch.dtype:
        return next(self.multi_modal_projector.parameters()).dtype

    def _process_vision_input(self, image_input: Any) -> tuple[Tensor, ...]:
        if image_input["type"] != "pixel_values":  # videos pass unpruned; embeds refused
            refuse_embeddings(image_input)
            return super()._process_vision_input(image_input)
        pixel_values = image_input["pixel_values"]
        with input_of(self.multi_modal_projector) as captured:
            tokens = self.extract_feature(pixel_values)  # [tiles, T, d_l]
        counts = [int(n) for n in image_input["num_patches"]]
        tile = (int(pixel_values.shape[-2]), int(pixel_values.shape[-1]))
        encoded = internvl.encoded(captured["x"], tokens, counts, tile)
        return tuple(image.run for image in self.select(encoded).images)
