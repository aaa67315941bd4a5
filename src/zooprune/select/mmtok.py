"""MMTok: the visual tokens that best cover both the instruction and the image.

Dong et al., "MMTok: Multimodal Coverage Maximization for Efficient Inference of VLMs"
(arXiv 2508.18264). Of an image's N tokens, the kept set S maximises the coverage

    F(S) = sum_i max_{j in S} P_ij  +  alpha * sum_l max_{j in S} Q_lj

- ``P_ij = softmax_j(cos(t_i, z_j) / tau_t) / m``: how well visual token j (projected,
  ``z_j``) covers instruction token i (of m, its input embedding ``t_i``);
- ``Q_lj = softmax_j(cos(v_l, v_j) / tau_v) / N``: how well token j covers token l, on the
  projector's inputs ``v``;

each softmax over the N visual tokens. F is a facility-location function (monotone,
submodular), and S is its greedy: K times the token of largest gain
``sum_r max(C_rj - b_r, 0)`` over the rows r of ``C = [P; alpha Q]``, with ``b_r`` the best
cover row r has so far; ties go to the lowest index. Defaults are the authors' code's for
LLaVA (``alpha = 0.5``, ``tau_t = 0.02``, ``tau_v = 0.2``).
"""

from __future__ import annotations

import torch
from torch import Tensor

from zooprune.select.greedy import unit_rows


def coverage_matrix(
    projected: Tensor,
    features: Tensor,
    instruction: Tensor,
    mask: Tensor,
    *,
    alpha: float,
    text_temperature: float,
    vision_temperature: float,
) -> Tensor:
    """``[B, T + N, N]`` the rows to cover: each instruction token's (zero rows for
    padding), then ``alpha`` times each visual token's."""
    z, v = unit_rows(projected), unit_rows(features)
    text = unit_rows(instruction.to(z.dtype))
    weight = mask.to(z.dtype)
    count = weight.sum(dim=-1, keepdim=True).clamp_min(1)  # [B, 1]
    text_cover = (text @ z.transpose(1, 2) / text_temperature).softmax(dim=-1)
    text_cover = text_cover * (weight / count)[:, :, None]
    n = projected.shape[1]
    image_cover = (v @ v.transpose(1, 2) / vision_temperature).softmax(dim=-1) / n
    return torch.cat([text_cover, alpha * image_cover], dim=1)


def greedy_coverage(cover: Tensor, k: int) -> Tensor:
    """``[B, k]`` the greedy's picks, in pick order, of ``cover`` ``[B, R, N]``."""
    batch, _, n = cover.shape
    if not 1 <= k <= n:
        raise ValueError(f"k must be in [1, {n}], got {k}")
    best = torch.zeros(cover.shape[:2], dtype=cover.dtype, device=cover.device)
    taken = torch.zeros(batch, n, dtype=torch.bool, device=cover.device)
    rows = torch.arange(batch, device=cover.device)
    picks = []
    for _ in range(k):
        gain = (cover - best[:, :, None]).clamp_min(0).sum(dim=1)
        gain = gain.masked_fill(taken, float("-inf"))
        pick = gain.argmax(dim=-1)  # the first of equal maxima: the lowest index
        picks.append(pick)
        taken[rows, pick] = True
        best = torch.maximum(best, cover[rows, :, pick])
    return torch.stack(picks, dim=1)
