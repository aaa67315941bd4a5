"""VisPruner: the tower's important tokens, then diverse ones from the rest.

Zhang et al., "Beyond Text-Visual Attention: Exploiting Visual Cues for Effective Token
Pruning in VLMs" (ICCV 2025, arXiv 2412.01818). Of an image's K kept tokens:

- **important**: the ``int(K * important_ratio)`` tokens the vision tower's CLS token
  attends to most (in the layer the features come from);
- **diverse**: the other ``K - K_imp`` come from the remaining tokens, in descending
  attention order, by removing near-duplicates in rounds: the list is split into its
  even and odd positions (A, B); each token of A scores its largest cosine similarity to
  a token of B (on the projector's inputs); the ``min(ROUND, |list| - K_div, |A|)``
  tokens of A that score highest leave; the list becomes the rest of A, highest score
  first, then B. Rounds go on until ``K_div`` tokens remain.

The rounds follow the authors' released code (the paper's text describes the removal of
similar tokens without this detail). Ties go to the lower index (attention) and to the
earlier list position (similarity).
"""

from __future__ import annotations

import torch
from torch import Tensor

from zooprune.select.greedy import unit_rows

#: tokens removed per round at most (the authors' code)
ROUND = 8


def vispruner_select(
    attention: Tensor, features: Tensor, k: int, important_ratio: float = 0.5
) -> Tensor:
    """``[B, k]`` kept token indices, ascending.

    Args:
        attention: ``[B, N]`` CLS attention to each token.
        features: ``[B, N, d]`` the tokens' features whose cosines find duplicates.
        k: tokens kept per image, ``1 <= k <= N``.
        important_ratio: the share of k kept by attention alone.
    """
    batch, n = attention.shape
    if not 1 <= k <= n:
        raise ValueError(f"k must be in [1, {n}], got {k}")
    important = int(k * important_ratio)
    order = torch.sort(attention.float(), dim=-1, descending=True, stable=True).indices
    kept, rest = order[:, :important], order[:, important:]
    diverse = k - important
    unit = unit_rows(features)
    rows = torch.arange(batch, device=attention.device)[:, None]
    while diverse > 0:
        size = rest.shape[1]
        a, b = rest[:, ::2], rest[:, 1::2]
        # at least 1 while more than K_div remain (then A is not empty, nor B)
        removed = min(ROUND, size - diverse, a.shape[1])
        if removed <= 0:
            break
        similarity = unit[rows, a] @ unit[rows, b].transpose(1, 2)  # [B, |A|, |B|]
        score = similarity.amax(dim=-1)
        by_score = torch.sort(score, dim=-1, descending=True, stable=True).indices
        survivors = torch.gather(a, 1, by_score[:, removed:])
        rest = torch.cat([survivors, b], dim=1)
    return torch.cat([kept, rest[:, :diverse]], dim=1).sort(dim=-1).values
