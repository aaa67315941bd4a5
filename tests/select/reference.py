"""Plain, obviously-correct references for the selection kernels (slow on purpose)."""

from __future__ import annotations

import torch
from torch import Tensor

from zooprune.select.greedy import DUPLICATE_DISTANCE, FirstPick, Fusion


def naive_maxmin_select(
    features: Tensor,
    k: int,
    *,
    weights: Tensor | None = None,
    first: FirstPick = "max_weight",
    fusion: Fusion = "product",
) -> list[int]:
    """Reference for one image: recompute every candidate's diversity from scratch.

    Deliberately plain (O(k^2 * N) distance evaluations, Python loops) so that it is
    obviously correct; tests and the kernel benchmark compare against it.

    Args:
        features: ``[N, d]``.
        weights: optional ``[N]``.

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
        return 0.0 if d < DUPLICATE_DISTANCE else d

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
        picked.append(max(rest, key=lambda i: (score[i], -i)))
    return picked
