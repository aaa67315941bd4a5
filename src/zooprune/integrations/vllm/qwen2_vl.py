"""Qwen2-VL and Qwen2.5-VL on vLLM, pruned, the kept tokens keeping their 3-D positions.

An image gets K placeholders (the budget of its N merged tokens). Its kept tokens must
keep their original M-RoPE positions, and which tokens are kept depends on the image: so
the positions vLLM asks for when it admits a request (``get_mrope_input_positions``) are
computed from the selection itself. The variant runs the tower and the selection for the
request's images there, keeps the result (keyed by the image's pixels), and hands it to
``embed_multimodal`` when vLLM encodes the images: one encoding per image, as unpruned.
vLLM's own route for pruned M-RoPE positions (``recompute_mrope_positions``) runs only when
video pruning (EVS) is switched on, and never on its CPU runner; this one needs neither.

Text keeps its unpruned positions too: after an image the text continues one past the
image's unpruned block, as in the Hugging Face adapter. On vLLM, videos pass through
unpruned (the Hugging Face adapter prunes them; this variant does not yet).
The projector the methods score is the patch merger (its norm on each of the
``merge^2`` patch states, then its MLP), rebuilt from the checkpoint's full weights.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
from collections import OrderedDict
from collections.abc import Iterable, Iterator
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from vllm.config import VllmConfig
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
from vllm.multimodal import MULTIMODAL_REGISTRY
from vllm.multimodal.processing import PromptReplacement

from zooprune.adapters.qwen2_vl import MergerProjector, _raster_order
from zooprune.integrations.vllm.selection import (
    ProjectorCopy,
    refuse_embeddings,
    select_runs,
    selector_for,
)
from zooprune.pipeline import EncodedImages

#: images whose selection waits for vLLM to encode them (an image seen again is served by
#: vLLM's encoder cache and never asks): the oldest are dropped beyond this
_PENDING = 256


class _Merger(nn.Module):
    """The patch merger as plain modules: ``ln_q`` on each patch state, then ``mlp``."""

    def __init__(self, norm: nn.Module, first: nn.Linear, second: nn.Linear) -> None:
        super().__init__()
        self.ln_q = norm
        self.mlp = nn.Sequential(first, nn.GELU(), second)


def _merger_from(tensors: dict[str, Tensor], rms: bool, dtype: torch.dtype) -> nn.Module:
    width = tensors["ln_q.weight"].shape[0]
    norm = nn.RMSNorm(width, eps=1e-6) if rms else nn.LayerNorm(width, eps=1e-6)
    first, second = tensors["mlp.0.weight"], tensors["mlp.2.weight"]
    merger = _Merger(
        norm,
        nn.Linear(first.shape[1], first.shape[0]),
        nn.Linear(second.shape[1], second.shape[0]),
    )
    merger.load_state_dict(tensors)
    return merger.to(dtype).eval().requires_grad_(False)


class _Count:
    """K placeholders per image: the budget of its N merged tokens."""

    def get_num_image_tokens(self, **kwargs: Any) -> int:
        n = super().get_num_image_tokens(**kwargs)
        return selector_for(self.get_hf_config()).budget.tokens_for(n)


class ZoopruneQwen2VLProcessingInfo(_Count, Qwen2VLProcessingInfo):
    pass


class ZoopruneQwen2_5_VLProcessingInfo(_Count, Qwen2_5_VLProcessingInfo):
    pass


class _ShortPrompt:
    """The prompt update that gives an image its N placeholders, cut to the budget's K."""

    def _get_prompt_updates(self, *args: Any, **kwargs: Any) -> list[Any]:
        budget = selector_for(self.info.get_hf_config()).budget
        updates = list(super()._get_prompt_updates(*args, **kwargs))
        for number, update in enumerate(updates):
            if update.modality == "image":
                updates[number] = PromptReplacement(
                    modality="image",
                    target=update.target,
                    replacement=functools.partial(_first_k, update.replacement, budget),
                )
        return updates


def _first_k(replacement: Any, budget: Any, item: int) -> list[int]:
    tokens = replacement(item)
    return tokens[: budget.tokens_for(len(tokens))]


class ZoopruneQwen2VLMultiModalProcessor(_ShortPrompt, Qwen2VLMultiModalProcessor):
    pass


class ZoopruneQwen2_5_VLMultiModalProcessor(_ShortPrompt, Qwen2_5_VLMultiModalProcessor):
    pass


