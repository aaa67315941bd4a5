"""The Qwen vision families on vLLM, pruned: Qwen2-VL, Qwen2.5-VL, Qwen3-VL (dense and
MoE, DeepStack) and Qwen3.5 (dense and MoE); the kept tokens keep their 3-D positions.

An image or a video (an *item*) gets K placeholders (the budget of its N merged tokens; a
video's N is all its frames' tokens). Its kept tokens must keep their original M-RoPE
positions, and which tokens are kept depends on the item: so the positions vLLM asks for
when it admits a request (``get_mrope_input_positions``) come from the selection itself.
The variant runs the tower and the selection for the request's items there, keeps the
result (keyed by the item's pixels), and hands it over when vLLM encodes them: one
encoding per item, as unpruned. The positions are vLLM's own rule applied to the unpruned
prompt (each item's runs grown back to their N placeholders), less the dropped tokens'
columns: text keeps its unpruned positions too, a video's temporal row included.

Videos as on Hugging Face: ``video_budget="frame"`` shares K evenly over the frames,
``"global"`` lets all of them compete. Qwen2-VL and Qwen2.5-VL write a video as one run,
so both are served; Qwen3-VL and Qwen3.5 write each frame as its own run between its
timestamp and markers, whose count vLLM must know before encoding: ``"frame"`` only.

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
from zooprune.integrations.vllm.prompts import PrunedProcessor, even_runs
from zooprune.integrations.vllm.selection import (
    PrunedVariant,
    refuse_embeddings,
    request_field,
    request_texts,
    run_lengths,
)
from zooprune.pipeline import Kept, Selector

#: images whose selection waits for vLLM to encode them (an image seen again is served by
#: vLLM's encoder cache and never asks): the oldest are dropped beyond this
_PENDING = 256


class _ShortPrompt(PrunedProcessor):
    """The prompt updates that give an image or a video its N placeholders, cut to the
    request's K (a video written frame by frame: each frame's run to its even share)."""

    def prompt_rewrites(self, budget: Budget, mm_items: Any) -> dict[str, Any]:
        config = self.info.get_hf_config()
        return {
            kind: functools.partial(even_runs, getattr(config, f"{kind}_token_id"), budget)
            for kind in ("image", "video")
        }


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

    # -- the selection, once per item ------------------------------------------------------

    def _kept(
        self,
        pixel_values: Tensor,
        grid_thw: Tensor,
        kind: str,
        requested: list[str | None],
    ) -> list[tuple[Tensor, Tensor]]:
        """Per item of a batch of one ``kind``, with its request's settings text (None:
        the server's): ``(kept indices, kept run)``, from the pending ones where the
        positions asked for them first (their selection is the one the positions were
        made from), the others selected now. An item may come twice (the same pixels
        under two cache keys): both take its one result."""
        sizes = grid_thw.prod(-1).tolist()
        pixels = pixel_values.split(sizes)
        keys = [
            _key(kind, p, g, text) for p, g, text in zip(pixels, grid_thw, requested, strict=True)
        ]
        found = {key: self._pending[key] for key in keys if key in self._pending}
        missing = list(dict.fromkeys(key for key in keys if key not in found))
        if missing:
            first = [keys.index(key) for key in missing]
            selectors = [self.selector_of_request(requested[i]) for i in first]
            kept, tokens = self._select(
                torch.cat([pixels[i] for i in first]), grid_thw[first], kind, selectors
            )
            for key, image, full in zip(missing, kept.images, tokens, strict=True):
                found[key] = (image.indices, self._run(image, full))
        for key in found:
            self._pending.pop(key, None)
        return [found[key] for key in keys]

    def _select(
        self, pixel_values: Tensor, grid_thw: Tensor, kind: str, selectors: list[Selector]
    ) -> tuple[Kept, list[Tensor]]:
        """Encode the items once, capturing the merger's input, and select."""
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
            kind,
            engine=type(self).__name__,
        )
        return self.select(encoded, selectors), tokens

    def _run(self, image: Any, full: Tensor) -> Tensor:
        """What fills the image's kept placeholders: its kept run, and beside each kept
        token the rest of its row (Qwen3-VL's DeepStack levels) where the tower gives one."""
        width = image.run.shape[-1]
        if full.shape[-1] == width:
            return image.run
        return torch.cat([image.run.to(full.dtype), full[image.slots, width:]], dim=-1)

    def _process_image_input(self, image_input: Any) -> tuple[Tensor, ...]:
        refuse_embeddings(image_input)
        pixels, grid_thw = image_input["pixel_values"], image_input["image_grid_thw"]
        kept = self._kept(pixels, grid_thw, "image", self.requested_texts(len(grid_thw)))
        return tuple(run for _, run in kept)

    def _process_video_input(self, video_input: Any) -> tuple[Tensor, ...]:
        refuse_embeddings(video_input)
        pixels, grid_thw = video_input["pixel_values_videos"], video_input["video_grid_thw"]
        kept = self._kept(pixels, grid_thw, "video", self.requested_texts(len(grid_thw)))
        return tuple(run for _, run in kept)

    # -- positions --------------------------------------------------------------------------

    def get_mrope_input_positions(
        self, input_tokens: list[int], mm_features: list[Any]
    ) -> tuple[Tensor, int]:
        """The 3-D positions of the pruned prompt: vLLM's own rule on the unpruned prompt
        (every item's runs grown back to their N placeholders), less the dropped tokens."""
        grown, keep, features, request = [], [], [], []
        cursor = shift = 0
        for feature in sorted(mm_features, key=lambda f: f.mm_position.offset):
            where = feature.mm_position
            grown += input_tokens[cursor : where.offset]
            keep += [True] * (where.offset - cursor)
            span = input_tokens[where.offset : where.offset + where.length]
            token = getattr(self.config, f"{feature.modality}_token_id")
            if _PIXELS[feature.modality] in feature.data:
                kept = self._admit(feature)
                request.append(kept.cpu())
            else:
                kept = _first_of_each_run(span, token, _item_tokens(feature, self.visual))
            full, mask = self._grown(span, token, kept, _item_tokens(feature, self.visual))
            grown += full
            keep += mask
            cursor = where.offset + where.length
            is_embed = None if where.is_embed is None else torch.tensor(full) == token
            position = dataclasses.replace(
                where, offset=where.offset + shift, length=len(full), is_embed=is_embed
            )
            shift += len(full) - len(span)
            features.append(dataclasses.replace(feature, mm_position=position))
        grown += input_tokens[cursor:]
        keep += [True] * (len(input_tokens) - cursor)
        positions, _ = super().get_mrope_input_positions(grown, features)
        positions = positions[:, torch.tensor(keep)]
        # For inspection: the request's items (selected one by one above), its positions.
        if request:
            object.__setattr__(self, "zooprune_kept", request)
        object.__setattr__(self, "zooprune_positions", positions)
        return positions, int(positions.max()) + 1 - len(input_tokens)

    def _grown(
        self, span: list[int], token: int, kept: Tensor, n: int
    ) -> tuple[list[int], list[bool]]:
        """An item's placeholder ``span`` in the pruned prompt grown back to its ``n``
        placeholders, with the mask of the kept ones (``kept``: indices among the ``n``).
        A span with vision-start markers (a Qwen3 video) holds one run per frame, each
        between its markers and grown to ``n / frames``; else the span is the one run."""
        mask = torch.zeros(n, dtype=torch.bool)
        mask[kept] = True
        start = self.config.vision_start_token_id
        if start not in span:
            return [token] * n, mask.tolist()
        frames = span.count(start)
        per_frame, pieces = n // frames, mask.split(n // frames)
        full, keep, frame = [], [], 0
        for value in span:
            if value == token:
                continue  # each frame's run is written out whole at its start marker
            full.append(value)
            keep.append(True)
            if value == start:
                full += [token] * per_frame
                keep += pieces[frame].tolist()
                frame += 1
        return full, keep

    def _admit(self, feature: Any) -> Tensor:
        """Select an admitted request's image or video now; its tokens wait for the
        encoder."""
        kind, data = feature.modality, feature.data
        pixels = data[_PIXELS[kind]].data
        grid = data[f"{kind}_grid_thw"].data.reshape(1, 3)
        field = data.get(request_field(kind))
        text = None if field is None else request_texts([field.data])[0]
        key = _key(kind, pixels, grid[0], text)
        if key not in self._pending:
            device = next(self.visual.parameters()).device
            with torch.inference_mode():
                indices, run = self._kept(pixels.to(device), grid.to(device), kind, [text])[0]
            self._pending[key] = (indices, run)
            while len(self._pending) > _PENDING:
                self._pending.popitem(last=False)
        return self._pending[key][0]


