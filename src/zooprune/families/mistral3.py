"""Mistral 3 (Pixtral tower, patch merger, ``[IMG_BREAK]`` rows), whatever engine runs it.

How the model lays out one image (transformers v5): the processor resizes the image so
that each side is a multiple of ``patch * merge`` (``merge = spatial_merge_size``, 2 in
the released models; ``image_sizes[i]`` is the processed ``(height, width)``), and the
Pixtral tower turns it into an ``hp x wp`` grid of patch states (``hp = height / patch``),
all images of a call packed into one sequence with block attention between them. The
multi-modal projector then RMS-normalises each patch state, merges every ``merge x merge``
window of patches into one vector (``Mistral3PatchMerger``: an unfold, then one Linear
without bias) and runs a Linear -> GELU -> Linear MLP on it. Each image thus gives
``N = (hp / merge) * (wp / merge)`` tokens on the merged ``gh x gw`` grid, raster order.

The prompt holds, per image, one row of ``gw`` ``[IMG]`` placeholders per grid row, each
row followed by ``[IMG_BREAK]``, except the last, which is followed by ``[IMG_END]``.
Those two are *text* tokens of the prompt that the model embeds itself (unlike
LLaVA-NeXT's ``image_newline``, a placeholder the model fills with a learned vector): the
layout declares them ``ImageLayout(text_separators=True)``, so the image's run in the
prompt is its tokens and its breaks, the model gets only the kept tokens, and a dropped
break leaves ``input_ids`` as a dropped placeholder does.

What "projector" means here: the patch merger mixes the ``merge^2`` patches of a window,
so the projector is token-wise only on grouped vectors (as Qwen2-VL's merger). The
projector the methods score is the whole multi-modal projector, norm included, on one
window's ``merge^2`` patch states concatenated (:class:`MergedPatchProjector`); the
projector inputs X are the tower's feature-layer states grouped so, ``[N, merge^2 * C]``.
The norm in front (and the merging Linear) make it more than a plain GELU MLP, so
``estimator="auto"`` runs ``jvp``; ``exact`` and ``lowrank`` are refused with a message
naming ``jvp`` and ``zo``.

Budget semantics:

- **N** = ``(height / patch / merge) * (width / patch / merge)`` for ``image_sizes[i] =
  (height, width)``: the merged tokens. ``[IMG_BREAK]`` and ``[IMG_END]`` are text, never
  scored, selected or counted. N differs between images of different sizes, and so does
  K under ``ratio=``.
- ``separators="all"`` (default, the row structure the model was trained on survives):
  every ``[IMG_BREAK]`` stays, also after a row whose tokens were all pruned;
  ``separators="nonempty"``: the break of such a row goes too. ``[IMG_END]`` always
  stays (it closes the image, not a row).
- One image is one crop: ``handle.selection`` gives crop 0 for every kept token, its
  ``cells`` (row, column) in the merged grid, ``grid == patch_grids[0] == (gh, gw)``,
  and the kept breaks' prompt positions as ``separators``. The processor's resize is
  unknown to the model, so ``boxes`` is None (draw over the image as processed).

Positions are 1-D: ``positions="compact"`` (default) renumbers the shortened prompt,
``"original"`` keeps every kept token's (and break's) unpruned position. Pixtral has no
CLS token: ``visionzip`` is refused, naming the methods that apply.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from zooprune.families.llava import activation
from zooprune.pipeline import EncodedImages, ImageLayout

#: where the projector's tensors live in a checkpoint (transformers 5, and the hub's)
PROJECTOR_PREFIXES = ("model.multi_modal_projector.", "multi_modal_projector.")


class MergedPatchProjector(nn.Module):
    """Mistral 3's projector as a token-wise map on grouped vectors: ``[..., u*C] -> [..., d_l]``.

    ``u = merge^2``; a vector holds one window's patch states in raster order within the
    window. Normalises each patch state with the projector's own RMSNorm, orders the
    window's entries as the merger's unfold does (channel-major) and runs the merging
    Linear and the MLP: equal, row for row, to ``multi_modal_projector`` on the patch
    states the vectors were grouped from.
    """

    def __init__(self, projector: nn.Module, merge: int) -> None:
        super().__init__()
        # A child, not a copy: the estimators read (and may recast) the live weights.
        self.projector = projector
        self.unit = merge * merge

    def forward(self, x: Tensor) -> Tensor:
        p = self.projector
        patches = x.unflatten(-1, (self.unit, x.shape[-1] // self.unit))  # [..., u, C]
        normed = p.norm(patches)
        # unfold lays a window out as channel * u + position in the window.
        merged = p.patch_merger.merging_layer(normed.transpose(-1, -2).flatten(-2))
        return p.linear_2(p.act(p.linear_1(merged)))


class _RMSNorm(nn.Module):
    """Mistral's RMSNorm: ``w * x / rms(x)``, the normalisation in float32."""

    def __init__(self, width: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(width))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


class _Merger(nn.Module):
    def __init__(self, weight: Tensor) -> None:
        super().__init__()
        self.merging_layer = nn.Linear(weight.shape[1], weight.shape[0], bias=False)


