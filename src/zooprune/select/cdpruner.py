"""CDPruner: greedy MAP inference of a DPP whose kernel is conditioned on the instruction.

Zhang et al., "Beyond Attention or Similarity: Maximizing Conditional Diversity for Token
Pruning in MLLMs" (NeurIPS 2025). The kernel over an image's N visual tokens is

    L = diag(q) S diag(q),    S_ij = cos(Z_i, Z_j),    q_i = r_i  (or exp(alpha r_i))

with Z the projected tokens and r_i the token's relevance to the instruction, min-max
normalised per image. A DPP with kernel L favours subsets that are both relevant (large
q_i) and mutually different (det of the similarity block), and the kept set is its
greedy MAP: at each step the token that multiplies det(L_S) the most. That greedy runs in
O(K N) per step with the incremental Cholesky factor of Chen, Zhang and Zhou, "Fast
Greedy MAP Inference for Determinantal Point Process" (NeurIPS 2018): each candidate i
keeps its row c_i of the factor and its remaining gain d_i^2 = det(L_{S+i}) / det(L_S).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from zooprune.select.greedy import unit_rows
from zooprune.select.ops import at_least_float32

#: the authors' floor on a min-max normalised relevance, so that the least relevant token
#: keeps a non-zero kernel diagonal and can still be chosen (their ``+ 1e-6``)
RELEVANCE_FLOOR = 1e-6
#: the rounding scale of a candidate's remaining gain, as a fraction of its own diagonal
#: L_ii (float32 gains carry about 1e-7 L_ii). A gain below it counts as 0: the candidate
#: lies (up to rounding) in the span of the tokens already kept, where the authors' loop
#: would divide by the square root of rounding noise. A gain within it of the best ties
#: with the best (exact duplicates tie exactly only without rounding), and ties go to the
#: lowest index.
EXHAUSTED_GAIN = 1e-6


def instruction_relevance(tokens: Tensor, instruction: Tensor, mask: Tensor) -> Tensor:
    """Each visual token's relevance to the instruction, min-max normalised per image.

    ``r_i = mean_t cos(Z_i, T_t)`` over the instruction's tokens, then
    ``(r - min r + 1e-6) / (max r - min r)`` as in the authors' code (per image here, per
    call there). An image whose instruction is empty, or whose tokens are all equally
    relevant, has nothing to rank by: every token gets relevance 1, and the kernel is the
    plain similarity.

    Args:
        tokens: ``[B, N, d]`` the projected visual tokens.
        instruction: ``[B, T, d]`` the instruction's token embeddings, padded.
        mask: ``[B, T]`` True for the real instruction tokens.

    Returns:
        ``[B, N]`` relevance from ``f / spread`` (the least relevant token) to
        ``1 + f / spread`` (the most), ``f`` = :data:`RELEVANCE_FLOOR` and ``spread`` the
        image's range of raw relevance; all 1 where there is nothing to rank by (float32,
        or float64 for float64 tokens).
    """
    z = unit_rows(tokens)
    text = unit_rows(instruction.to(z.dtype))
    weight = mask.to(z.dtype)
    count = weight.sum(dim=-1, keepdim=True)  # [B, 1]
    cosine = z @ text.transpose(1, 2)  # [B, N, T]
    raw = (cosine * weight[:, None, :]).sum(dim=-1) / count.clamp_min(1)
    low = raw.amin(dim=-1, keepdim=True)
    spread = raw.amax(dim=-1, keepdim=True) - low
    flat = (spread <= 0) | (count == 0)
    normalised = (raw - low + RELEVANCE_FLOOR) / torch.where(flat, 1.0, spread)
    return torch.where(flat, torch.ones_like(raw), normalised)


def conditional_kernel(
    tokens: Tensor,
    relevance: Tensor,
    theta: float | None = None,
    distinct: Tensor | None = None,
) -> Tensor:
    """The conditional DPP kernel ``diag(q) S diag(q)``, ``[B, N, d] -> [B, N, N]``.

    ``theta=None`` takes ``q = r`` (the authors' released code); ``theta`` in (0, 1) takes
    ``q = exp(alpha r)`` with ``alpha = theta / (2 (1 - theta))``, the quality-diversity
    trade-off of Chen et al. that the authors' code offers, commented out (0.5 there).
    ``distinct`` ``[B, N]`` multiplies q (Cen-Prune's distinctiveness).
    """
    z = unit_rows(tokens)
    similarity = z @ z.transpose(1, 2)
    quality = relevance.to(z.dtype)
    if theta is not None:
        quality = torch.exp(theta / (2 * (1 - theta)) * quality)
    if distinct is not None:
        quality = quality * distinct.to(z.dtype)
    return quality[:, :, None] * similarity * quality[:, None, :]


def greedy_dpp_map(kernel: Tensor, k: int) -> Tensor:
    """Greedy MAP of a DPP: k picks per image, each maximising ``det(L_S)``'s growth.

    Chen et al.'s incremental Cholesky: with the picks' factor rows ``c`` (``L_S = C C^T``)
    the pick j has ``e_i = (L_ji - <c_j, c_i>) / d_j`` for every candidate, appended to
    ``c_i``, and ``d_i^2 -= e_i^2``. A gain below :data:`EXHAUSTED_GAIN` of the
    candidate's diagonal counts as 0 (it lies in the span of the picks), one within that of
    the best gain ties with it, and ties go to the lowest index; once every gain is 0, the
    rest is taken in ascending index order.

    Args:
        kernel: ``[B, N, N]`` positive semi-definite.

    Returns:
        ``[B, k]`` the picks in pick order.
    """
    kernel = at_least_float32(kernel)
    batch, n, _ = kernel.shape
    rows = torch.arange(batch, device=kernel.device)
    index = torch.arange(n, device=kernel.device)
    diagonal = kernel.diagonal(dim1=1, dim2=2)
    floor = EXHAUSTED_GAIN * diagonal
    gains = diagonal.clone()  # d_i^2
    taken = torch.zeros(batch, n, dtype=torch.bool, device=kernel.device)
    factor = kernel.new_zeros(k, batch, n)  # c_i, one row per pick
    picks = torch.empty(k, batch, dtype=torch.long, device=kernel.device)
    for step in range(k):
        open_gains = gains.masked_fill(taken, -math.inf)
        best = open_gains.amax(dim=-1, keepdim=True)
        tied = open_gains >= best - floor
        pick = torch.where(tied, index, n).amin(dim=-1)  # the lowest index of the tied
        picks[step] = pick
        taken[rows, pick] = True
        gain = gains[rows, pick]
        live = gain > 0
        # A pick with no gain left spans nothing new: its factor row stays 0.
        scale = torch.where(live, gain, 1.0).sqrt()
        known = torch.einsum("sb,sbn->bn", factor[:step, rows, pick], factor[:step])
        update = (kernel[rows, pick] - known) / scale[:, None]
        update = torch.where(live[:, None], update, 0.0)
        factor[step] = update
        gains = gains - update.square()
        gains = torch.where(gains <= floor, 0.0, gains)
    return picks.T
