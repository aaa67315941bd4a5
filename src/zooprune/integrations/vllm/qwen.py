"""The Qwen vision families on vLLM, pruned: Qwen2-VL, Qwen2.5-VL, Qwen3-VL (dense and
MoE, DeepStack) and Qwen3.5 (dense and MoE); the kept tokens keep their 3-D positions.

An image gets K placeholders (the budget of its N merged tokens). Its kept tokens must
keep their original M-RoPE positions, and which tokens are kept depends on the image: so
the positions vLLM asks for when it admits a request (``get_mrope_input_positions``) come
from the selection itself. The variant runs the tower and the selection for the request's
images there, keeps the result (keyed by the image's pixels), and hands it over when vLLM
encodes the images: one encoding per image, as unpruned. The positions are vLLM's own
rule applied to the unpruned prompt (each image's run grown back to its N placeholders),
less the dropped tokens' columns: text keeps its unpruned positions too, and videos, which
pass through unpruned on vLLM (the Hugging Face adapter prunes them), keep theirs.

The layout, the merger the methods score and its order are the family's
(:mod:`zooprune.families.qwen`). Qwen3-VL's tower returns each token with its DeepStack
rows beside it (one wide row): a kept token keeps all of its rows, as on Hugging Face.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
from collections import OrderedDict
from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor, nn
from vllm.model_executor.models.qwen2_5_vl import (
    Qwen2_5_VLDummyInputsBuilder,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2_5_VLMultiModalProcessor,
    Qwen2_5_VLProcessingInfo,
)
from vllm.model_executor.models.qwen2_vl import (
    Qwen2VLDummyInputsBuilder,
    Qwen2VLForConditionalGeneration,
    Qwen2VLMultiModalProcessor,
    Qwen2VLProcessingInfo,
)
from vllm.model_executor.models.qwen3_5 import (
    Qwen3_5ForConditionalGeneration,
    Qwen3_5MoeForConditionalGeneration,
    Qwen3_5MoeProcessingInfo,
    Qwen3_5ProcessingInfo,
)
from vllm.model_executor.models.qwen3_vl import (
    Qwen3VLDummyInputsBuilder,
    Qwen3VLForConditionalGeneration,
    Qwen3VLMultiModalProcessor,
    Qwen3VLProcessingInfo,
)
from vllm.model_executor.models.qwen3_vl_moe import (
    Qwen3VLMoeForConditionalGeneration,
    Qwen3VLMoeProcessingInfo,
)
from vllm.multimodal import MULTIMODAL_REGISTRY

from zooprune.budget import Budget
from zooprune.families import qwen
from zooprune.integrations.vllm.checkpoint import transformers5_experts
from zooprune.integrations.vllm.prompts import rewrite_image_updates
from zooprune.integrations.vllm.selection import PrunedVariant, budget_of, refuse_embeddings
from zooprune.pipeline import Kept

#: images whose selection waits for vLLM to encode them (an image seen again is served by
#: vLLM's encoder cache and never asks): the oldest are dropped beyond this
_PENDING = 256


class _Count:
    """K placeholders per image: the budget of its N merged tokens."""

    def get_num_image_tokens(self, **kwargs: Any) -> int:
        n = super().get_num_image_tokens(**kwargs)
        return budget_of(self.get_hf_config()).tokens_for(n)


class _ShortPrompt:
    """The prompt update that gives an image its N placeholders, cut to the budget's K."""

    def _get_prompt_updates(self, *args: Any, **kwargs: Any) -> list[Any]:
        budget = budget_of(self.info.get_hf_config())
        updates = super()._get_prompt_updates(*args, **kwargs)
        return rewrite_image_updates(updates, functools.partial(_first_k, budget))


def _first_k(budget: Budget, tokens: list[int]) -> list[int]:
    return tokens[: budget.tokens_for(len(tokens))]


