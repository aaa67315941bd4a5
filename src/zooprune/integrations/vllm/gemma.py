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

from zooprune.families import gemma3, gemma4
from zooprune.integrations.vllm.checkpoint import hub_key
from zooprune.integrations.vllm.prompts import even_runs
from zooprune.integrations.vllm.selection import (
    PrunedVariant,
    budget_of,
    input_of,
    refuse_embeddings,
    shorten_runs,
)


class ZoopruneGemma3ProcessingInfo(Gemma3ProcessingInfo):
    """K placeholders per crop: the budget of its ``mm_tokens_per_image``."""

    def _kept(self, processor: Any) -> int:
        return budget_of(self.get_hf_config()).tokens_for(processor.image_seq_length)

    def get_num_image_tokens(self, *, processor: Any, **kwargs: Any) -> int:
        n = super().get_num_image_tokens(processor=processor, **kwargs)
        return n // processor.image_seq_length * self._kept(processor)

    def get_image_repl(self, *, processor: Any, **kwargs: Any) -> PromptUpdateDetails:
        details = super().get_image_repl(processor=processor, **kwargs)
        # Each crop's run of image tokens, cut to K: the markers around it stay.
        image_token = processor.tokenizer.convert_tokens_to_ids(processor.tokenizer.image_token)
        tokens = shorten_runs(details.full, image_token, self._kept(processor))
        return PromptUpdateDetails.select_token_id(tokens, image_token)


@MULTIMODAL_REGISTRY.register_processor(
    Gemma3MultiModalProcessor,
    info=ZoopruneGemma3ProcessingInfo,
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
        runs = [image.run for image in self.select(encoded).images]
        crops = image_input["num_patches"].tolist()
        starts = [sum(crops[:i]) for i in range(len(crops))]
        return [torch.cat(runs[s : s + n]) for s, n in zip(starts, crops, strict=True)]


# -- Gemma 4 -------------------------------------------------------------------------------


class ZoopruneGemma4ProcessingInfo(Gemma4ProcessingInfo):
    """K placeholders per image: the budget of its pooled grid's N soft tokens."""

    def get_image_repl(self, **kwargs: Any) -> PromptUpdateDetails:
        details = super().get_image_repl(**kwargs)
        processor = kwargs.get("processor") or self.get_hf_processor()
        # boi, K image tokens, eoi
        return even_runs(processor.image_token_id, budget_of(self.get_hf_config()), details)


@MULTIMODAL_REGISTRY.register_processor(
    Gemma4MultiModalProcessor,
    info=ZoopruneGemma4ProcessingInfo,
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
