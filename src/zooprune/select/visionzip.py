"""VisionZip's token choice: dominant tokens by CLS attention plus merged contextual tokens."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from zooprune.select.ops import at_least_float32, gather_rows


def default_contextual(k: int) -> int:
    """The contextual share of a budget: VisionZip's 10 of 64 (~15.6%), rounded."""
    return round(k * 10 / 64)


def visionzip_select(
    cls_attention: Tensor,
    keys: Tensor,
    features: Tensor,
    project: Callable[[Tensor], Tensor],
    k: int,
    contextual: int,
    cls_features: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Keep the ``k - contextual`` tokens the CLS token attends to most, merge the rest.

    The tokens that are not dominant are split into ``contextual`` targets, taken at a
    uniform stride in raster order, and the others, each assigned to the target whose key
    is most cosine-similar. A contextual token is its target plus the mean of the tokens
    assigned to it (the target alone if none), as in VisionZip's released code. Merging
    happens on the projector inputs, which are then projected, as VisionZip merges vision
    features before the projector. Each merged token takes its target's place.

    Args:
        cls_attention: ``[B, N]`` attention from CLS to each token, summed over heads.
        keys: ``[B, N, d_k]`` the same layer's keys, averaged over heads.
        features: ``[B, N, d_v]`` projector inputs.
        project: the projector, ``[..., d_v] -> [..., d_l]``.
        k: tokens to keep per image, ``1 <= k <= N``.
        contextual: how many of the k are merged tokens, ``0 <= contextual < k``.
        cls_features: ``[B, d_v]`` the CLS token's projector input, to count the CLS token
            among the dominant ones as VisionZip's authors do: it then fills index 0's
            place (first in order), and token 0 is neither dominant nor a merge target
            (it may be merged into one); None (default) keeps k patch tokens.

    Returns:
        ``indices`` ``[B, k]`` ascending, and ``tokens`` ``[B, k, d_l]``, the projected
        token placed at each index.
    """
    batch, n, _ = features.shape
    if not 1 <= k <= n:
        raise ValueError(f"k must be in [1, {n}], got {k}")
    if not 0 <= contextual < k:
        raise ValueError(f"contextual must be in [0, {k - 1}], got {contextual}")
    dominant = k - contextual
    attention = cls_attention.float()
    if cls_features is not None:
        dominant -= 1  # the CLS token is one of the dominant tokens
        attention = attention.clone()
        attention[:, 0] = -torch.inf  # index 0's place holds the CLS token
    # Stable descending sort: ties go to the lower index.
    order = torch.sort(attention, dim=-1, descending=True, stable=True).indices
    dominant_idx = order[:, :dominant]
    rest = order[:, dominant:].sort(dim=-1).values  # [B, R] raster order
    merged_only = None
    if cls_features is not None:
        merged_only = rest[:, :1]  # token 0: merged into a target, never one itself
        rest = rest[:, 1:]
    r = rest.shape[1]
    x = at_least_float32(features)
    kept_x = gather_rows(x, dominant_idx)
    indices = dominant_idx
    if contextual > 0:
        stride = max(1, r // contextual)
        target_pos = torch.arange(0, r, stride, device=x.device)[:contextual]  # [C]
        is_target = torch.zeros(r, dtype=torch.bool, device=x.device)
        is_target[target_pos] = True
        target_idx = rest[:, target_pos]  # [B, C]
        other_idx = rest[:, ~is_target]  # [B, R - C]
        if merged_only is not None:
            other_idx = torch.cat([merged_only, other_idx], dim=1)
        unit = keys.float() / keys.float().norm(dim=-1, keepdim=True).clamp_min(1e-12)
        similarity = gather_rows(unit, other_idx) @ gather_rows(unit, target_idx).transpose(1, 2)
        assignment = similarity.argmax(dim=-1)  # [B, R-C] target of each merged token
        sums = torch.zeros(batch, contextual, x.shape[-1], dtype=x.dtype, device=x.device)
        sums.scatter_add_(
            1, assignment[..., None].expand(-1, -1, x.shape[-1]), gather_rows(x, other_idx)
        )
        counts = torch.zeros(batch, contextual, dtype=x.dtype, device=x.device)
        counts.scatter_add_(1, assignment, torch.ones_like(assignment, dtype=x.dtype))
        # As VisionZip's code does: the target plus the mean of what merged into it.
        merged = gather_rows(x, target_idx) + sums / counts.clamp_min(1)[..., None]
        kept_x = torch.cat([kept_x, merged], dim=1)
        indices = torch.cat([dominant_idx, target_idx], dim=1)
    if cls_features is not None:
        indices = torch.cat([torch.zeros_like(indices[:, :1]), indices], dim=1)
        kept_x = torch.cat([at_least_float32(cls_features)[:, None], kept_x], dim=1)
    order = indices.argsort(dim=-1)
    indices = indices.gather(1, order)
    kept_x = gather_rows(kept_x, order)
    return indices, project(kept_x)
