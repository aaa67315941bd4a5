"""Mistral 3 on vLLM, pruned.

On Hugging Face an image's pruned run is its kept tokens with the ``[IMG_BREAK]`` text
tokens between the rows, wherever the kept tokens end a row; vLLM writes the run before
the image is encoded, so it cannot place text by what is kept. The variant writes K +
(rows - 1) placeholders and ``[IMG_END]``, and fills the placeholders with the kept
tokens and, where each row ends, the language model's own input embedding of
``[IMG_BREAK]``: what the language model receives equals the Hugging Face prompt's
(``separators="all"``; ``"nonempty"``, whose break count depends on the kept tokens, is
refused). The layout, the scored projector (norm, merger and MLP on one merge window's
patch states) and the budget are the family's (:mod:`zooprune.families.mistral3`).
"""

from __future__ import annotations

import functools
from typing import Any

import torch
from torch import Tensor, nn
from vllm.model_executor.models.mistral3 import (
    Mistral3DummyInputsBuilder,
    Mistral3ForConditionalGeneration,
    Mistral3MultiModalProcessor,
    Mistral3ProcessingInfo,
)
from vllm.multimodal import MULTIMODAL_REGISTRY
from vllm.multimodal.processing import PromptUpdateDetails
from vllm.tokenizers import cached_tokenizer_from_config

from zooprune.budget import Budget
from zooprune.errors import PruneError
from zooprune.families import mistral3
from zooprune.integrations.vllm.prompts import PrunedProcessor
from zooprune.integrations.vllm.selection import PrunedVariant, refuse_embeddings

#: the text token between an image's rows (every Mistral 3 / Pixtral tokenizer's)
IMAGE_BREAK = "[IMG_BREAK]"


class ZoopruneMistral3MultiModalProcessor(PrunedProcessor, Mistral3MultiModalProcessor):
    """An image's rows of placeholders and breaks become K + rows - 1 placeholders, then
    ``[IMG_END]``."""

    def prompt_rewrites(self, budget: Budget, mm_items: Any) -> dict[str, Any]:
        token = self.info.get_hf_config().image_token_index
        return {"image": functools.partial(_kept_run, token, budget)}


def _kept_run(token: int, budget: Budget, details: PromptUpdateDetails) -> PromptUpdateDetails:
    full = details.full  # rows of tokens, each closed by a break; [IMG_END] last
    n = sum(value == token for value in full)
    rows = sum(value != token for value in full)
    run = [token] * mistral3.run_length(budget.tokens_for(n), rows)
    return PromptUpdateDetails.select_token_id([*run, full[-1]], token)


@MULTIMODAL_REGISTRY.register_processor(
    ZoopruneMistral3MultiModalProcessor,
    info=Mistral3ProcessingInfo,
    dummy_inputs=Mistral3DummyInputsBuilder,
)
class ZoopruneMistral3(PrunedVariant, Mistral3ForConditionalGeneration):
    """vLLM's Mistral 3, its images pruned (``separators="all"``)."""

    architecture = "Mistral3ForConditionalGeneration"
    projector_prefixes = mistral3.PROJECTOR_PREFIXES

    def __init__(self, *, vllm_config: Any, prefix: str = "") -> None:
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        tokenizer = cached_tokenizer_from_config(vllm_config.model_config)
        break_id = None if tokenizer is None else tokenizer.get_vocab().get(IMAGE_BREAK)
        if break_id is None:
            raise PruneError(
                f"a pruned Mistral 3 needs its tokenizer's {IMAGE_BREAK} token (the break "
                "it embeds between an image's rows); none was found"
            )
        self.image_break_id = break_id

    def scoring_projector_from(self, tensors: dict[str, Tensor], dtype: torch.dtype) -> nn.Module:
        return mistral3.projector_from_tensors(tensors, self.config, dtype)

    def scoring_dtype(self) -> torch.dtype:
        return self.multi_modal_projector.patch_merger.merging_layer.weight.dtype

    def _process_image_input(self, image_input: Any) -> tuple[Tensor, ...]:
        refuse_embeddings(image_input)
        pixel_values = image_input["pixel_values"]
        sizes = [(int(image.shape[-2]), int(image.shape[-1])) for image in pixel_values]
        states = self.vision_tower(pixel_values)
        states = torch.cat(list(states)) if isinstance(states, (list, tuple)) else states
        tokens = self.multi_modal_projector(states, sizes)  # [sum N, d_l]
        patch = self.config.vision_config.patch_size
        merge = self.config.spatial_merge_size
        patch_grids = [(h // patch, w // patch) for h, w in sizes]
        counts = [(h // merge) * (w // merge) for h, w in patch_grids]
        ids = torch.tensor([self.image_break_id], device=tokens.device)
        encoded = mistral3.encoded(
            list(states.split([h * w for h, w in patch_grids])),
            patch_grids,
            list(tokens.split(counts)),
            merge,
            engine=type(self).__name__,
            break_embedding=self.get_language_model().embed_input_ids(ids)[0],
        )
        return tuple(image.run for image in self.select(encoded).images)
