"""Max-min (farthest-point) greedy selection on projected tokens, optionally weighted.

Both ZOO-Prune and DivPrune grow a kept set P one token at a time. The diversity of a
candidate i is Div(i, P) = min_{p in P} (1 - cos(Z_i, Z_p)). Instead of re-evaluating
that minimum over a growing P at each step, we keep a running min-distance vector and
update it with the distances to the newest pick only: O(k * N) after the distances.

The distances come one of two ways (``distances=``): all N x N at once from a blocked,
exactly symmetric matrix product (``"matrix"``: what DivPrune's first pick needs), or
the rows of the picks only (``"rows"``: for when k is small against N or N x N would not
fit), a missing row computed together with those of the likeliest next picks, so that
a few products of many rows replace k matrix-vector products. The loop itself runs in
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
#: ``"auto"`` takes rows on a CPU when k * ROWS_BELOW <= N: below where they stop paying on
#: Gaussian tokens (``zooprune speed-kernels --greedy-only``), as tokens in clusters, as an
#: image's are, need more blocks of rows
ROWS_BELOW = 4
#: ``"auto"`` takes rows wherever the N x N matrices of a batch would exceed this
MATRIX_BYTES = 2**30
#: rows per block of the symmetric product: big enough to run at full matrix speed
_BLOCK = 192
#: rows mode: a missing row comes with those of up to this many likeliest next picks, in
#: one product (bigger blocks read each image's tokens fewer times; 8, 16, 32 and 64 were
#: timed, 32 and 64 alike)
ROW_BLOCK = 32


def _distance(cos: Tensor) -> Tensor:
    dist = 1.0 - cos
    return dist.masked_fill(dist < DUPLICATE_DISTANCE, 0.0)


def _distance_rows(cos: np.ndarray) -> np.ndarray:
    """:func:`_distance` of some rows of cosines, in NumPy (the same float operations, so
    the same numbers)."""
    dist = 1.0 - cos
    dist[dist < DUPLICATE_DISTANCE] = 0.0
    return dist


def unit_rows(features: Tensor) -> Tensor:
    """Rows scaled to unit L2 norm, in float32 at least. ``[B, N, d] -> [B, N, d]``."""
    x = at_least_float32(features)
    norms = x.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    # A half-precision input was copied to float32 above: that copy is scaled in place.
    return x / norms if x is features else x.div_(norms)


def pairwise_cosines(features: Tensor) -> Tensor:
    """cos between all tokens of each image, ``[B, N, d] -> [B, N, N]``.

    Exactly symmetric: each block above the diagonal is computed once and mirrored (a
    third less work than the full product at N = 576), so cos(i, j) and cos(j, i) are the
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
    return cos


