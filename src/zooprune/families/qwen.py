"""The Qwen vision families: Qwen2-VL, Qwen2.5-VL, Qwen3-VL (DeepStack) and Qwen3.5.

How the models lay out one image: the processor resizes the image to multiples of
``patch * merge`` (``merge = spatial_merge_size``, 2 in the released models) and cuts it
into a ``h x w`` grid of patches (``image_grid_thw[i] = (t, h, w)``, ``t = 1`` for an
image), ordered so that every ``merge x merge`` window of patches is consecutive. The
tower turns the patches into states ``[t*h*w, C]``; the patch merger normalises each patch
state, concatenates the ``merge^2`` states of a window into one ``merge^2 * C`` vector and
runs an MLP on it. Each image thus gives ``N = t*h*w / merge^2`` tokens on the merged
``(h / merge) x (w / merge)`` grid, raster order, one per placeholder. A video is ``t``
such grids (its frames: temporal patches), frame after frame.

The mergers (the projectors the methods score, as token-wise maps on grouped vectors):

- Qwen2-VL / Qwen2.5-VL: ``ln_q`` (LayerNorm / RMSNorm) on each patch state, then
  ``mlp`` = Linear -> GELU -> Linear (:class:`MergerProjector`);
- Qwen3-VL / Qwen3.5: ``norm`` (LayerNorm) on each patch state, then ``linear_fc1 ->
  GELU -> linear_fc2`` (:class:`Qwen3MergerProjector`). Qwen3-VL's DeepStack mergers are
  not scored: they read earlier layers and their rows follow the kept tokens.

Qwen2.5-VL's tower attends within windows and keeps its states in *window order*; the
model reorders the merger output back to raster order at the end, and so must the
grouped states (:func:`raster_order`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn
from transformers.vision_utils import get_vision_window_index

from zooprune.pipeline import EncodedImages, ImageLayout

#: where the mergers' tensors live in a checkpoint (transformers 5, and the hub's)
MERGER_PREFIXES = ("model.visual.merger.", "visual.merger.")


class MergerProjector(nn.Module):
    """Qwen2-VL's / Qwen2.5-VL's patch merger as a token-wise map on grouped vectors:
    ``[..., u*C] -> [..., d_l]``, ``u = merge^2``.

    Splits each vector into its ``u`` patch states, normalises each with the merger's own
    norm (``ln_q``), concatenates them again and runs the merger's ``mlp``: equal, row for
    row, to the merger on the ``[u*N, C]`` states the vectors were grouped from.
    """

    def __init__(self, merger: nn.Module, unit: int) -> None:
        super().__init__()
        # A child, not a copy: the estimators read (and may recast) the live weights.
        self.merger = merger
        self.unit = unit

    def forward(self, x: Tensor) -> Tensor:
        patches = x.unflatten(-1, (self.unit, x.shape[-1] // self.unit))
        normed = self.merger.ln_q(patches).flatten(-2)
        return self.merger.mlp(normed)


class Qwen3MergerProjector(nn.Module):
    """Qwen3-VL's patch merger (Qwen3.5 has the very same) as a token-wise map on grouped
    vectors: ``[..., u*C] -> [..., d_l]``.

    Normalises each of a vector's ``u`` patch states with the merger's LayerNorm (or the
    whole vector, for a merger built with ``use_postshuffle_norm``, as Qwen3-VL's
    DeepStack mergers are), then runs ``linear_fc1 -> act_fn -> linear_fc2``: equal, row
    for row, to the merger on the ``[u*N, C]`` states the vectors were grouped from.
    """

    def __init__(self, merger: nn.Module, unit: int) -> None:
        super().__init__()
        self.merger = merger
        self.unit = unit

    def forward(self, x: Tensor) -> Tensor:
        merger = self.merger
        if getattr(merger, "use_postshuffle_norm", False):
            normed = merger.norm(x)
        else:
            patches = x.unflatten(-1, (self.unit, x.shape[-1] // self.unit))
            normed = merger.norm(patches).flatten(-2)
        return merger.linear_fc2(merger.act_fn(merger.linear_fc1(normed)))


class _Qwen2Merger(nn.Module):
    """Qwen2-VL's merger as plain modules: ``ln_q`` on each patch state, then ``mlp``."""

    def __init__(self, norm: nn.Module, first: nn.Linear, second: nn.Linear) -> None:
        super().__init__()
        self.ln_q = norm
        self.mlp = nn.Sequential(first, nn.GELU(), second)


class _Qwen3Merger(nn.Module):
    """Qwen3's merger as plain modules: ``norm``, ``linear_fc1``, ``act_fn``, ``linear_fc2``."""

    use_postshuffle_norm = False

    def __init__(self, norm: nn.Module, first: nn.Linear, second: nn.Linear) -> None:
        super().__init__()
        self.norm = norm
        self.linear_fc1 = first
        self.act_fn = nn.GELU()
        self.linear_fc2 = second


def _linear(weight: Tensor, bias: bool) -> nn.Linear:
    return nn.Linear(weight.shape[1], weight.shape[0], bias=bias)


