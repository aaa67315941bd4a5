"""What a pruning call kept: the record a handle exposes as ``handle.selection``."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from torch import Tensor


@dataclass(frozen=True)
class ImageSelection:
    """One image's share of a call.

    Attributes:
        image: the image's index among the call's images (the order they were given).
        prompt: the batch row whose prompt holds the image.
        num_tokens: N, the image's visual tokens before pruning.
        indices: ``[K]`` kept token indices into the image's N tokens, ascending; with the
            grid, index j is patch cell ``(j // width, j % width)``.
        scores: ``[N]`` the score the method ranked by (ZOO-Prune: sensitivity), or None.
        grid: ``(height, width)`` of the patch grid, or ``(1, N)``.
        positions: ``[K]`` where the kept tokens stood in the original prompt.
    """

    image: int
    prompt: int
    num_tokens: int
    indices: Tensor
    scores: Tensor | None
    grid: tuple[int, int]
    positions: Tensor

    @property
    def kept(self) -> int:
        return int(self.indices.numel())


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