#: where a feature's pixels are, per kind
_PIXELS = {"image": "pixel_values", "video": "pixel_values_videos"}


def _first_of_each_run(span: list[int], token: int, n: int) -> Tensor:
    """Stand-in kept indices for an item whose pixels vLLM no longer sends: its whole run
    lies in the prefix cache (vLLM then keeps only the grid). Each run's first tokens of
    its share of the ``n``: the count per run is the prompt's, so the grown prompt and
    every later position are the true ones (text after an item starts past the item's
    largest position, whichever tokens it kept); only the cached item's own columns,
    never computed again, may differ."""
    runs = run_lengths(span, token)
    share = n // len(runs)
    return torch.cat([torch.arange(kept) + r * share for r, kept in enumerate(runs)])


def _item_tokens(feature: Any, visual: nn.Module) -> int:
    """An item's N: its merged tokens, all frames of a video."""
    t, h, w = feature.data[f"{feature.modality}_grid_thw"].data.tolist()
    return int(t * h * w) // visual.spatial_merge_size**2


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


def _key(kind: str, pixels: Tensor, grid: Tensor, requested: str | None) -> str:
    """An item's identity: its kind, pixels, grid and its request's settings (the
    selection is a function of them)."""
    digest = hashlib.sha1(pixels.detach().cpu().contiguous().numpy().tobytes())
    digest.update(f"{kind} {grid.tolist()} {requested}".encode())
    return digest.hexdigest()


