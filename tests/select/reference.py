"""Plain, obviously-correct references for the selection kernels (slow on purpose)."""

from __future__ import annotations

import torch
from torch import Tensor

from zooprune.select.greedy import FirstPick, Fusion

#: The documented rule (README, "Definitions"): distances below 1e-6 count as exact
#: duplicates, distance 0. Written here, not imported, so that a change to the kernel's
#: threshold (or a path that skips it) shows up as a disagreement with this reference.
TIE_DISTANCE = 1e-6


def naive_maxmin_select(
    features: Tensor,
    k: int,
    *,
    weights: Tensor | None = None,
    first: FirstPick = "max_weight",
    fusion: Fusion = "product",
    margins: list[float] | None = None,
) -> list[int]:
    """Reference for one image: recompute every candidate's diversity from scratch.

    Deliberately plain (O(k^2 * N) distance evaluations, Python loops) so that it is
    obviously correct; tests and the kernel benchmark compare against it.

    Args:
        features: ``[N, d]``.
        weights: optional ``[N]``.
        margins: if given, receives for every pick after the first how far its score lies
            above the best other candidate's (0 on an exact tie, inf when it is alone).

    Returns:
        the k picked indices in pick order.
    """
    z = features.to(torch.float64)
    z = z / z.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    n = z.shape[0]

    def dist(a: int, b: int) -> float:
        # One order for both (a, b) and (b, a): a dot product's rounding can depend on
        # operand order, and a mutual nearest pair must tie exactly.
        a, b = min(a, b), max(a, b)
        d = 1.0 - float(z[a] @ z[b])
        return 0.0 if d < TIE_DISTANCE else d

    w = None if weights is None else [float(v) for v in weights]
    if first == "max_weight":
        assert w is not None
        picked = [max(range(n), key=lambda i: (w[i], -i))]
    else:

        def nearest(i: int) -> float:
            others = [dist(i, j) for j in range(n) if j != i]
            return min(others) if others else 0.0

        picked = [max(range(n), key=lambda i: (nearest(i), -i))]
    while len(picked) < k:
        rest = [i for i in range(n) if i not in picked]
        div = {i: min(dist(i, p) for p in picked) for i in rest}
        if w is None:
            score = div
        elif fusion == "product":
            score = {i: w[i] * div[i] for i in rest}
        else:
            top = max(div.values())
            score = {i: w[i] + (div[i] / top if top > 0 else 0.0) for i in rest}
        best = max(rest, key=lambda i: (score[i], -i))
        if margins is not None:
            others = [score[i] for i in rest if i != best]
            margins.append(score[best] - max(others) if others else float("inf"))
        picked.append(best)
    return picked
