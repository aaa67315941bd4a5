"""DART: keep the tokens that duplicate a few pivot tokens least.

Wen et al., "Stop Looking for Important Tokens in Multimodal Language Models: Duplication
Matters More" (EMNLP 2025). A handful of pivot tokens is chosen by norm; each pivot in
turn then claims its share of the remaining budget among the tokens least similar to it
(cosine similarity: least duplicated), and a claimed token is no longer available to
the next pivot. The kept set is the pivots and what they claimed.

The authors run it inside the language model (after layer 1: pivots by the L1 norm of
that layer's keys, 4 image pivots and 4 text pivots, similarity of the layer's normalised
hidden states). Here it runs before the language model, on the projected tokens: the
pivots are the tokens of largest norm, all of them visual, and the duplication is the
cosine similarity of the projected tokens.
"""

from __future__ import annotations

import torch
from torch import Tensor

from zooprune.select.greedy import unit_rows
from zooprune.select.ops import at_least_float32

PIVOT_NORMS = ("l2", "l1")


def pivot_shares(k: int, pivots: int) -> list[int]:
    """Tokens each pivot claims beside itself: ``k - pivots`` shared as evenly as possible,
    the first pivots (largest norm) taking the remainder, one each."""
    rest = k - pivots
    return [rest // pivots + (1 if p < rest % pivots else 0) for p in range(pivots)]


def similarity(unit: Tensor, pivot: Tensor) -> Tensor:
    """Cosine similarity of unit rows ``[B, N, d]`` to one unit pivot per image ``[B, d]``.

    An elementwise product summed over d, not a matrix product: BLAS may compute two rows
    of a product by different kernels (edge tiles), so that two identical tokens get
    similarities a rounding apart and the lower index no longer wins their tie. The sum
    reduces every row in the same order, so identical tokens get identical similarities.
    """
    return (unit * pivot[:, None, :]).sum(dim=-1)


def dart_select(tokens: Tensor, k: int, *, pivots: int = 8, norm: str = "l2") -> Tensor:
    """DART's kept tokens: ``[B, N, d] -> [B, k]`` picks, pivots first (by norm), then
    each pivot's claims in its order.

    ``min(pivots, k)`` pivots: the tokens of largest L2 (or L1) norm. Pivot p, in order of
    descending norm, then claims :func:`pivot_shares`'s p-th share: the available tokens
    of lowest cosine similarity to it. Ties (equal norms, equal similarities) go to the
    lowest index.
    """
    x = at_least_float32(tokens)
    batch, n, _ = x.shape
    count = min(pivots, k)
    size = x.abs().sum(dim=-1) if norm == "l1" else x.norm(dim=-1)
    # Stable sort: among equal norms the lower index comes first.
    pivot_index = torch.sort(size, dim=-1, descending=True, stable=True).indices[:, :count]
    unit = unit_rows(x)
    rows = torch.arange(batch, device=x.device)[:, None]
    taken = torch.zeros(batch, n, dtype=torch.bool, device=x.device)
    taken[rows, pivot_index] = True
    picks = [pivot_index]
    for p, share in enumerate(pivot_shares(k, count)):
        if share == 0:
            continue
        duplication = similarity(unit, unit[rows[:, 0], pivot_index[:, p]]).masked_fill(
            taken, torch.inf
        )
        claimed = torch.sort(duplication, dim=-1, stable=True).indices[:, :share]
        taken[rows, claimed] = True
        picks.append(claimed)
    return torch.cat(picks, dim=-1)
