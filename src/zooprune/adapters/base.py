"""What every model adapter provides, and the sequence surgery they share.

An adapter knows, for one model family, where the projector input lives, how the visual
tokens of an image are laid out, and which placeholder token stands for them in the
prompt. Everything else (choosing tokens, shrinking the prompt) is shared.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from zooprune.errors import PlaceholderMismatchError


@dataclass
class EncodedImages:
    """The visual tokens of every image in a call, as the model computed them.

    Attributes:
        features: per image, projector inputs ``[N_i, d_v]``.
        projected: per image, projector outputs ``[N_i, d_l]`` (what fills the prompt).
        grids: per image, ``(height, width)`` with ``height * width == N_i``, or ``(1, N_i)``.
        cls_attention: per image ``[N_i]``, when asked for.
        keys: per image ``[N_i, d_k]``, when asked for.
        encoder_output: the model's own encoder output, reused when calling the model.
    """

    features: list[Tensor]
    projected: list[Tensor]
    grids: list[tuple[int, int]]
    cls_attention: list[Tensor] | None
    keys: list[Tensor] | None
    encoder_output: Any


class Adapter(ABC):
    """One model family. Subclasses register themselves in ``zooprune.adapters``."""

    name: str
    model_classes: tuple[type[nn.Module], ...]
    #: one line on what in those classes is supported, for error messages and the README
    requirement: str = ""
    #: what N is for one image, in words, for the README's support matrix
    tokens_per_image: str = ""
    #: for each extra a method may need, when this family's models provide it ("" = never)
    extras: dict[str, str] = {}

    @classmethod
    def supports(cls, model: nn.Module) -> bool:
        return isinstance(model, cls.model_classes)

    def provides(self, model: nn.Module) -> frozenset[str]:
        """What this model can give methods beyond features (e.g. ``"cls_attention"``)."""
        return frozenset()

    @abstractmethod
    def image_token_id(self, model: nn.Module) -> int:
        """The placeholder token id standing for one visual token in the prompt."""

    @abstractmethod
    def projector(self, model: nn.Module) -> nn.Module:
        """The token-wise projector module."""

    @abstractmethod
    def encode(
        self, model: nn.Module, image_inputs: dict[str, Any], needs: frozenset[str]
    ) -> EncodedImages:
        """Run the vision side on ``image_inputs`` (pixel_values and friends)."""

    @abstractmethod
    def encoder_output(self, encoded: EncodedImages, kept_tokens: list[Tensor]) -> Any:
        """The model's encoder-output object carrying only the kept tokens per image."""

    #: keyword arguments of forward/generate that belong to the vision side
    image_input_names: tuple[str, ...] = ("pixel_values",)


def square_grid(num_tokens: int) -> tuple[int, int]:
    """``(s, s)`` when ``num_tokens == s * s``, else ``(1, num_tokens)``."""
    side = int(round(num_tokens**0.5))
    return (side, side) if side * side == num_tokens else (1, num_tokens)


def locate_images(input_ids: Tensor, image_token_id: int, counts: list[int]) -> list[Tensor]:
    """Where each image's placeholder tokens are in the batch.

    The model fills placeholders with image features in row-major order, so image i owns
    the i-th run of ``counts[i]`` placeholders, which must lie in a single prompt.

    Args:
        input_ids: ``[B, L]``.
        counts: visual tokens per image, in the order the images were given.

    Returns:
        per image, ``[2, N_i]`` (row, column) of its placeholders in the batch.
    """
    rows, cols = (input_ids == image_token_id).nonzero(as_tuple=True)
    if rows.numel() != sum(counts):
        raise PlaceholderMismatchError(
            f"the prompts hold {rows.numel()} image tokens but the {len(counts)} image(s) give "
            f"{sum(counts)} visual tokens ({' + '.join(map(str, counts))}); build the prompt "
            "with the model's processor from the same images"
        )
    located, start = [], 0
    for image, count in enumerate(counts):
        r, c = rows[start : start + count], cols[start : start + count]
        if count and bool((r != r[0]).any()):
            raise PlaceholderMismatchError(
                f"image {image}'s {count} placeholder tokens are split across prompts "
                f"{sorted(set(r.tolist()))}; each prompt needs all tokens of its images"
            )
        located.append(torch.stack([r, c]))
        start += count
    return located


def padding_side(attention_mask: Tensor | None) -> str:
    """``"right"`` if some prompt is padded at the end and none at the start, else ``"left"``."""
    if attention_mask is None:
        return "left"
    left = bool((attention_mask[:, 0] == 0).any())
    right = bool((attention_mask[:, -1] == 0).any())
    return "right" if right and not left else "left"


def shrink(
    keep: Tensor, tensors: dict[str, Tensor], pad_values: dict[str, int], side: str
) -> dict[str, Tensor]:
    """Drop the positions where ``keep`` is False, re-padding prompts to a common length.

    Args:
        keep: ``[B, L]`` bool, True for the positions that stay.
        tensors: each ``[..., B, L]`` (sequence last; e.g. Qwen's ``[3, B, L]`` positions).
        pad_values: fill value per name for the re-padded slots (default 0).
        side: ``"left"`` or ``"right"``: where the padding goes.

    Returns:
        the same names, each ``[..., B, L']`` with ``L' = max_b keep[b].sum()``.
    """
    lengths = keep.sum(dim=-1)
    new_len = int(lengths.max())
    batch = keep.shape[0]
    out = {}
    # Destination slot of each kept position: its rank among the row's kept positions,
    # shifted right by the row's padding when padding goes on the left.
    rank = keep.long().cumsum(dim=-1) - 1
    if side == "left":
        rank = rank + (new_len - lengths)[:, None]
    rows, cols = keep.nonzero(as_tuple=True)
    dest = rank[rows, cols]
    for name, t in tensors.items():
        shape = (*t.shape[:-2], batch, new_len)
        result = torch.full(shape, pad_values.get(name, 0), dtype=t.dtype, device=t.device)
        result[..., rows, dest] = t[..., rows, cols]
        out[name] = result
    return out