def merger_from_tensors(
    tensors: Mapping[str, Tensor], unit: int, dtype: torch.dtype, *, rms_norm: bool = False
) -> nn.Module:
    """The main merger, rebuilt from its checkpoint tensors (keys relative to the merger)
    as the projector the methods score: :class:`MergerProjector` for Qwen2-VL's naming
    (``ln_q``, ``mlp.0``, ``mlp.2``; ``rms_norm`` for Qwen2.5-VL's RMSNorm),
    :class:`Qwen3MergerProjector` for Qwen3's (``norm``, ``linear_fc1``, ``linear_fc2``).
    Equal to the Hugging Face adapter's projector."""
    tensors = dict(tensors)
    if "ln_q.weight" in tensors:
        width = tensors["ln_q.weight"].shape[0]
        norm = nn.RMSNorm(width, eps=1e-6) if rms_norm else nn.LayerNorm(width, eps=1e-6)
        first, second = tensors["mlp.0.weight"], tensors["mlp.2.weight"]
        merger: nn.Module = _Qwen2Merger(
            norm, _linear(first, "mlp.0.bias" in tensors), _linear(second, "mlp.2.bias" in tensors)
        )
        wrap: type[nn.Module] = MergerProjector
    else:
        width = tensors["norm.weight"].shape[0]
        first, second = tensors["linear_fc1.weight"], tensors["linear_fc2.weight"]
        merger = _Qwen3Merger(
            nn.LayerNorm(width, eps=1e-6),
            _linear(first, "linear_fc1.bias" in tensors),
            _linear(second, "linear_fc2.bias" in tensors),
        )
        wrap = Qwen3MergerProjector
    merger.load_state_dict(tensors)
    return wrap(merger.to(dtype).eval().requires_grad_(False), unit)


def raster_order(vision_config: Any, merge: int, grid_thw: Tensor) -> Tensor | None:
    """``[T]`` the permutation taking the tower's merged-token order to raster order.

    None for a tower that keeps raster order (no ``window_size`` in its config: Qwen2-VL,
    Qwen3-VL, Qwen3.5). Qwen2.5-VL's tower runs in window order: ``get_vision_window_index``
    gives, for each window-order slot, the raster index of its merged token, so its argsort
    undoes it (as the model does to its output).
    """
    window_size = getattr(vision_config, "window_size", None)
    if window_size is None:
        return None
    window_index, _ = get_vision_window_index(
        grid_thw.cpu(),
        spatial_merge_size=merge,
        window_size=window_size,
        patch_size=vision_config.patch_size,
    )
    return torch.argsort(window_index)


def encoded(
    states: Tensor,
    merged: Tensor,
    tokens: list[Tensor],
    grid_thw: Tensor,
    merge: int,
    order: Tensor | None,
    kind: str,
    *,
    engine: str = "the model",
    encoder_output: Any = None,
) -> EncodedImages:
    """One modality's items from what the tower and its merger computed.

    Args:
        states: ``[u*T, C]`` the merger's input (the tower's last states, window-grouped).
        merged: ``[T, d]`` the merger's output, in the tower's order.
        tokens: per item, ``[N_i, d']`` the tokens the engine places (raster order;
            ``d' > d`` where DeepStack rows travel with them).
        grid_thw: ``[I, 3]`` each item's ``(t, h, w)``.
        order: :func:`raster_order`'s permutation, or None.
        kind: ``"image"`` (one grid each) or ``"video"`` (``t`` frames each).
        engine: names the engine in the error when the orders disagree.

    Returns:
        per item: features ``[N_i, u*C]`` (grouped states, raster order per frame), the
        tokens, grid ``(h/m, w/m)`` (one frame's, for a video) and its layout.

    Raises:
        RuntimeError: the merger's output in raster order is not the engine's tokens (a
            tower that changed its order would show here).
    """
    unit = merge * merge
    features = states.reshape(-1, unit * states.shape[-1])  # window j's u states, in order
    if order is not None:
        order = order.to(features.device)
        features, merged = features[order], merged[order]
    placed = torch.cat(tokens)[:, : merged.shape[-1]]
    # NaN equals NaN here: non-finite features are the pipeline's to report.
    if merged.shape != placed.shape or not torch.allclose(
        merged, placed, rtol=0, atol=0, equal_nan=True
    ):
        raise RuntimeError(
            f"{engine}: the merger's output in raster order differs from the tokens it places"
        )
    counts = [t.shape[0] for t in tokens]
    grids = [(int(h) // merge, int(w) // merge) for _, h, w in grid_thw.tolist()]
    if kind == "image":
        layouts = [ImageLayout.single(p, g) for p, g in zip(tokens, grids, strict=True)]
    else:
        frames = [int(t) for t in grid_thw[:, 0].tolist()]
        layouts = [
            ImageLayout.frames(p, g, t) for p, g, t in zip(tokens, grids, frames, strict=True)
        ]
    return EncodedImages(
        features=list(features.split(counts)),
        projected=[t[:, : merged.shape[-1]] for t in tokens],
        grids=grids,
        cls_attention=None,
        keys=None,
        encoder_output=encoder_output,
        layouts=layouts,
    )
