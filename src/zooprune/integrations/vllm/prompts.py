"""What a pruned variant's processor does to a request: it reads the request's own
settings, and writes each item's K placeholders (vLLM's prompt update for the image or
video, its replacement passed through the family's rewrite of it).

Per-request settings: ``mm_processor_kwargs={"zooprune": {...}}`` over the server's
(:meth:`~zooprune.settings.Settings.overridden_by`), checked before anything reaches the
engine (a bad value is the request's error, naming the option). vLLM hashes the request's
kwargs into each item's cache key, so the same image at another K is another item to its
processor and encoder caches. The settings travel with each item as a field of its own
(:func:`~zooprune.integrations.vllm.selection.request_field`), which the model takes out
before encoding; a request without settings carries none, as before.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from vllm.multimodal.inputs import MultiModalFieldConfig
from vllm.multimodal.parse import EmbeddingItems
from vllm.multimodal.processing import PromptReplacement, PromptUpdateDetails

from zooprune.budget import Budget, split_evenly
from zooprune.errors import PruneError
from zooprune.integrations.vllm import SETTINGS, architecture_served
from zooprune.integrations.vllm.selection import (
    REQUEST_MODALITIES,
    budget_of,
    cut_runs,
    request_field,
    request_tensor,
    requested_selector,
    requested_settings,
    run_lengths,
)


class PrunedProcessor:
    """What every pruned variant's multimodal processor adds to vLLM's (a mixin in front
    of it): the request's own settings read, checked, stripped from what the HF processor
    sees and carried with each item; and :meth:`prompt_rewrites`, the family's rewrite of
    each item's placeholders at the request's budget. The processing info's counts stay
    vLLM's N: they size memory profiling, which must cover any K <= N a request asks for."""

    @property
    def architecture(self) -> str:
        """The HF architecture the variant serves (its declaration in ``VARIANTS``)."""
        return architecture_served(self.info.get_hf_config())

    def prompt_rewrites(self, budget: Budget, mm_items: Any) -> Mapping[str, Rewrite]:
        """The family's rewrite of an item's replacement at ``budget``, per modality it
        prunes: one for all the request's items of the modality, or one per item."""
        raise NotImplementedError

    def requested(self, hf_kwargs: Mapping[str, object]) -> str | None:
        """The request's settings text (:func:`requested_settings`), None without any.

        Raises:
            PruneError subclasses: bad settings, naming the option.
        """
        if SETTINGS not in hf_kwargs:
            return None
        config = self.info.get_hf_config()
        return requested_settings(
            config, self.architecture, hf_kwargs[SETTINGS], self.scores_mlp(config)
        )

    def scores_mlp(self, config: Any) -> bool:
        """Whether the model's scored projector is a Linear -> GELU -> Linear (what the
        MLP-only estimators need; the model checks its own settings when it loads it)."""
        return False

    def budget(self, hf_kwargs: Mapping[str, object]) -> Budget:
        """The budget the request's items are written with: its own, or the server's."""
        text = self.requested(hf_kwargs)
        if text is None:
            return budget_of(self.info.get_hf_config())
        return requested_selector(text, self.architecture).budget

    def apply(self, inputs: Any, *args: Any, **kwargs: Any) -> Any:
        # What would fail inside the engine (and stop it) fails here, the request's own.
        self.requested(inputs.hf_processor_mm_kwargs)  # bad settings
        for modality in REQUEST_MODALITIES:
            if isinstance(inputs.mm_data_items.get(modality), EmbeddingItems):
                raise PruneError(
                    f"a pruned model selects among its tower's tokens: precomputed {modality} "
                    "embeddings cannot be pruned; send the pixels"
                )
        return super().apply(inputs, *args, **kwargs)

    def _apply_hf_processor_main(self, mm_items: Any, hf_kwargs: Mapping[str, object]) -> Any:
        text = self.requested(hf_kwargs)
        processed = super()._apply_hf_processor_main(mm_items, _stripped(hf_kwargs))
        if text is not None:
            for modality in REQUEST_MODALITIES:
                if modality in mm_items:
                    processed[request_field(modality)] = request_tensor(
                        text, len(mm_items[modality])
                    )
        return processed

    def _get_mm_fields_config(self, hf_inputs: Any, hf_kwargs: Mapping[str, object]) -> Any:
        fields = dict(super()._get_mm_fields_config(hf_inputs, _stripped(hf_kwargs)))
        for modality in REQUEST_MODALITIES:
            fields[request_field(modality)] = MultiModalFieldConfig.batched(
                modality, keep_on_cpu=True
            )
        return fields

    def _get_prompt_updates(
        self, mm_items: Any, hf_processor_mm_kwargs: Mapping[str, object], out_mm_kwargs: Any
    ) -> list[Any]:
        updates = super()._get_prompt_updates(
            mm_items, _stripped(hf_processor_mm_kwargs), out_mm_kwargs
        )
        rewrites = self.prompt_rewrites(self.budget(hf_processor_mm_kwargs), mm_items)
        return rewrite_updates(updates, rewrites)


def _stripped(hf_kwargs: Mapping[str, object]) -> dict[str, object]:
    """The request's processor kwargs without zooprune's: the HF processor's own."""
    return {name: value for name, value in hf_kwargs.items() if name != SETTINGS}


#: how a family rewrites a modality's items: one rewrite for all, or one per item
Rewrite = Callable[[Any], Any] | list[Callable[[Any], Any]]


def rewrite_updates(updates: Iterable[Any], rewrites: Mapping[str, Rewrite]) -> list[Any]:
    """A processor's prompt ``updates``, each item's replacement passed through the
    ``rewrites`` of its modality (what vLLM's replacement gives for the item: its tokens,
    or their ``PromptUpdateDetails``), or through the item's own where a modality has a
    list of them; a modality without one is left alone. A rewrite is a module-level
    function or a partial of one: vLLM may pickle it."""
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


def _rewritten(replacement: Callable[[int], Any], rewrite: Rewrite, item: int) -> Any:
    return (rewrite[item] if isinstance(rewrite, list) else rewrite)(replacement(item))


def first_tokens(count: int, tokens: list[int]) -> list[int]:
    """An item's replacement cut to its first ``count`` tokens (its placeholders all one
    token: the item's kept ones and its separators counted in ``count``)."""
    return list(tokens)[:count]


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
