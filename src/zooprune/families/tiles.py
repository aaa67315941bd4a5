"""Images cut into square tiles, each tile one run of ``side x side`` tokens in the prompt
and no separator placeholders (Idefics3 / SmolVLM's crops, InternVL's tiles)."""

from __future__ import annotations

import torch
from torch import Tensor

from zooprune.pipeline import Box, ImageLayout


def tiles_layout(
    tokens: Tensor, crop_of_run: list[int], side: int, boxes: list[Box] | None = None
) -> ImageLayout:
    """One image's layout: its tiles' runs in prompt order.

    Args:
        tokens: ``[runs * side^2, d_l]`` the image's tokens in prompt order.
        crop_of_run: per run, its crop index (crop 0: the whole image, which a ``split``
            budget serves first).
        boxes: per crop, its box in the original image, where known.
    """
    device = tokens.device
    per_tile = side * side
    runs = len(crop_of_run)
    index = torch.arange(runs * per_tile, device=device)
    cell = index % per_tile
    return ImageLayout(
        packed=tokens,
        token_slots=index,
        separator_of=torch.full_like(index, -1),
        crop=torch.tensor(crop_of_run, device=device).repeat_interleave(per_tile),
        cell=torch.stack([cell // side, cell % side], dim=-1),
        crop_grids=[(side, side)] * runs,
        patch_grids=[(side, side)] * runs,
        boxes=boxes,
    )
