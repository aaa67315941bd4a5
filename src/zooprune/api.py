"""``zooprune.prune(model, ...)``: the Hugging Face engine.

The returned handle wraps ``forward`` and ``generate`` of that model instance only (no
class is patched), so that a plain ``model.generate(**processor(...))`` encodes the
images, keeps the chosen visual tokens, drops the other placeholders from the prompt and
runs the language model on the shorter sequence. ``handle.remove()`` restores the
instance exactly as it was.

A pruned call is four named steps (:meth:`~zooprune.handle.PruneHandle.prepare`): the
adapter encodes the images, the engine-neutral :class:`~zooprune.pipeline.Selector`
chooses the kept tokens, the prompt is shortened around them, and the choice is recorded
in ``handle.selection``. The handle lives in :mod:`zooprune.handle`.

A method that chooses inside the language model (``needs=("lm_stage",)``: FastV) gets an
:class:`~zooprune.lm_stage.LMStageHandle` instead, a subclass: the prompt reaches the
model whole, the stage drops tokens between decoder layers, every token keeps its
original position, and there is no ``prepare()`` (nothing pruned to hand over).

``copy.deepcopy`` and ``pickle`` of a pruned model give a pruned model with a handle of
its own (:func:`handle_of` returns it): it runs on the copy's weights, and removing one
handle leaves the other model pruned.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from zooprune.adapters import adapter_for
from zooprune.errors import AlreadyPrunedError, PruneError
from zooprune.handle import Positions, PruneHandle, handle_of
from zooprune.lm_stage import LMStageHandle
from zooprune.settings import Settings

__all__ = ["PruneHandle", "handle_of", "prune"]


def prune(
    model: nn.Module,
    method: str = "zoo",
    *,
    keep: int | None = None,
    ratio: float | None = None,
    positions: Positions | None = None,
    **options: Any,
) -> PruneHandle:
    """Prune the visual tokens of ``model`` on every later forward / generate call.

    Args:
        model: a supported Hugging Face VLM instance (see ``zooprune.adapters``).
        method: a registered method name (``zooprune methods`` lists them).
        keep: visual tokens kept per image. Exactly one of ``keep`` and ``ratio``.
        ratio: fraction kept per image: ``int(ratio * N)`` of an image's N tokens.
        positions: ``"compact"`` re-numbers the shortened prompt contiguously (the
            authors' choice); ``"original"`` keeps each token's unpruned position.
            None (default): the family's default (``Adapter.position_modes``; compact
            where positions are 1-D, original for M-RoPE models, which refuse compact).
            An in-LM method (``fastv``) always keeps the original positions: None or
            ``"original"`` only.
        **options: the method's options (e.g. ``num_directions``, ``step``, ``seed`` for
            ``zoo``; ``layer`` for ``fastv``), and the model family's layout options
            where it has any (``Adapter.options``; e.g. ``crop_budget="global"`` for
            LLaVA-NeXT). An in-LM method takes no layout options: it ranks each image's
            tokens as one set, and refuses videos.

    Returns:
        a :class:`PruneHandle`; for an in-LM method, its subclass
        :class:`~zooprune.lm_stage.LMStageHandle` (no ``prepare()``; ``query_at``).
        ``handle.remove()`` undoes everything.

    Raises:
        PruneError: (or a subclass) on bad input, every value checked here; the model is
            then left untouched.
    """
    adapter = adapter_for(model)
    selector = Settings(method, keep, ratio, positions, options).selector(adapter.options)
    in_lm = "lm_stage" in selector.needs  # the method chooses inside the language model
    if in_lm:
        LMStageHandle.check(model, adapter, selector, positions, options)
    modes = adapter.position_modes
    positions = modes[0] if positions is None else positions
    if positions not in modes and not in_lm:
        note = f" ({adapter.position_note})" if adapter.position_note else ""
        raise PruneError(
            f"positions must be {' or '.join(map(repr, modes))} for {type(model).__name__}, "
            f"got {positions!r}{note}"
        )
    selector.check_provided(adapter.available(model), type(model).__name__)
    if not in_lm:
        selector.check_projector(adapter.projector(model))
    if handle_of(model) is not None:
        raise AlreadyPrunedError(
            f"this {type(model).__name__} is already pruned "
            f"({handle_of(model)!r}); call .remove() on that handle first"
        )
    return (LMStageHandle if in_lm else PruneHandle)(model, adapter, selector, positions)