class _PrunedQwen(PrunedVariant):
    """What every Qwen variant adds to vLLM's class: the merger it scores, the selection
    at admission and the positions of the pruned prompt."""

    projector_prefixes = qwen.MERGER_PREFIXES
    #: Qwen2.5-VL's merger normalises with an RMSNorm
    rms_merger = False

    def __init__(self, *, vllm_config: Any, prefix: str = "") -> None:
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        object.__setattr__(self, "_pending", OrderedDict())

    def scoring_projector_from(self, tensors: dict[str, Tensor], dtype: torch.dtype) -> nn.Module:
        # The main merger only: Qwen3-VL's DeepStack mergers share the prefix's parent
        # (``deepstack_merger_list``), not the prefix.
        unit = self.visual.spatial_merge_size**2
        return qwen.merger_from_tensors(tensors, unit, dtype, rms_norm=self.rms_merger)

    def scoring_dtype(self) -> torch.dtype:
        return self.visual.dtype

    # -- the selection, once per image ----------------------------------------------------

    def _kept(self, pixel_values: Tensor, grid_thw: Tensor) -> list[tuple[Tensor, Tensor]]:
        """Per image of a batch: ``(kept indices, kept run)``, from the pending ones where
        the positions asked for them first, else selected now."""
        sizes = grid_thw.prod(-1).tolist()
        keys = [_key(p, g) for p, g in zip(pixel_values.split(sizes), grid_thw, strict=True)]
        if all(key in self._pending for key in keys):
            return [self._pending.pop(key) for key in keys]
        kept, tokens = self._select(pixel_values, grid_thw)
        for key in keys:
            self._pending.pop(key, None)
        return [
            (image.indices, self._run(image, full))
            for image, full in zip(kept.images, tokens, strict=True)
        ]

    def _select(self, pixel_values: Tensor, grid_thw: Tensor) -> tuple[Kept, list[Tensor]]:
        """Encode the images once, capturing the merger's input, and select."""
        visual = self.visual
        with _captured(visual.merger) as captured:
            output = visual(pixel_values, grid_thw=grid_thw.tolist())
        merge = visual.spatial_merge_size
        counts = [int(t * h * w) // (merge * merge) for t, h, w in grid_thw.tolist()]
        tokens = list(output.split(counts))
        encoded = qwen.encoded(
            captured["states"],
            captured["merged"],
            tokens,
            grid_thw,
            merge,
            qwen.raster_order(self.config.vision_config, merge, grid_thw),
            "image",
            engine=type(self).__name__,
        )
        return self.select(encoded), tokens

    def _run(self, image: Any, full: Tensor) -> Tensor:
        """What fills the image's kept placeholders: its kept run, and beside each kept
        token the rest of its row (Qwen3-VL's DeepStack levels) where the tower gives one."""
        width = image.run.shape[-1]
        if full.shape[-1] == width:
            return image.run
        return torch.cat([image.run.to(full.dtype), full[image.slots, width:]], dim=-1)

    def _process_image_input(self, image_input: Any) -> tuple[Tensor, ...]:
        refuse_embeddings(image_input)
        grid_thw = image_input["image_grid_thw"]
        return tuple(run for _, run in self._kept(image_input["pixel_values"], grid_thw))

    # -- positions --------------------------------------------------------------------------

    def get_mrope_input_positions(
        self, input_tokens: list[int], mm_features: list[Any]
    ) -> tuple[Tensor, int]:
        """The 3-D positions of the pruned prompt: vLLM's own rule on the unpruned prompt
        (every image's run grown back to N placeholders), less the dropped tokens."""
        image_token = self.config.image_token_id
        grown, keep, features, request = [], [], [], []
        cursor = shift = 0
        for feature in sorted(mm_features, key=lambda f: f.mm_position.offset):
            offset = feature.mm_position.offset
            grown += input_tokens[cursor:offset]
            keep += [True] * (offset - cursor)
            cursor = offset
            if feature.modality == "image":
                kept = self._admit(feature)
                request.append(kept.cpu())
                n = _image_tokens(feature, self.visual.spatial_merge_size)
                mask = torch.zeros(n, dtype=torch.bool)
                mask[kept] = True
                grown += [image_token] * n
                keep += mask.tolist()
                cursor = offset + kept.numel()
                position = dataclasses.replace(feature.mm_position, offset=offset + shift, length=n)
                shift += n - kept.numel()
            else:  # passed unpruned: its placeholders are copied as they stand
                position = dataclasses.replace(feature.mm_position, offset=offset + shift)
            features.append(dataclasses.replace(feature, mm_position=position))
        grown += input_tokens[cursor:]
        keep += [True] * (len(input_tokens) - cursor)
        positions, _ = super().get_mrope_input_positions(grown, features)
        positions = positions[:, torch.tensor(keep)]
        if request:  # the request's images, for inspection (selected one by one above)
            object.__setattr__(self, "zooprune_kept", request)
        return positions, int(positions.max()) + 1 - len(input_tokens)

    def _admit(self, feature: Any) -> Tensor:
        """Select an admitted request's image now; its tokens wait for the encoder."""
        data = feature.data
        pixels = data["pixel_values"].data
        grid = data["image_grid_thw"].data.reshape(1, 3)
        key = _key(pixels, grid[0])
        if key not in self._pending:
            device = next(self.visual.parameters()).device
            with torch.inference_mode():
                indices, run = self._kept(pixels.to(device), grid.to(device))[0]
            self._pending[key] = (indices, run)
            while len(self._pending) > _PENDING:
                self._pending.popitem(last=False)
        return self._pending[key][0]


def _image_tokens(feature: Any, merge: int) -> int:
    t, h, w = feature.data["image_grid_thw"].data.tolist()
    return int(t * h * w) // (merge * merge)


@contextlib.contextmanager
def _captured(module: nn.Module) -> Iterator[dict[str, Tensor]]:
    """The module's input and output on the calls inside the block.

    Through an instance-level ``forward``, not a hook: vLLM's compilable modules call
    ``forward`` directly, past the hooks, when they run uncompiled. Removed on exit.
    """
    captured: dict[str, Tensor] = {}
    original = module.forward

    def forward(x: Tensor) -> Tensor:
        captured["states"], captured["merged"] = x, original(x)
        return captured["merged"]

    module.forward = forward
    try:
        yield captured
    finally:
        del module.forward


def _key(pixels: Tensor, grid: Tensor) -> str:
    """An image's identity: its pixels and grid (the selection is a function of them)."""
    digest = hashlib.sha1(pixels.detach().cpu().contiguous().numpy().tobytes())
    digest.update(bytes(str(grid.tolist()), "ascii"))
    return digest.hexdigest()


# -- Qwen2-VL and Qwen2.5-VL ---------------------------------------------------------------


class ZoopruneQwen2VLProcessingInfo(_Count, Qwen2VLProcessingInfo):
    pass


class ZoopruneQwen2_5_VLProcessingInfo(_Count, Qwen2_5_VLProcessingInfo):
    pass


class ZoopruneQwen2VLMultiModalProcessor(_ShortPrompt, Qwen2VLMultiModalProcessor):
    pass


class ZoopruneQwen2_5_VLMultiModalProcessor(_ShortPrompt, Qwen2_5_VLMultiModalProcessor):
    pass


@MULTIMODAL_REGISTRY.register_processor(
    ZoopruneQwen2VLMultiModalProcessor,
    info=ZoopruneQwen2VLProcessingInfo,
    dummy_inputs=Qwen2VLDummyInputsBuilder,
)
class ZoopruneQwen2VL(_PrunedQwen, Qwen2VLForConditionalGeneration):
    """vLLM's Qwen2-VL, its images pruned (LayerNorm merger)."""

    architecture = "Qwen2VLForConditionalGeneration"


@MULTIMODAL_REGISTRY.register_processor(
    ZoopruneQwen2_5_VLMultiModalProcessor,
    info=ZoopruneQwen2_5_VLProcessingInfo,
    dummy_inputs=Qwen2_5_VLDummyInputsBuilder,
)
class ZoopruneQwen2_5_VL(_PrunedQwen, Qwen2_5_VLForConditionalGeneration):
    """vLLM's Qwen2.5-VL, its images pruned (RMSNorm merger, window-order tower)."""

    architecture = "Qwen2_5_VLForConditionalGeneration"

    rms_merger = True


# -- Qwen3-VL and Qwen3.5, dense and MoE ---------------------------------------------------


class ZoopruneQwen3VLMultiModalProcessor(_ShortPrompt, Qwen3VLMultiModalProcessor):
    pass


class ZoopruneQwen3VLProcessingInfo(_Count, Qwen3VLProcessingInfo):
    pass


class ZoopruneQwen3VLMoeProcessingInfo(_Count, Qwen3VLMoeProcessingInfo):
    pass


class ZoopruneQwen3_5ProcessingInfo(_Count, Qwen3_5ProcessingInfo):
    pass


class ZoopruneQwen3_5MoeProcessingInfo(_Count, Qwen3_5MoeProcessingInfo):
    pass


class _PrunedMoe(_PrunedQwen):
    """transformers 5 saves fused experts transposed against vLLM's reading
    (:func:`~zooprune.integrations.vllm.checkpoint.transformers5_experts`)."""

    def rename_weights(self, weights: Any) -> Any:
        return transformers5_experts(weights, self.config)


@MULTIMODAL_REGISTRY.register_processor(
    ZoopruneQwen3VLMultiModalProcessor,
    info=ZoopruneQwen3VLProcessingInfo,
    dummy_inputs=Qwen3VLDummyInputsBuilder,
)
class ZoopruneQwen3VL(_PrunedQwen, Qwen3VLForConditionalGeneration):
    """vLLM's Qwen3-VL, its images pruned; DeepStack rows follow the kept tokens."""

    architecture = "Qwen3VLForConditionalGeneration"


@MULTIMODAL_REGISTRY.register_processor(
    ZoopruneQwen3VLMultiModalProcessor,
    info=ZoopruneQwen3VLMoeProcessingInfo,
    dummy_inputs=Qwen3VLDummyInputsBuilder,
)
class ZoopruneQwen3VLMoe(_PrunedMoe, Qwen3VLMoeForConditionalGeneration):
    """vLLM's Qwen3-VL-MoE, its images pruned; DeepStack rows follow the kept tokens."""

    architecture = "Qwen3VLMoeForConditionalGeneration"


@MULTIMODAL_REGISTRY.register_processor(
    ZoopruneQwen3VLMultiModalProcessor,
    info=ZoopruneQwen3_5ProcessingInfo,
    dummy_inputs=Qwen3VLDummyInputsBuilder,
)
class ZoopruneQwen3_5(_PrunedQwen, Qwen3_5ForConditionalGeneration):
    """vLLM's Qwen3.5, its images pruned (on a CPU its linear attention needs bfloat16)."""

    architecture = "Qwen3_5ForConditionalGeneration"


@MULTIMODAL_REGISTRY.register_processor(
    ZoopruneQwen3VLMultiModalProcessor,
    info=ZoopruneQwen3_5MoeProcessingInfo,
    dummy_inputs=Qwen3VLDummyInputsBuilder,
)
class ZoopruneQwen3_5Moe(_PrunedMoe, Qwen3_5MoeForConditionalGeneration):
    """vLLM's Qwen3.5-MoE, its images pruned (bfloat16 on a CPU, as Qwen3.5)."""

    architecture = "Qwen3_5MoeForConditionalGeneration"