def pairwise_distances(features: Tensor) -> Tensor:
    """1 - cos between all tokens of each image (:func:`pairwise_cosines`), exactly
    symmetric, ``[B, N, d] -> [B, N, N]``."""
    return _distance(pairwise_cosines(features))


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
    # Matrix mode keeps cosines and turns only the picks' rows into distances (the same
    # numbers as pairwise_distances, without two passes over all N x N of them).
    cosines = None
    if isinstance(distances, str):
        chosen = distance_mode(distances, batch, n, k, first, device)
        distances = cosines = pairwise_cosines(features) if chosen == "matrix" else None
    real = mask.cpu().numpy()
    # 0 for candidates, -inf once picked (or padding): added to every score.
    penalty = np.where(real, 0.0, -np.inf)
    w = None if weights is None else at_least_float32(weights.detach()).cpu().numpy()
    images = np.arange(batch)

    if isinstance(distances, Tensor):  # every distance (or cosine) at hand
        matrix = distances.detach().cpu().numpy()
        penalty = penalty.astype(matrix.dtype)

        def row_of(pick: np.ndarray, scores: np.ndarray) -> np.ndarray:
            row = matrix[images, pick]
            return row if cosines is None else _distance_rows(row)

    else:  # the picks' rows only, computed as they are picked (see _PickRows)
        unit = unit_rows(features.detach())
        penalty = penalty.astype(np.float64 if unit.dtype == torch.float64 else np.float32)
        if batch * n * n * 4 > MATRIX_BYTES:
            # Where the matrices would not fit: each pick's row alone, used once, not kept.
            at = torch.arange(batch, device=device)

            def row_of(pick: np.ndarray, scores: np.ndarray) -> np.ndarray:
                chosen = unit[at, torch.from_numpy(pick).to(device)]  # [B, d]
                return _distance(torch.bmm(unit, chosen[..., None])[..., 0]).cpu().numpy()

        else:
            row_of = _PickRows(unit, penalty.dtype)

    if w is not None:
        w = w.astype(penalty.dtype)
    if first == "max_weight":
        score = w + penalty
        pick = score.argmax(axis=-1)
    else:
        blocked = np.eye(n, dtype=bool) | ~real[:, None, :]
        if cosines is None:
            nearest = np.where(blocked, np.inf, matrix).min(axis=-1)
        else:  # the nearest is the most similar: 1 - cos and the cut-off are monotone
            nearest = _distance_rows(np.where(blocked, -np.inf, matrix).max(axis=-1))
        # A lone real token has no neighbour; it is then the only candidate anyway.
        nearest[np.isinf(nearest)] = 0.0
        score = nearest + penalty
        pick = score.argmax(axis=-1)

    picks = [pick]
    min_dist = np.full((batch, n), np.inf, dtype=penalty.dtype)
    for _ in range(1, k):
        penalty[images, pick] = -np.inf
        np.minimum(min_dist, row_of(pick, score), out=min_dist)
        score = np.empty_like(min_dist)
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


class _PickRows:
    """The distance rows of the greedy's picks, computed when they are picked, image by
    image. A missing row comes with those of the :data:`ROW_BLOCK` likeliest next picks in
    one product: the unpicked tokens of highest score, which the next picks mostly are
    (a score only falls as picks are added). Each image's rows depend on that image alone,
    whatever else is in the batch."""

    def __init__(self, unit: Tensor, dtype: np.dtype) -> None:
        self.unit = unit
        batch, n, _ = unit.shape
        self.images = np.arange(batch)
        self.slot = np.full((batch, n), -1)  # where a token's row is kept, -1: not yet
        self.count = np.zeros(batch, dtype=np.int64)
        self.kept = np.empty((batch, min(n, 4 * ROW_BLOCK), n), dtype=dtype)

    def __call__(self, pick: np.ndarray, scores: np.ndarray) -> np.ndarray:
        """``[B, N]`` distance rows of ``pick`` (one token per image), which ``scores``
        (``[B, N]``, -inf where picked) chose."""
        for image in np.flatnonzero(self.slot[self.images, pick] < 0):
            self._compute(image, int(pick[image]), scores[image])
        return self.kept[self.images, self.slot[self.images, pick]]

    def _compute(self, image: int, pick: int, scores: np.ndarray) -> None:
        candidates = np.where(self.slot[image] < 0, scores, -np.inf)
        likeliest = np.argsort(-candidates, kind="stable")[:ROW_BLOCK]
        likeliest = likeliest[np.isfinite(candidates[likeliest])]
        tokens = np.unique(np.append(likeliest, pick))
        start = int(self.count[image])
        if start + tokens.size > self.kept.shape[1]:
            # Twice the store holds a block more (a store under a block's size holds all N).
            grown = 2 * self.kept.shape[1]
            kept = np.empty((self.kept.shape[0], grown, self.kept.shape[2]), self.kept.dtype)
            kept[:, : self.kept.shape[1]] = self.kept
            self.kept = kept
        unit = self.unit[image]
        cos = unit[torch.from_numpy(tokens).to(unit.device)] @ unit.T  # [t, N]
        self.kept[image, start : start + tokens.size] = _distance_rows(cos.cpu().numpy())
        self.slot[image, tokens] = np.arange(start, start + tokens.size)
        self.count[image] = start + tokens.size


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
