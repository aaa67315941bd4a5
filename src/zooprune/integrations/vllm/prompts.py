"""How a pruned variant's processor writes an image's K placeholders: vLLM's prompt update
for the image, its replacement passed through the family's rewrite of it."""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable
from typing import Any

from vllm.multimodal.processing import PromptReplacement, PromptUpdateDetails

from zooprune.budget import Budget
from zooprune.integrations.vllm.selection import shorten_runs


def rewrite_image_updates(updates: Iterable[Any], rewrite: Callable[[Any], Any]) -> list[Any]:
    """A processor's prompt ``updates``, each image's replacement passed through
    ``rewrite`` (what vLLM's replacement gives for the item: its tokens, or their
    ``PromptUpdateDetails``). ``rewrite`` is a module-level function or a partial of one:
    vLLM may pickle it."""
    return [
        PromptReplacement(
            modality="image",
            target=update.target,
            replacement=functools.partial(_rewritten, update.replacement, rewrite),
        )
        if update.modality == "image"
        else update
        for update in updates
    ]


def _rewritten(replacement: Callable[[int], Any], rewrite: Callable[[Any], Any], item: int) -> Any:
    return rewrite(replacement(item))


def kept_run(token: int, budget: Budget, details: PromptUpdateDetails) -> PromptUpdateDetails:
    """An image's replacement with its run of N ``token`` placeholders cut to the budget's
    K, the text around it (markers) unchanged."""
    n = sum(value == token for value in details.full)
    tokens = shorten_runs(details.full, token, budget.tokens_for(n))
    return PromptUpdateDetails.select_token_id(tokens, token)
