"""Max-min (farthest-point) greedy selection on projected tokens, optionally weighted.

Both ZOO-Prune and DivPrune grow a kept set P one token at a time. The diversity of a
candidate i is Div(i, P) = min_{p in P} (1 - cos(Z_i, Z_p)). Instead of re-evaluating
that minimum over a growing P at each step, we keep a running min-distance vector and
update it with the distances to the newest pick only: O(k * N) after the distances.

The distances come one of two ways (``distances=``): all N x N at once from a blocked,
exactly symmetric matrix product (``"matrix"``: what DivPrune's first pick needs), or
only the k rows of the picks, one per step (``"rows"``: O(k N d) work and no N x N
memory, for when k is small against N or N x N would not fit). The loop itself runs in
NumPy whatever the device: it is a chain of tiny vector operations, where PyTorch's
per-operation dispatch costs more than the arithmetic.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import torch
from torch import Tensor

from zooprune.select.ops import at_least_float32

Fusion = Literal["product", "sum"]
FirstPick = Literal["max_weight", "farthest_neighbour"]
DistanceMode = Literal["auto", "matrix", "rows"]

#: Distances below this count as 0: an exact duplicate's 1 - cos is rounding noise
#: (~1e-7 in float32), which the additive fusion would otherwise rescale into a ranking.
DUPLICATE_DISTANCE = 1e-6
#: ``"auto"`` takes rows on a CPU when k * ROWS_BELOW <= N: one matrix-vector product per
#: step reads all N x d tokens, about 10 times slower per row than a row of the blocked
#: product (``zooprune speed-kernels --greedy-only --budgets 16,32,48,64`` measures both)
ROWS_BELOW = 12
#: ``"auto"`` takes rows wherever the N x N matrices of a batch would exceed this
MATRIX_BYTES = 2**30
#: rows per block of the symmetric product: big enough to run at full matrix speed
_BLOCK = 192


def _distance(cos: Tensor) -> Tensor:
    dist = 1.0 - cos
    return dist.masked_fill(dist < DUPLICATE_DISTANCE, 0.0)


def unit_rows(features: Tensor) -> Tensor:
    """Rows scaled to unit L2 norm, in float32 at least. ``[B, N, d] -> [B, N, d]``."""
    x = at_least_float32(features)
    return x / x.norm(dim=-1, keepdim=True).clamp_min(1e-12)


def pairwise_distances(features: Tensor) -> Tensor:
    """1 - cos between all tokens of each image, ``[B, N, d] -> [B, N, N]``.

    Exactly symmetric: each block above the diagonal is computed once and mirrored (a
    third less work than the full product at N = 576), so d(i, j) and d(j, i) are the
    same number and a tie between them stays a tie.
    """
    unit = unit_rows(features)
    batch, n, _ = unit.shape
    cos = unit.new_empty(batch, n, n)
    for start in range(0, n, _BLOCK):
        stop = min(start + _BLOCK, n)
        rows = unit[:, start:stop] @ unit[:, start:].mT  # [B, r, n - start]
        square = rows[:, :, : stop - start]
        rows[:, :, : stop - start] = square.triu() + square.triu(1).mT
        cos[:, start:stop, start:] = rows
        cos[:, stop:, start:stop] = rows[:, :, stop - start :].mT
    return _distance(cos)


def maxmin_select(
    features: Tensor,
    k: int,
    *,
    weights: Tensor | None = None,
    mask: Tensor | None = None,
    fusion: Fusion = "product",
    first: FirstPick = "max_weight",
    distances: Tensor | DistanceMode = "auto",
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
            starts at the token whose nearest neighbour is farthest (DivPrune's rule,
            which needs every distance).
        distances: ``"matrix"``, ``"rows"`` (see the module), ``"auto"`` (rows where
            they pay: see :data:`ROWS_BELOW`, :data:`MATRIX_BYTES`), or a precomputed
            ``[B, N, N]`` from :func:`pairwise_distances`.

    Returns:
        ``[B, k]`` int64 token indices in the order they were picked.
    """
    batch, n, _ = features.shape
    if not 1 <= k <= n:
        raise ValueError(f"k must be in [1, {n}], got {k}")
    if fusion not in ("product", "sum"):
        raise ValueError(f"unknown fusion {fusion!r}")
    if first not in ("max_weight", "farthest_neighbour"):
        raise ValueError(f"unknown first-pick rule {first!r}")
    if first == "max_weight" and weights is None:
        raise ValueError("first='max_weight' needs weights")
    device = features.device
    if mask is None:
        mask = torch.ones(batch, n, dtype=torch.bool, device=device)
    if isinstance(distances, str):
        chosen = distance_mode(distances, batch, n, k, first, device)
        distances = pairwise_distances(features) if chosen == "matrix" else None
    real = mask.cpu().numpy()
    # 0 for candidates, -inf once picked (or padding): added to every score.
    penalty = np.where(real, 0.0, -np.inf)
    w = None if weights is None else at_least_float32(weights.detach()).cpu().numpy()
    images = np.arange(batch)

    if isinstance(distances, Tensor):  # every distance at hand
        matrix = distances.detach().cpu().numpy()
        penalty = penalty.astype(matrix.dtype)

        def row_of(pick: np.ndarray) -> np.ndarray:
            return matrix[images, pick]

    else:  # one row per pick, computed when it is picked
        unit = unit_rows(features.detach())
        penalty = penalty.astype(np.float64 if unit.dtype == torch.float64 else np.float32)
        at = torch.arange(batch, device=device)

        def row_of(pick: np.ndarray) -> np.ndarray:
            chosen = unit[at, torch.from_numpy(pick).to(device)]  # [B, d]
            return _distance(torch.bmm(unit, chosen[..., None])[..., 0]).cpu().numpy()

    if w is not None:
        w = w.astype(penalty.dtype)
    if first == "max_weight":
        pick = (w + penalty).argmax(axis=-1)
    else:
        blocked = np.eye(n, dtype=bool) | ~real[:, None, :]
        nearest = np.where(blocked, np.inf, matrix).min(axis=-1)
        # A lone real token has no neighbour; it is then the only candidate anyway.
        nearest[np.isinf(nearest)] = 0.0
        pick = (nearest + penalty).argmax(axis=-1)

    picks = [pick]
    min_dist = np.full((batch, n), np.inf, dtype=penalty.dtype)
    score = np.empty_like(min_dist)
    for _ in range(1, k):
        penalty[images, pick] = -np.inf
        np.minimum(min_dist, row_of(pick), out=min_dist)
        if w is None:
            np.add(min_dist, penalty, out=score)
        elif fusion == "product":
            np.multiply(w, min_dist, out=score)
            score += penalty
        else:
            top = (min_dist + penalty).max(axis=-1, keepdims=True)
            with np.errstate(divide="ignore", invalid="ignore"):
                spread = np.where(top > 0, min_dist / top, 0.0)
            np.add(w, spread, out=score)
            score += penalty
        pick = score.argmax(axis=-1)
        picks.append(pick)
    result = torch.from_numpy(np.stack(picks, axis=1)).to(device)
    # While real tokens remain, a pick is always one of them; past that, slots are empty.
    surplus = torch.arange(k, device=device)[None, :] >= mask.sum(dim=-1, keepdim=True)
    return result.masked_fill(surplus, -1)


def distance_mode(
    mode: str, batch: int, n: int, k: int, first: FirstPick, device: torch.device | str
) -> str:
    """``"matrix"`` or ``"rows"``: what ``mode`` (``"auto"`` decides) means for this call."""
    if mode not in ("auto", "matrix", "rows"):
        raise ValueError(f"unknown distances mode {mode!r}")
    if mode == "rows" and first == "farthest_neighbour":
        raise ValueError("first='farthest_neighbour' needs every distance: use 'matrix'")
    if mode != "auto":
        return mode
    large = batch * n * n * 4 > MATRIX_BYTES
    few = torch.device(device).type == "cpu" and k * ROWS_BELOW <= n
    return "rows" if first == "max_weight" and (large or few) else "matrix"
