"""How a pruned variant's processor writes an item's K placeholders: vLLM's prompt update
for the image (or video), its replacement passed through the family's rewrite of it."""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from vllm.multimodal.processing import PromptReplacement, PromptUpdateDetails

from zooprune.budget import Budget, split_evenly
from zooprune.integrations.vllm.selection import cut_runs, run_lengths


def rewrite_updates(
    updates: Iterable[Any], rewrites: Mapping[str, Callable[[Any], Any]]
) -> list[Any]:
    """A processor's prompt ``updates``, each item's replacement passed through the
    ``rewrites`` of its modality (what vLLM's replacement gives for the item: its tokens,
    or their ``PromptUpdateDetails``); a modality without one is left alone. A rewrite is
    a module-level function or a partial of one: vLLM may pickle it."""
    return [
        PromptReplacement(
            modality=update.modality,
            target=update.target,
            replacement=functools.partial(
                _rewritten, update.replacement, rewrites[update.modality]
            ),
        )
        if update.modality in rewrites
        else update
        for update in updates
    ]


def _rewritten(replacement: Callable[[int], Any], rewrite: Callable[[Any], Any], item: int) -> Any:
    return rewrite(replacement(item))


def even_runs(token: int, budget: Budget, replacement: Any) -> Any:
    """An item's replacement with each of its runs of ``token`` cut to its even share
    (:func:`~zooprune.budget.split_evenly`) of the budget's K of all its N placeholders, the
    text around them unchanged: one run for an image, one per frame for a video written
    frame by frame (the pipeline's ``video_budget="frame"`` shares). The replacement's
    type is kept (tokens, or ``PromptUpdateDetails`` embedding only ``token``)."""
    details = isinstance(replacement, PromptUpdateDetails)
    tokens = list(replacement.full if details else replacement)
    sizes = run_lengths(tokens, token)
    cut = cut_runs(tokens, token, split_evenly(budget.tokens_for(sum(sizes)), sizes))
    return PromptUpdateDetails.select_token_id(cut, token) if details else cut
