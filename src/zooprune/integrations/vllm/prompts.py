"""How a pruned variant's processor writes an image's K placeholders: vLLM's prompt update
for the image, its replacement passed through the family's rewrite of it."""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable
from typing import Any

from vllm.multimodal.processing import PromptReplacement


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
