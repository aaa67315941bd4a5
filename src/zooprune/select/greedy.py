"""Max-min (farthest-point) greedy selection on projected tokens, optionally weighted.

Both ZOO-Prune and DivPrune grow a kept set P one token at a time. The diversity of a
candidate i is Div(i, P) = min_{p in P} (1 - cos(Z_i, Z_p)). Instead of re-evaluating
that minimum over a growing P at each step, we keep a running min-distance vector and
update it with the distances to the newest pick only: O(k * N * d) in total.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

from zooprune.select.ops import at_least_float32, gather_rows

Fusion = Literal["product", "sum"]
FirstPick = Literal["max_weight", "farthest_neighbour"]

#: Distances below this count as 0: an exact duplicate's 1 - cos is rounding noise
#: (~1e-7 in float32), which the additive fusion would otherwise rescale into a ranking.
DUPLICATE_DISTANCE = 1e-6


def _distance(cos: Tensor) -> Tensor:
    dist = 1.0 - cos
    return dist.masked_fill(dist < DUPLICATE_DISTANCE, 0.0)


def cosine_distance_to(unit: Tensor, index: Tensor) -> Tensor:
    """1 - cos between every token and one token per image.

    Args:
        unit: ``[B, N, d]`` rows of unit L2 norm.
        index: ``[B]`` the token of each image to measure from.

    Returns:
        ``[B, N]`` distances in [0, 2]; below ``DUPLICATE_DISTANCE`` they are 0.
    """
    anchor = gather_rows(unit, index.view(-1, 1))  # [B, 1, d]
    return _distance((unit * anchor).sum(dim=-1))


def unit_rows(features: Tensor) -> Tensor:
    """Rows scaled to unit L2 norm, in float32 at least. ``[B, N, d] -> [B, N, d]``."""
    x = at_least_float32(features)
    return x / x.norm(dim=-1, keepdim=True).clamp_min(1e-12)


def maxmin_select(
    features: Tensor,
    k: int,
    *,
    weights: Tensor | None = None,
    mask: Tensor | None = None,
    fusion: Fusion = "product",
    first: FirstPick = "max_weight",
) -> Tensor:
    """Greedy max-min selection of ``k`` tokens per image, in pick order.

    Each step picks argmax over unpicked real tokens of the fused score:
    ``product``: w(i) * Div(i, P) (ZOO-Prune); ``sum``: w(i) + Div(i, P) / max_j Div(j, P)
    (the additive ablation; both terms in [0, 1]). With ``weights=None`` the score is
    Div(i, P) alone (DivPrune). Ties go to the lowest index.

    Args:
        features: projected tokens Z, ``[B, N, d]``.
        k: tokens to pick per image, ``1 <= k <= N``. Images with fewer real tokens than
            k get -1 in the surplus slots.
        weights: optional ``[B, N]`` per-token weights in [0, 1] (normalised sensitivity).
        mask: optional ``[B, N]`` bool, True for real tokens.
        fusion: how weights and diversity combine.
        first: ``max_weight`` starts at argmax w (needs weights); ``farthest_neighbour``
            starts at the token whose nearest neighbour is farthest (DivPrune's rule;
            builds the full N x N distance matrix once).

    Returns:
        ``[B, k]`` int64 token indices in the order they were picked.
    """
    batch, n, _ = features.shape
    if not 1 <= k <= n:
        raise ValueError(f"k must be in [1, {n}], got {k}")
    if fusion not in ("product", "sum"):
        raise ValueError(f"unknown fusion {fusion!r}")
    device = features.device
    unit = unit_rows(features)
    if mask is None:
        mask = torch.ones(batch, n, dtype=torch.bool, device=device)
    neg_inf = torch.tensor(float("-inf"), dtype=unit.dtype, device=device)
    w = weights.to(unit.dtype) if weights is not None else None

    if first == "max_weight":
        if w is None:
            raise ValueError("first='max_weight' needs weights")
        pick = torch.where(mask, w, neg_inf).argmax(dim=-1)
    elif first == "farthest_neighbour":
        distances = _distance(unit @ unit.transpose(1, 2))  # [B, N, N]
        blocked = torch.eye(n, dtype=torch.bool, device=device) | ~mask[:, None, :]
        nearest = distances.masked_fill(blocked, float("inf")).amin(dim=-1)
        # A lone real token has no neighbour; it is then the only candidate anyway.
        nearest = torch.where(torch.isinf(nearest), torch.zeros_like(nearest), nearest)
        pick = torch.where(mask, nearest, neg_inf).argmax(dim=-1)
    else:
        raise ValueError(f"unknown first-pick rule {first!r}")

    available = mask.clone()
    picks = torch.full((batch, k), -1, dtype=torch.long, device=device)
    min_dist = torch.full((batch, n), float("inf"), dtype=unit.dtype, device=device)
    rows = torch.arange(batch, device=device)
    for step in range(k):
        if step > 0:
            div = min_dist
            if w is None:
                score = div
            elif fusion == "product":
                score = w * div
            else:
                top = torch.where(available, div, neg_inf).amax(dim=-1, keepdim=True)
                score = w + torch.where(top > 0, div / top, torch.zeros_like(div))
            pick = torch.where(available, score, neg_inf).argmax(dim=-1)
        valid = available[rows, pick]  # False once an image has run out of real tokens
        picks[:, step] = torch.where(valid, pick, torch.full_like(pick, -1))
        available[rows, pick] = False
        min_dist = torch.minimum(min_dist, cosine_distance_to(unit, pick))
    return picks
