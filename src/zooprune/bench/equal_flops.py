"""Equal compute: each bench condition's LM prefill FLOPs, and the budget at which a method
that drops tokens inside the language model costs what a method before it does.

At equal kept tokens the two are not equal work: a method before the LM (ratio r) leaves
``int(r n)`` of an image's ``n`` visual tokens in every LM layer, while FastV runs its
first ``layer`` layers on all ``n``. Each method declares the visual tokens every layer
holds (``MethodSpec.layer_tokens``); :func:`zooprune.bench.flops.lm_prefill` counts the
LM's matrix products over those lengths, per question, from the prompt's own text and
visual token counts. The tower and the projector run the same for every method and are
left out: the figures are the language model's prefill, relative to unpruned.

``matching_ratio`` finds the largest budget at which an in-LM method's prefill costs no
more than a pre-LLM method's at a given ratio, or None where even one kept token per
image costs more (a shallow LM whose first ``layer`` layers already spend the whole
budget).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from zooprune.bench.flops import Shapes, lm_prefill
from zooprune.budget import Budget
from zooprune.errors import BudgetError
from zooprune.select.registry import MethodSpec

#: bisection steps for :meth:`PrefillCost.matching_ratio` (2^-60 of the ratio's range)
MATCH_STEPS = 60


@dataclass(frozen=True)
class PromptSizes:
    """Per question: the prompt's tokens that are not visual, and its visual tokens."""

    text: tuple[int, ...]
    visual: tuple[int, ...]


def prompt_sizes(
    processor: Any,
    prompts: Sequence[str],
    images: Sequence[Any],
    image_token_id: int,
    batch_size: int = 32,
) -> PromptSizes:
    """Count each prompt's text and visual tokens as the processor expands them."""
    text: list[int] = []
    visual: list[int] = []
    for start in range(0, len(prompts), batch_size):
        inputs = processor(
            images=list(images[start : start + batch_size]),
            text=list(prompts[start : start + batch_size]),
            padding=True,
            return_tensors="pt",
        )
        ids = inputs["input_ids"]
        attended = inputs.get("attention_mask", torch.ones_like(ids)).bool()
        placeholders = ((ids == image_token_id) & attended).sum(dim=1)
        visual += placeholders.tolist()
        text += (attended.sum(dim=1) - placeholders).tolist()
    return PromptSizes(tuple(text), tuple(visual))


@dataclass(frozen=True)
class PrefillCost:
    """The LM prefill FLOPs of the bench's questions, pruned as each condition prunes."""

    shapes: Shapes
    sizes: PromptSizes

    def flops(self, spec: MethodSpec | None, options: dict[str, Any], kept: Sequence[int]) -> float:
        """Every question's LM prefill, summed, keeping ``kept[i]`` visual tokens of
        question i as ``spec`` does (None: unpruned, ``kept`` ignored)."""
        layers = self.shapes.text_layers
        total = 0.0
        for i, (text, n) in enumerate(zip(self.sizes.text, self.sizes.visual, strict=True)):
            if spec is None:
                visual = [n] * layers
            else:
                visual = spec.layer_tokens(options, n, kept[i], layers)
            total += lm_prefill(self.shapes, text, visual)
        return total

    def relative(
        self, spec: MethodSpec | None, options: dict[str, Any], kept: Sequence[int]
    ) -> float:
        """:meth:`flops` as a fraction of the unpruned prefill."""
        return self.flops(spec, options, kept) / self.flops(None, {}, kept)

    def kept_at(self, ratio: float) -> list[int]:
        """Each question's kept count at ``ratio`` (the budget's rounding; raises
        :class:`~zooprune.errors.BudgetError` where an image keeps none)."""
        return [Budget(ratio=ratio).tokens_for(n, i) for i, n in enumerate(self.sizes.visual)]

    def matching_ratio(
        self, spec: MethodSpec, options: dict[str, Any], ratio: float
    ) -> float | None:
        """The largest ratio at which ``spec`` costs no more than a method before the LM at
        ``ratio``; None where one kept token per image already costs more."""
        target = self.flops_before_lm(ratio)

        def cost(r: float) -> float:
            return self.flops(spec, options, self.kept_at(r))

        if cost(ratio) <= target:
            return ratio
        low = (1 + 1e-9) / min(self.sizes.visual)  # every image keeps one token
        try:
            if low >= ratio or cost(low) > target:
                return None
        except BudgetError:
            return None
        high = ratio
        for _ in range(MATCH_STEPS):
            middle = (low + high) / 2
            if cost(middle) <= target:
                low = middle
            else:
                high = middle
        return low

    def flops_before_lm(self, ratio: float) -> float:
        """The prefill of any method before the LM at ``ratio``, summed as :meth:`flops`
        sums (a pre-LLM method's own count equals it exactly)."""
        kept = self.kept_at(ratio)
        layers = self.shapes.text_layers
        return sum(
            lm_prefill(self.shapes, text, [k] * layers)
            for text, k in zip(self.sizes.text, kept, strict=True)
        )

    def relative_before_lm(self, ratio: float) -> float:
        """:meth:`flops_before_lm` as a fraction of the unpruned prefill."""
        return self.flops_before_lm(ratio) / self.flops(None, {}, [])
