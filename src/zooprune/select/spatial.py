"""Baselines that look only at where a token sits on the patch grid, not at what it holds."""

from __future__ import annotations

import torch
from torch import Tensor

from zooprune.select.ops import at_least_float32


def grid_indices(height: int, width: int, k: int, device: torch.device | str = "cpu") -> Tensor:
    """k cells spread uniformly over a ``height x width`` grid, in raster order.

    The k points are laid out in ``rows = ceil(sqrt(k * height / width))`` rows (at most
    ``height``) whose counts differ by at most one; each row's points sit at the centres
    of equal-width bins. For k = g * g on a square grid divisible by g this is the centre
    cell of each (height/g) x (width/g) window, i.e. plain strided subsampling.

    Returns:
        ``[k]`` int64 raster indices ``row * width + col``, ascending, distinct.
    """
    n = height * width
    if not 1 <= k <= n:
        raise ValueError(f"k must be in [1, {n}], got {k}")
    rows = min(height, max(1, round((k * height / width) ** 0.5)))
    while -(-k // rows) > width:  # a row may not hold more points than the grid is wide
        rows += 1
    counts = [k // rows + (1 if r < k % rows else 0) for r in range(rows)]
    cells = []
    for r, count in enumerate(counts):
        y = int((r + 0.5) * height / rows)
        for c in range(count):
            cells.append(y * width + int((c + 0.5) * width / count))
    return torch.tensor(sorted(cells), dtype=torch.long, device=device)


def nearest_centre(height: int, width: int, centres: Tensor) -> Tensor:
    """For every cell, the position (0..k-1) of the spatially nearest centre.

    Euclidean distance between cell coordinates; ties go to the lower centre position.

    Args:
        centres: ``[k]`` raster indices.

    Returns:
        ``[height * width]`` int64.
    """
    device = centres.device
    cells = torch.arange(height * width, device=device)
    yx = torch.stack([cells // width, cells % width], dim=-1).float()  # [N, 2]
    centre_yx = yx[centres]  # [k, 2]
    return torch.cdist(yx, centre_yx).argmin(dim=-1)


def pool_to_centres(features: Tensor, assignment: Tensor, k: int) -> Tensor:
    """Average the tokens assigned to each centre.

    Args:
        features: ``[B, N, d]``.
        assignment: ``[N]`` centre position of each token, values in [0, k).

    Returns:
        ``[B, k, d]`` means (float32 at least, as averaging in half precision loses bits).
    """
    x = at_least_float32(features)
    sums = torch.zeros(x.shape[0], k, x.shape[-1], dtype=x.dtype, device=x.device)
    sums.index_add_(1, assignment, x)
    counts = torch.bincount(assignment, minlength=k).clamp_min(1).to(x.dtype)
    return sums / counts[None, :, None]


def random_indices(n: int, k: int, *, seed: int, device: torch.device | str = "cpu") -> Tensor:
    """A uniformly random k-subset of range(n), reproducible from ``seed``. ``[k]`` ascending."""
    if not 1 <= k <= n:
        raise ValueError(f"k must be in [1, {n}], got {k}")
    generator = torch.Generator(device="cpu").manual_seed(seed)
    return torch.randperm(n, generator=generator, device="cpu")[:k].sort().values.to(device)
