"""HoliTom's merging before the language model: a video's frames, then each frame's space.

Shao et al., "HoliTom: Holistic Token Merging for Fast Video Large Language Models"
(NeurIPS 2025, arXiv 2505.21334). A video of F frames of n tokens each (the tokens the
language model would see), K of them kept:

1. **Temporal segments.** A position is *static* over a run of consecutive frames when its
   token's cosine between every two neighbouring frames of the run exceeds ``tau``.
   Merging a static position of an L-frame segment into one token removes L - 1 tokens;
   the frames are cut into the consecutive segments that remove the most (exact, by
   dynamic programming over where segments end).
2. **Temporal merge.** A segment's static positions become one token each, the mean of
   its frames' tokens there, placed in the segment's first frame; the other (*dynamic*)
   positions keep a token in every frame.
3. **Spatial merge.** What remains is cut to K at one ratio, ``K / (tokens left)``,
   applied to every group: each frame's dynamic tokens keep those the tower's attention
   ranks highest (the attention each token receives, averaged over heads and queries);
   each segment's static tokens are clustered by DPC-kNN (density from the ``knn``
   nearest, distance to the nearest denser token; the highest density x distance are the
   centres), every other static token joins its nearest centre, and a centre with members
   becomes ``beta * centre + (1 - beta) * mean(members)``.

Where the text leaves a detail open, the authors' code decides: the distances are the
projected tokens' (Euclidean over sqrt(d)); density counts ``min(knn, centres)`` nearest,
the token itself included; ``beta`` weights the centre. Three choices are ours, so that
a video keeps exactly K: the groups' counts are the ratio's shares rounded by largest
remainder (the authors round each group up, so their count drifts from K); when K
exceeds the tokens the merge leaves, the static positions least similar over their
segment are kept per frame again until it no longer does (the authors then keep fewer
than K); ties in density go to the lower index (the authors add random noise). The
inner-LLM merge of the paper (inside the language model) is not part of this method.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor


def frame_similarity(tokens: Tensor) -> Tensor:
    """``[F - 1, n]`` cosine between each position's tokens in frames f and f + 1.

    Args:
        tokens: ``[F, n, d]``.
    """
    unit = torch.nn.functional.normalize(tokens.float(), dim=-1)
    return (unit[:-1] * unit[1:]).sum(dim=-1)


def static_segments(similarity: Tensor, tau: float) -> list[tuple[int, int]]:
    """The cut of F frames into consecutive segments ``(first, last)`` whose temporal
    merge removes the most tokens: a segment of L frames removes L - 1 at each position
    that stays above ``tau`` between every two of its neighbouring frames.

    Of equal cuts, the one whose last segment is shortest wins, recursively (a frame on
    its own before a longer segment), as the authors' loop does.

    Args:
        similarity: ``[F - 1, n]`` from :func:`frame_similarity`.
    """
    frames = similarity.shape[0] + 1
    above = similarity > tau
    # best[e]: the most removed over frames [0, e); start[e]: first frame of the segment
    # that ends at frame e - 1 in that cut.
    best, start = [0] * (frames + 1), [0] * (frames + 1)
    for end in range(1, frames + 1):
        best[end], start[end] = best[end - 1], end - 1
        still = torch.ones(similarity.shape[1], dtype=torch.bool, device=similarity.device)
        for first in range(end - 2, -1, -1):  # the segment [first, end - 1], shortest first
            still &= above[first]
            removed = best[first] + int(still.sum()) * (end - 1 - first)
            if removed > best[end]:
                best[end], start[end] = removed, first
    segments, end = [], frames
    while end > 0:
        segments.append((start[end], end - 1))
        end = start[end]
    return segments[::-1]


def dpc_knn_centres(points: Tensor, count: int, knn: int) -> tuple[Tensor, Tensor]:
    """The ``count`` DPC-kNN cluster centres of ``points`` ``[m, d]``, ascending, and the
    ``[m, m]`` distances (Euclidean over sqrt(d)).

    Density: ``exp(-mean of the squared distances to the min(knn, count) nearest)``
    (the point itself among them). A point's distance indicator is its distance to the
    nearest point of higher density (ties: the lower index counts as higher), or the
    largest distance of all for the densest. Centres: the highest density x indicator.
    """
    m, dim = points.shape
    points = points.float()
    distance = torch.cdist(points, points) / math.sqrt(dim)
    nearest = distance.topk(min(knn, count, m), dim=-1, largest=False).values
    density = (-(nearest**2).mean(dim=-1)).exp()
    index = torch.arange(m, device=points.device)
    denser = (density[None, :] > density[:, None]) | (
        (density[None, :] == density[:, None]) & (index[None, :] < index[:, None])
    )  # [i, j]: j is denser than i
    indicator = distance.masked_fill(~denser, float("inf")).min(dim=-1).values
    indicator = torch.where(torch.isinf(indicator), distance.max(), indicator)
    score = indicator * density
    # stable: of equal scores, the lower index
    order = torch.sort(score, descending=True, stable=True).indices
    return order[:count].sort().values, distance


def merge_into_centres(points: Tensor, centres: Tensor, distance: Tensor, beta: float) -> Tensor:
    """``[c, d]`` each centre merged with the points nearest to it: ``beta * centre +
    (1 - beta) * mean(members)``, or the centre alone when none joins it (a point's
    nearest centre: ties to the lower index)."""
    is_centre = torch.zeros(points.shape[0], dtype=torch.bool, device=points.device)
    is_centre[centres] = True
    others = (~is_centre).nonzero().flatten()
    joins = distance[others][:, centres].argmin(dim=-1)  # position among the centres
    merged = points[centres].clone()
    for c in range(centres.numel()):
        members = points[others[joins == c]]
        if members.shape[0]:
            merged[c] = beta * points[centres[c]] + (1 - beta) * members.mean(dim=0)
    return merged


def largest_remainder(total: int, sizes: list[int]) -> list[int]:
    """``total`` split over groups in proportion to ``sizes`` (``total <= sum(sizes)``),
    rounded so the parts sum to ``total``: each its floor, then one more to the largest
    fractions (ties: the earlier group)."""
    whole = sum(sizes)
    exact = [total * size / whole for size in sizes]
    parts = [math.floor(x) for x in exact]
    left = total - sum(parts)
    order = sorted(range(len(sizes)), key=lambda g: (-(exact[g] - parts[g]), g))
    for g in order[:left]:
        parts[g] += 1
    return parts


@dataclass(frozen=True)
class _Group:
    """Tokens the ratio is applied to: one frame's dynamic tokens, or a segment's static
    ones (``frame`` is then the segment's first)."""

    frame: int
    positions: Tensor  # [m] within the frame
    static: bool


def holitom_select(
    tokens: Tensor,
    attention: Tensor,
    k: int,
    *,
    tau: float = 0.8,
    beta: float = 0.6,
    knn: int = 7,
) -> tuple[Tensor, Tensor, list[tuple[int, int]]]:
    """One video's K kept tokens.

    Args:
        tokens: ``[F, n, d]`` the frames' projected tokens.
        attention: ``[F, n]`` the attention each token receives in the tower.
        k: tokens kept, ``1 <= k <= F * n``.

    Returns:
        ``[k]`` kept indices into the ``F * n`` tokens (frame-major), ascending; ``[k, d]``
        the token placed at each; the temporal segments.
    """
    frames, n, _ = tokens.shape
    similarity = frame_similarity(tokens)
    segments = static_segments(similarity, tau)
    # Per segment, each position's least similarity between neighbouring frames (-inf
    # for a lone frame: nothing to merge) and whether it is static.
    groups: list[_Group] = []
    lowest = []
    for first, last in segments:
        if first == last:
            lowest.append(torch.full((n,), -math.inf, device=tokens.device))
        else:
            lowest.append(similarity[first:last].min(dim=0).values)
    static = [low > tau for low in lowest]
    left = frames * n - sum(
        int(s.sum()) * (last - first) for s, (first, last) in zip(static, segments, strict=True)
    )
    if left < k:  # the merge leaves too few: keep the least static positions per frame
        candidates = sorted(
            (float(lowest[s][p]), s, p)
            for s in range(len(segments))
            for p in static[s].nonzero().flatten().tolist()
        )
        for _, s, p in candidates:
            if left >= k:
                break
            static[s][p] = False
            left += segments[s][1] - segments[s][0]
    for (first, last), is_static in zip(segments, static, strict=True):
        if bool(is_static.any()):
            groups.append(_Group(first, is_static.nonzero().flatten(), static=True))
        dynamic = (~is_static).nonzero().flatten()
        groups.extend(_Group(f, dynamic, static=False) for f in range(first, last + 1))
    counts = largest_remainder(k, [g.positions.numel() for g in groups])

    owners = _segment_of(groups, segments)
    kept, made = [], []
    for group, count, segment in zip(groups, counts, owners, strict=True):
        if count == 0:
            continue
        if group.static:
            first, last = segment
            means = tokens[first : last + 1, group.positions].float().mean(dim=0)
            centres, distance = dpc_knn_centres(means, count, knn)
            kept.append(group.frame * n + group.positions[centres])
            made.append(merge_into_centres(means, centres, distance, beta).to(tokens.dtype))
        else:
            ranked = attention[group.frame, group.positions].float()
            top = torch.sort(ranked, descending=True, stable=True).indices[:count].sort().values
            kept.append(group.frame * n + group.positions[top])
            made.append(tokens[group.frame, group.positions[top]])
    indices, order = torch.cat(kept).sort()
    return indices, torch.cat(made)[order], segments


def _segment_of(groups: list[_Group], segments: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Each group's segment."""
    return [next(s for s in segments if s[0] <= g.frame <= s[1]) for g in groups]
