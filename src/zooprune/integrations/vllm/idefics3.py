"""Idefics3 and SmolVLM on vLLM, pruned.

An image's crops (the sub-crops in raster order, then the global crop) each have a run of
placeholders between their own text markers (``<fake_token_around_image><row_i_col_j>``,
``<global-img>``). Each crop's run is cut to its share of the image's K, shared as the
Hugging Face path shares it (``crop_budget="split"``,
:func:`zooprune.families.idefics3.kept_per_run`), and the kept tokens fill the runs in
order; the markers stay. ``crop_budget="global"`` is refused: vLLM writes the runs before
the image is encoded, and a global selection's count per crop depends on what it keeps.
The scored projector (the connector's projection, on the pixel-shuffled vectors) and the
layout are the family's (:mod:`zooprune.families.idefics3`).
"""

from __future__ import annotations

import functools
from typing import Any

import torch
from torch import Tensor, nn
from vllm.model_executor.models.idefics3 import (
    Idefics3DummyInputsBuilder,
    Idefics3ForConditionalGeneration,
    Idefics3MultiModalProcessor,
    Idefics3ProcessingInfo,
)
from vllm.model_executor.models.smolvlm import (
    SmolVLMForConditionalGeneration,
    SmolVLMProcessingInfo,
)
from vllm.multimodal import MULTIMODAL_REGISTRY
from vllm.multimodal.processing import PromptUpdateDetails

from zooprune.budget import Budget
from zooprune.families import idefics3
from zooprune.integrations.vllm.prompts import PrunedProcessor
from zooprune.integrations.vllm.selection import (
    PrunedVariant,
    cut_runs,
    input_of,
    refuse_embeddings,
    run_lengths,
)


class ZoopruneIdefics3MultiModalProcessor(PrunedProcessor, Idefics3MultiModalProcessor):
    """Each crop's run of S placeholders cut to its share of the request's K."""

    def prompt_rewrites(self, budget: Budget, mm_items: Any) -> dict[str, Any]:
        token = self.info.get_hf_config().image_token_id
        return {"image": functools.partial(_kept_runs, token, budget)}


def _kept_runs(token: int, budget: Budget, details: PromptUpdateDetails) -> PromptUpdateDetails:
    sizes = run_lengths(details.full, token)
    n = sum(sizes)
    kept = idefics3.kept_per_run(budget.tokens_for(n), len(sizes), n // len(sizes))
    return PromptUpdateDetails.select_token_id(cut_runs(details.full, token, kept), token)


class _PrunedIdefics3(PrunedVariant):
    """The selection over an image's crops, shared by Idefics3 and SmolVLM."""

    projector_prefixes = idefics3.PROJECTOR_PREFIXES

    def scoring_projector_from(self, tensors: dict[str, Tensor], dtype: torch.dtype) -> nn.Module:
        return idefics3.projector_from_tensors(tensors, dtype)

    def _process_image_input(self, image_input: Any) -> list[Tensor]:
        refuse_embeddings(image_input)
        features = self._process_image_pixels(image_input)  # [crops, p^2, d_v]
        connector = self.model.connector
        with input_of(connector.modality_projection) as captured:
            tokens = connector(features)  # [crops, S, d_l]
        crops = image_input["num_patches"].tolist()
        groups = [[False] * (count - 1) + [True] for count in crops]
        encoded = idefics3.encoded(captured["x"], tokens, groups)
        return [image.run for image in self.select(encoded).images]


@MULTIMODAL_REGISTRY.register_processor(
    ZoopruneIdefics3MultiModalProcessor,
    info=Idefics3ProcessingInfo,
    dummy_inputs=Idefics3DummyInputsBuilder,
)
class ZoopruneIdefics3(_PrunedIdefics3, Idefics3ForConditionalGeneration):
    """vLLM's Idefics3, its images pruned crop by crop."""

    architecture = "Idefics3ForConditionalGeneration"


@MULTIMODAL_REGISTRY.register_processor(
    ZoopruneIdefics3MultiModalProcessor,
    info=SmolVLMProcessingInfo,
    dummy_inputs=Idefics3DummyInputsBuilder,
)
class ZoopruneSmolVLM(_PrunedIdefics3, SmolVLMForConditionalGeneration):
    """vLLM's SmolVLM, its images pruned crop by crop."""

    architecture = "SmolVLMForConditionalGeneration"