class _Projector(nn.Module):
    """Mistral 3's projector as plain modules, named as the checkpoint names them."""

    def __init__(self, tensors: Mapping[str, Tensor], config: Any) -> None:
        super().__init__()
        first, second = tensors["linear_1.weight"], tensors["linear_2.weight"]
        self.norm = _RMSNorm(tensors["norm.weight"].shape[0], config.text_config.rms_norm_eps)
        self.patch_merger = _Merger(tensors["patch_merger.merging_layer.weight"])
        self.linear_1 = nn.Linear(first.shape[1], first.shape[0], bias="linear_1.bias" in tensors)
        self.act = activation(config.projector_hidden_act)
        self.linear_2 = nn.Linear(second.shape[1], second.shape[0], bias="linear_2.bias" in tensors)


def projector_from_tensors(
    tensors: Mapping[str, Tensor], config: Any, dtype: torch.dtype
) -> nn.Module:
    """The scored projector, rebuilt from its checkpoint tensors (keys relative to the
    projector): equal to the Hugging Face adapter's."""
    parts = _Projector(tensors, config)
    parts.load_state_dict(dict(tensors))
    merge = config.spatial_merge_size
    return MergedPatchProjector(parts.to(dtype).eval().requires_grad_(False), merge)


def encoded(
    states: list[Tensor],
    patch_grids: list[tuple[int, int]],
    projected: list[Tensor],
    merge: int,
    *,
    engine: str,
    encoder_output: Any = None,
    break_embedding: Tensor | None = None,
) -> EncodedImages:
    """Every image of a call, from its ``[hp * wp, C]`` patch states (what the projector's
    norm receives), its patch grid and its tokens: features grouped by merge window,
    grids, and each image's layout (:func:`rows_layout`; ``break_embedding`` as there)."""
    features, grids = [], []
    for image, (grid_states, patches, tokens) in enumerate(
        zip(states, patch_grids, projected, strict=True)
    ):
        grouped, grid = group_windows(grid_states, patches, merge)
        if grouped.shape[0] != tokens.shape[0]:
            raise RuntimeError(
                f"{engine}: image {image} has {grouped.shape[0]} merge windows, but "
                f"{tokens.shape[0]} tokens were made"
            )
        features.append(grouped)
        grids.append(grid)
    return EncodedImages(
        features=features,
        projected=projected,
        grids=grids,
        cls_attention=None,
        keys=None,
        encoder_output=encoder_output,
        layouts=[rows_layout(t, g, break_embedding) for t, g in zip(projected, grids, strict=True)],
    )


def group_windows(states: Tensor, patches: tuple[int, int], merge: int) -> tuple[Tensor, tuple]:
    """``[gh * gw, merge^2 * C]`` each merge window's patch states, and ``(gh, gw)``.

    Windows in raster order, a window's patches in raster order within it; patches past
    the last whole window (none from the processor) are left out, as the merger's unfold
    leaves them.
    """
    hp, wp = patches
    gh, gw = hp // merge, wp // merge
    grid = states.view(hp, wp, -1)[: gh * merge, : gw * merge]
    windows = grid.reshape(gh, merge, gw, merge, -1).permute(0, 2, 1, 3, 4)
    return windows.reshape(gh * gw, -1), (gh, gw)


def rows_layout(
    tokens: Tensor, grid: tuple[int, int], break_embedding: Tensor | None = None
) -> ImageLayout:
    """One image's run: ``gh`` rows of ``gw`` tokens, a break after every row but the
    last; the ``[IMG_END]`` after the last row is outside the run and always stays.

    The breaks are text the prompt holds (``text_separators``), unless
    ``break_embedding`` (``[d_l]``, the language model's input embedding of
    ``[IMG_BREAK]``) is given: then they are slots of the run that the engine fills with
    it, as a prompt whose placeholder count is fixed before the image is encoded needs
    (the kept breaks land where the kept rows end, and embed as the text would).
    """
    gh, gw = grid
    device = tokens.device
    index = torch.arange(gh * gw, device=device)
    row, col = index // gw, index % gw
    token_slots = row * (gw + 1) + col
    slots = gh * (gw + 1) - 1 if gh else 0
    # Break slots hold the break's embedding where the engine places it, else zero.
    packed = tokens.new_zeros(slots, tokens.shape[-1])
    if break_embedding is not None:
        packed[:] = break_embedding.to(tokens.dtype)
    packed[token_slots] = tokens
    return ImageLayout(
        packed=packed,
        token_slots=token_slots,
        separator_of=torch.where(row < gh - 1, row * (gw + 1) + gw, -1),
        crop=torch.zeros_like(index),
        cell=torch.stack([row, col], dim=-1),
        crop_grids=[grid],
        patch_grids=[grid],
        text_separators=break_embedding is None,
    )


def run_length(kept: int, rows: int) -> int:
    """The slots of an image's pruned run where its breaks are placeholders
    (``separators="all"``): the K kept tokens and the ``rows - 1`` breaks."""
    return kept + rows - 1
