"""Small tensor helpers shared by the selection kernels."""

from __future__ import annotations

import torch
from torch import Tensor


def gather_rows(x: Tensor, index: Tensor) -> Tensor:
    """Rows of each image: ``x [B, N, d]``, ``index [B, K]`` -> ``[B, K, d]``."""
    return x.gather(1, index[..., None].expand(-1, -1, x.shape[-1]))


def at_least_float32(x: Tensor) -> Tensor:
    """Upcast half precision (and integers) to float32; keep float64 as it is."""
    return x.to(torch.promote_types(x.dtype, torch.float32))
