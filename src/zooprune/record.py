"""What a pruning call kept: the record a handle exposes as ``handle.selection``."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor


@dataclass(frozen=True)
class ImageSelection:
    """One image's share of a call.

    A video is recorded as one item too (``kind == "video"``): its crops are its frames.

    Attributes:
        image: the item's index among the call's items of its kind (the order they were
            given); ``Selection.images`` lists every image, then every video.
        prompt: the batch row whose prompt holds the image.
        num_tokens: N, the image's visual tokens before pruning.
        indices: ``[K]`` kept token indices into the image's N tokens, ascending; with the
            grid, index j is patch cell ``(j // width, j % width)``.
        scores: ``[N]`` the score the method ranked by (ZOO-Prune: sensitivity), or None.
        grid: ``(height, width)`` of the patch grid, or ``(1, N)`` (e.g. several crops).
        positions: ``[K]`` where the kept tokens stood in the original prompt.
        separators: ``[S']`` where the kept separator tokens (LLaVA-NeXT's row newlines)
            stood in the original prompt; empty for families without separators.
        crops: ``[K]`` the crop each kept token comes from (0 for single-crop models; for
            AnyRes, 0 is the base image and 1.. the sub-crops in raster order; for a
            video, the frame).
        cells: ``[K, 2]`` (row, column) of each kept token's patch in its crop's grid.
        patch_grids: per crop, ``(height, width)`` of its patch grid.
        boxes: per crop, ``(top, left, bottom, right)`` in the original image's pixels, or
            None when the adapter cannot know it (LLaVA-1.5: the crop is the image as
            processed).
    """

    image: int
    prompt: int
    num_tokens: int
    indices: Tensor
    scores: Tensor | None
    grid: tuple[int, int]
    positions: Tensor
    separators: Tensor | None = None
    crops: Tensor | None = None
    cells: Tensor | None = None
    patch_grids: tuple[tuple[int, int], ...] = ()
    boxes: tuple[tuple[float, float, float, float], ...] | None = None
    kind: str = "image"

    @property
    def kept(self) -> int:
        return int(self.indices.numel())

    def regions(self) -> Tensor | None:
        """``[K, 4]`` each kept token's patch as (top, left, bottom, right) image pixels.

        For heatmaps over the original image; None when the crops' boxes are unknown.
        """
        if self.boxes is None or self.crops is None or self.cells is None:
            return None
        boxes = torch.tensor(self.boxes, dtype=torch.float64)[self.crops.cpu()]
        grids = torch.tensor(self.patch_grids, dtype=torch.float64)[self.crops.cpu()]
        step = (boxes[:, 2:] - boxes[:, :2]) / grids
        start = boxes[:, :2] + self.cells.cpu().double() * step
        return torch.cat([start, start + step], dim=-1)


@dataclass(frozen=True)
class Selection:
    """Everything one forward or generate call kept, image by image."""

    method: str
    budget: str
    images: list[ImageSelection]
    encode_seconds: float
    select_seconds: float
    details: dict[str, Any] = field(default_factory=dict)

    @property
    def videos(self) -> list[ImageSelection]:
        """The items of ``images`` that are videos (their crops are frames)."""
        return [item for item in self.images if item.kind == "video"]

    @property
    def indices(self) -> list[Tensor]:
        return [image.indices for image in self.images]

    @property
    def scores(self) -> list[Tensor | None]:
        return [image.scores for image in self.images]

    @property
    def kept(self) -> int:
        return sum(image.kept for image in self.images)

    @property
    def total(self) -> int:
        return sum(image.num_tokens for image in self.images)
