"""Cen-Prune's correction for diversity-based selection (arXiv 2608.30263), ``center=True``.

Projected visual tokens share a large common component: their cosines are high and alike,
so distances built on them mostly measure that shared direction. The correction has two
parts, both without a hyperparameter, applied per unit the method sees (an image, or a
crop or frame where the budget is split):

- **centred similarity**: cosines between ``x_i - mu``, with ``mu`` the mean of the unit's
  tokens. Diversity (``1 - cos``) and CDPruner's similarity kernel use them;
- **distinctiveness**: ``g_i = -1/(N-1) sum_{j != i} cos(x_i, x_j)`` on the tokens as they
  are (uncentred), min-max normalised per unit: a token unlike the rest scores 1. It
  multiplies each method's own weight (ZOO-Prune's normalised sensitivity, CDPruner's
  relevance) or is DivPrune's weight.

The paper uses the projector's outputs for LLaVA-style models, as here for every family
(for Qwen2.5-VL it standardises the tower's features per dimension and centres those
instead; zooprune's methods see the merged tokens and apply the LLaVA form).
"""

from __future__ import annotations

from torch import Tensor

from zooprune.select.greedy import unit_rows
from zooprune.select.ops import at_least_float32
from zooprune.select.sensitivity import minmax_normalize


def centred(tokens: Tensor) -> Tensor:
    """``[B, N, d]`` each unit's tokens less their mean (float32 at least)."""
    x = at_least_float32(tokens)
    return x - x.mean(dim=1, keepdim=True)


def distinctiveness(tokens: Tensor) -> Tensor:
    """``[B, N]`` the negated mean cosine of each token to the unit's others, min-max
    normalised to [0, 1] per unit (all ones where every token is alike).

    ``sum_{j != i} cos(x_i, x_j) = u_i . sum_j u_j - u_i . u_i`` with ``u`` the unit rows:
    no N x N matrix.
    """
    u = unit_rows(tokens)
    others = (u * u.sum(dim=1, keepdim=True)).sum(dim=-1) - (u * u).sum(dim=-1)
    return minmax_normalize(-others / max(u.shape[1] - 1, 1))