# -- Qwen2-VL and Qwen2.5-VL ---------------------------------------------------------------


class ZoopruneQwen2VLMultiModalProcessor(_ShortPrompt, Qwen2VLMultiModalProcessor):
    pass


class ZoopruneQwen2_5_VLMultiModalProcessor(_ShortPrompt, Qwen2_5_VLMultiModalProcessor):
    pass


@MULTIMODAL_REGISTRY.register_processor(
    ZoopruneQwen2VLMultiModalProcessor,
    info=Qwen2VLProcessingInfo,
    dummy_inputs=Qwen2VLDummyInputsBuilder,
)
class ZoopruneQwen2VL(_PrunedQwen, Qwen2VLForConditionalGeneration):
    """vLLM's Qwen2-VL, its images pruned (LayerNorm merger)."""

    architecture = "Qwen2VLForConditionalGeneration"


@MULTIMODAL_REGISTRY.register_processor(
    ZoopruneQwen2_5_VLMultiModalProcessor,
    info=Qwen2_5_VLProcessingInfo,
    dummy_inputs=Qwen2_5_VLDummyInputsBuilder,
)
class ZoopruneQwen2_5_VL(_PrunedQwen, Qwen2_5_VLForConditionalGeneration):
    """vLLM's Qwen2.5-VL, its images pruned (RMSNorm merger, window-order tower)."""

    architecture = "Qwen2_5_VLForConditionalGeneration"

    rms_merger = True


# -- Qwen3-VL and Qwen3.5, dense and MoE ---------------------------------------------------


class ZoopruneQwen3VLMultiModalProcessor(_ShortPrompt, Qwen3VLMultiModalProcessor):
    pass


class _PrunedMoe(_PrunedQwen):
    """transformers 5 saves fused experts transposed against vLLM's reading
    (:func:`~zooprune.integrations.vllm.checkpoint.transformers5_experts`)."""

    def rename_weights(self, weights: Any) -> Any:
        return transformers5_experts(weights, self.config)


@MULTIMODAL_REGISTRY.register_processor(
    ZoopruneQwen3VLMultiModalProcessor,
    info=Qwen3VLProcessingInfo,
    dummy_inputs=Qwen3VLDummyInputsBuilder,
)
class ZoopruneQwen3VL(_PrunedQwen, Qwen3VLForConditionalGeneration):
    """vLLM's Qwen3-VL, its images pruned; DeepStack rows follow the kept tokens."""

    architecture = "Qwen3VLForConditionalGeneration"


@MULTIMODAL_REGISTRY.register_processor(
    ZoopruneQwen3VLMultiModalProcessor,
    info=Qwen3VLMoeProcessingInfo,
    dummy_inputs=Qwen3VLDummyInputsBuilder,
)
class ZoopruneQwen3VLMoe(_PrunedMoe, Qwen3VLMoeForConditionalGeneration):
    """vLLM's Qwen3-VL-MoE, its images pruned; DeepStack rows follow the kept tokens."""

    architecture = "Qwen3VLMoeForConditionalGeneration"


@MULTIMODAL_REGISTRY.register_processor(
    ZoopruneQwen3VLMultiModalProcessor,
    info=Qwen3_5ProcessingInfo,
    dummy_inputs=Qwen3VLDummyInputsBuilder,
)
class ZoopruneQwen3_5(_PrunedQwen, Qwen3_5ForConditionalGeneration):
    """vLLM's Qwen3.5, its images pruned (on a CPU its linear attention needs bfloat16)."""

    architecture = "Qwen3_5ForConditionalGeneration"


@MULTIMODAL_REGISTRY.register_processor(
    ZoopruneQwen3VLMultiModalProcessor,
    info=Qwen3_5MoeProcessingInfo,
    dummy_inputs=Qwen3VLDummyInputsBuilder,
)
class ZoopruneQwen3_5Moe(_PrunedMoe, Qwen3_5MoeForConditionalGeneration):
    """vLLM's Qwen3.5-MoE, its images pruned (bfloat16 on a CPU, as Qwen3.5)."""

    architecture = "Qwen3_5MoeForConditionalGeneration"
