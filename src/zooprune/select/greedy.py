"""Max-min (farthest-point) greedy selection on projected tokens, optionally weighted.

Both ZOO-Prune and DivPrune grow a kept set P one token at a time. The diversity of a
candidate i is Div(i, P) = min_{p in P} (1 - cos(Z_i, Z_p)). Instead of re-evaluating
that minimum over a growing P at each step, we keep a running min-distance vector and
update it with the distances to the newest pick only: O(k * N) after the distances.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

from zooprune.select.ops import at_least_float32

Fusion = Literal["product", "sum"]
FirstPick = Literal["max_weight", "farthest_neighbour"]

#: Distances below this count as 0: an exact duplicate's 1 - cos is rounding noise
#: (~1e-7 in float32), which the additive fusion would otherwise rescale into a ranking.
DUPLICATE_DISTANCE = 1e-6


def _distance(cos: Tensor) -> Tensor:
    dist = 1.0 - cos
    return dist.masked_fill(dist < DUPLICATE_DISTANCE, 0.0)


def unit_rows(features: Tensor) -> Tensor:
    """Rows scaled to unit L2 norm, in float32 at least. ``[B, N, d] -> [B, N, d]``."""
    x = at_least_float32(features)
    return x / x.norm(dim=-1, keepdim=True).clamp_min(1e-12)


def pairwise_distances(features: Tensor) -> Tensor:
    """1 - cos between all tokens of each image, ``[B, N, d] -> [B, N, N]``, one GEMM."""
    unit = unit_rows(features)
    return _distance(unit @ unit.transpose(-1, -2))


def maxmin_select(
    features: Tensor,
    k: int,
    *,
    weights: Tensor | None = None,
    mask: Tensor | None = None,
    fusion: Fusion = "product",
    first: FirstPick = "max_weight",
    distances: Tensor | None = None,
) -> Tensor:
    """Greedy max-min selection of ``k`` tokens per image, in pick order.

    Each step picks argmax over unpicked real tokens of the fused score:
    ``product``: w(i) * Div(i, P) (ZOO-Prune); ``sum``: w(i) + Div(i, P) / max_j Div(j, P)
    (the additive ablation; both terms in [0, 1]). With ``weights=None`` the score is
    Div(i, P) alone (DivPrune). Ties go to the lowest index.

    All pairwise distances come from one batched matrix product (the efficient way to
    spend the O(N^2 d) work); each step then costs O(N): the running min-distance vector is
    updated with the newest pick's row only.

    Args:
        features: projected tokens Z, ``[B, N, d]``.
        k: tokens to pick per image, ``1 <= k <= N``. Images with fewer real tokens than
            k get -1 in the surplus slots.
        weights: optional ``[B, N]`` per-token weights in [0, 1] (normalised sensitivity).
        mask: optional ``[B, N]`` bool, True for real tokens.
        fusion: how weights and diversity combine.
        first: ``max_weight`` starts at argmax w (needs weights); ``farthest_neighbour``
            starts at the token whose nearest neighbour is farthest (DivPrune's rule).
        distances: optional precomputed ``[B, N, N]`` from :func:`pairwise_distances`.

    Returns:
        ``[B, k]`` int64 token indices in the order they were picked.
    """
    batch, n, _ = features.shape
    if not 1 <= k <= n:
        raise ValueError(f"k must be in [1, {n}], got {k}")
    if fusion not in ("product", "sum"):
        raise ValueError(f"unknown fusion {fusion!r}")
    if first == "max_weight" and weights is None:
        raise ValueError("first='max_weight' needs weights")
    device = features.device
    if mask is None:
        mask = torch.ones(batch, n, dtype=torch.bool, device=device)
    if distances is None:
        distances = pairwise_distances(features)
    rows = distances.reshape(batch * n, n)
    offsets = torch.arange(batch, device=device) * n
    # 0 for candidates, -inf once picked (or padding): added to every score.
    dtype = distances.dtype
    penalty = torch.zeros(batch, n, dtype=dtype, device=device).masked_fill(~mask, -torch.inf)
    w = weights.to(dtype) if weights is not None else None

    if first == "max_weight":
        pick = (w + penalty).argmax(dim=-1)
    elif first == "farthest_neighbour":
        blocked = torch.eye(n, dtype=torch.bool, device=device) | ~mask[:, None, :]
        nearest = distances.masked_fill(blocked, torch.inf).amin(dim=-1)
        # A lone real token has no neighbour; it is then the only candidate anyway.
        nearest = nearest.masked_fill(torch.isinf(nearest), 0.0)
        pick = (nearest + penalty).argmax(dim=-1)
    else:
        raise ValueError(f"unknown first-pick rule {first!r}")

    picks = [pick]
    min_dist = torch.full((batch, n), torch.inf, dtype=dtype, device=device)
    score = torch.empty_like(min_dist)
    for _ in range(1, k):
        flat = pick + offsets
        penalty.view(-1).index_fill_(0, flat, -torch.inf)
        torch.minimum(min_dist, rows.index_select(0, flat), out=min_dist)
        if w is None:
            torch.add(min_dist, penalty, out=score)
        elif fusion == "product":
            torch.addcmul(penalty, w, min_dist, out=score)
        else:
            top = (min_dist + penalty).amax(dim=-1, keepdim=True)
            spread = torch.where(top > 0, min_dist / top, torch.zeros_like(min_dist))
            torch.add(w + spread, penalty, out=score)
        pick = score.argmax(dim=-1)
        picks.append(pick)
    result = torch.stack(picks, dim=1)
    # While real tokens remain, a pick is always one of them; past that, slots are empty.
    surplus = torch.arange(k, device=device)[None, :] >= mask.sum(dim=-1, keepdim=True)
    return result.masked_fill(surplus, -1)
