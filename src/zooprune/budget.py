"""Budget semantics: how many visual tokens of an image are kept.

``keep=K`` keeps K tokens of every image; ``ratio=r`` keeps ``int(r * N)`` of an image of
N tokens (the authors' rounding: LLaVA-1.5 ratios 0.3334 / 0.2223 / 0.1112 give 192 / 128
/ 64 of 576). The count is a pure function of N, so equal inputs always keep equal counts.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

from zooprune.errors import BudgetError


@dataclass(frozen=True)
class Budget:
    keep: int | None = None
    ratio: float | None = None

    def __post_init__(self) -> None:
        if (self.keep is None) == (self.ratio is None):
            raise BudgetError("give exactly one of keep=K (tokens per image) or ratio=r")
        if self.keep is not None:
            if isinstance(self.keep, bool) or not isinstance(self.keep, numbers.Integral):
                raise BudgetError(f"keep must be an int, got {self.keep!r}")
            object.__setattr__(self, "keep", int(self.keep))  # numpy ints become plain ints
            if self.keep <= 0:
                raise BudgetError(f"keep must be positive, got {self.keep}")
        if self.ratio is not None:
            if isinstance(self.ratio, bool) or not isinstance(self.ratio, numbers.Real):
                raise BudgetError(f"ratio must be a number, got {self.ratio!r}")
            if not (math.isfinite(self.ratio) and 0 < self.ratio <= 1):
                raise BudgetError(f"ratio must be in (0, 1], got {self.ratio}")
            object.__setattr__(self, "ratio", float(self.ratio))

    def tokens_for(self, num_tokens: int, image: int | str = 0) -> int:
        """Tokens kept of an image of ``num_tokens``; ``image`` only names it in errors
        (an index, or a name such as ``"video 0"``)."""
        name = f"image {image}" if isinstance(image, int) else image
        if self.keep is not None:
            if self.keep > num_tokens:
                raise BudgetError(f"keep={self.keep} exceeds {name}'s {num_tokens} visual tokens")
            return self.keep
        kept = int(self.ratio * num_tokens)
        if kept < 1:
            raise BudgetError(f"ratio={self.ratio} keeps no token of {name} ({num_tokens} tokens)")
        return kept

    def __str__(self) -> str:
        return f"keep={self.keep}" if self.keep is not None else f"ratio={self.ratio}"


def split_evenly(total: int, sizes: list[int]) -> list[int]:
    """Share ``total`` kept tokens evenly over groups of ``sizes`` tokens (e.g. crops).

    Water-filling: every group that still has room gets the same share, a group never
    gets more than it holds (what it cannot take is shared again over the others), and
    the last remainder goes one each to the first groups with room. The shares sum to
    ``min(total, sum(sizes))``; a pure function of the sizes.
    """
    shares = [0] * len(sizes)
    open_groups = [i for i, size in enumerate(sizes) if size > 0]
    left = min(total, sum(sizes))
    while left > 0:
        each = left // len(open_groups)
        if each == 0:
            for i in open_groups[:left]:
                shares[i] += 1
            break
        for i in open_groups:
            give = min(each, sizes[i] - shares[i])
            shares[i] += give
            left -= give
        open_groups = [i for i in open_groups if shares[i] < sizes[i]]
    return shares