class _PrunedQwen:
    """What both Qwen variants add to vLLM's class."""

    rms_merger = False

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "") -> None:
        self.selector = selector_for(vllm_config.model_config.hf_config)  # fails at start
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        self._merger_copy = ProjectorCopy(("model.visual.merger.", "visual.merger."))
        # Outside the module tree: vLLM would expect their weights from the checkpoint.
        object.__setattr__(self, "scoring_projector", None)
        object.__setattr__(self, "zooprune_kept", [])
        object.__setattr__(self, "_pending", OrderedDict())

    def load_weights(self, weights: Iterable[tuple[str, Tensor]]) -> set[str]:
        loaded = super().load_weights(self._merger_copy.watch(weights))
        merger = _merger_from(self._merger_copy.tensors, self.rms_merger, self.visual.dtype)
        unit = self.visual.spatial_merge_size**2
        object.__setattr__(self, "scoring_projector", MergerProjector(merger, unit))
        return loaded

    # -- the selection, once per image ----------------------------------------------------

    def _kept(self, pixel_values: Tensor, grid_thw: Tensor) -> list[tuple[Tensor, Tensor]]:
        """Per image of a batch: ``(kept indices, kept tokens)``, from the pending ones
        where the positions asked for them first, else selected now."""
        sizes = grid_thw.prod(-1).tolist()
        keys = [_key(p, g) for p, g in zip(pixel_values.split(sizes), grid_thw, strict=True)]
        if all(key in self._pending for key in keys):
            return [self._pending.pop(key) for key in keys]
        features, projected, grids = self._encode(pixel_values, grid_thw)
        encoded = EncodedImages(features, projected, grids, None, None, None)
        runs = select_runs(self, encoded)
        results = list(zip(self.zooprune_kept, runs, strict=True))
        for key in keys:
            self._pending.pop(key, None)
        return results

    def _encode(
        self, pixel_values: Tensor, grid_thw: Tensor
    ) -> tuple[list[Tensor], list[Tensor], list[tuple[int, int]]]:
        """Per image: the merger's grouped inputs ``[N, u*C]`` and outputs ``[N, d]`` in
        raster order, and the merged grid."""
        visual = self.visual
        with _captured(visual.merger) as captured:
            tokens = visual(pixel_values, grid_thw=grid_thw.tolist())
        merge = visual.spatial_merge_size
        states = captured["states"].reshape(-1, merge * merge * captured["states"].shape[-1])
        merged = captured["merged"]
        stand_in = SimpleNamespace(config=self.config.vision_config, spatial_merge_size=merge)
        order = _raster_order(stand_in, grid_thw.cpu())
        if order is not None:  # Qwen2.5-VL's tower works in window order
            order = order.to(states.device)
            states, merged = states[order], merged[order]
        if not torch.allclose(merged, tokens, rtol=0, atol=0, equal_nan=True):
            raise RuntimeError(
                f"{type(self).__name__}: the merger's output in raster order differs from "
                "the tower's tokens"
            )
        counts = [int(t * h * w) // (merge * merge) for t, h, w in grid_thw.tolist()]
        grids = [(int(h) // merge, int(w) // merge) for _, h, w in grid_thw.tolist()]
        return list(states.split(counts)), list(tokens.split(counts)), grids

    def _process_image_input(self, image_input: Any) -> tuple[Tensor, ...]:
        refuse_embeddings(image_input)
        grid_thw = image_input["image_grid_thw"]
        runs = [run for _, run in self._kept(image_input["pixel_values"], grid_thw)]
        return tuple(runs)

    # -- positions --------------------------------------------------------------------------

    def get_mrope_input_positions(
        self, input_tokens: list[int], mm_features: list[Any]
    ) -> tuple[Tensor, int]:
        """The 3-D positions of the pruned prompt: text and kept image tokens at their
        unpruned positions (a video's tokens, unpruned, at theirs)."""
        features = sorted(mm_features, key=lambda f: f.mm_position.offset)
        blocks, start, next_position = [], 0, 0
        for feature, (offset, t, h, w, t_factor) in zip(
            features, self.iter_mm_grid_thw(mm_features), strict=True
        ):
            text = offset - start
            blocks.append(np.broadcast_to(np.arange(text), (3, text)) + next_position)
            grid = np.indices((t, h, w))
            if t_factor != 1.0:
                grid[0] = (grid[0] * t_factor).astype(np.int64)
            block = grid.reshape(3, -1) + text + next_position
            next_position = int(block.max()) + 1
            if feature.modality == "image":
                kept = self._admit(feature)
                block = block[:, kept.numpy()]
            blocks.append(block)
            start = offset + block.shape[1]
        if start < len(input_tokens):
            text = len(input_tokens) - start
            blocks.append(np.broadcast_to(np.arange(text), (3, text)) + next_position)
        positions = np.concatenate(blocks, axis=1).reshape(3, -1)
        return torch.from_numpy(positions), int(positions.max()) + 1 - len(input_tokens)

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


@MULTIMODAL_REGISTRY.register_processor(
    ZoopruneQwen2VLMultiModalProcessor,
    info=ZoopruneQwen2VLProcessingInfo,
    dummy_inputs=Qwen2VLDummyInputsBuilder,
)
class ZoopruneQwen2VL(_PrunedQwen, Qwen2VLForConditionalGeneration):
    """vLLM's Qwen2-VL, its images pruned (LayerNorm merger)."""


@MULTIMODAL_REGISTRY.register_processor(
    ZoopruneQwen2_5_VLMultiModalProcessor,
    info=ZoopruneQwen2_5_VLProcessingInfo,
    dummy_inputs=Qwen2_5_VLDummyInputsBuilder,
)
class ZoopruneQwen2_5_VL(_PrunedQwen, Qwen2_5_VLForConditionalGeneration):
    """vLLM's Qwen2.5-VL, its images pruned (RMSNorm merger, window-order tower)."""

    rms_merger = True
