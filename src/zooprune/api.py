"""``zooprune.prune(model, ...)``: the one entry point users call.

The returned handle wraps ``forward`` and ``generate`` of that model instance only (no
class is patched), so that a plain ``model.generate(**processor(...))`` encodes the
images, keeps the chosen visual tokens, drops the other placeholders from the prompt and
runs the language model on the shorter sequence. ``handle.remove()`` restores the
instance exactly as it was.
"""

from __future__ import annotations

import functools
import inspect
import time
import weakref
from collections import defaultdict
from typing import Any, Literal

import torch
from torch import Tensor, nn

from zooprune.adapters import adapter_for
from zooprune.adapters.base import Adapter, EncodedImages, locate_images, padding_side, shrink
from zooprune.budget import Budget
from zooprune.errors import AlreadyPrunedError, NonFiniteFeaturesError, PruneError
from zooprune.record import ImageSelection, Selection
from zooprune.select import METHODS, MethodSpec, TokenSet, get_method

Positions = Literal["compact", "original"]
_MARK = "_zooprune_handle"
_WRAPPED = ("forward", "generate")


def prune(
    model: nn.Module,
    method: str = "zoo",
    *,
    keep: int | None = None,
    ratio: float | None = None,
    positions: Positions = "compact",
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
        **options: the method's options (e.g. ``num_directions``, ``step``, ``seed`` for
            ``zoo``).

    Returns:
        a :class:`PruneHandle`; ``handle.remove()`` undoes everything.

    Raises:
        PruneError subclasses on bad input; the model is then left untouched.
    """
    spec = get_method(method)
    spec.check_options(options)
    budget = Budget(keep=keep, ratio=ratio)
    if positions not in ("compact", "original"):
        raise PruneError(f"positions must be 'compact' or 'original', got {positions!r}")
    adapter = adapter_for(model)
    provided = adapter.provides(model)
    missing = spec.needs - provided
    if missing:
        usable = sorted(name for name, s in METHODS.items() if s.needs <= provided)
        raise PruneError(
            f"method {method!r} needs {', '.join(sorted(missing))}, which this "
            f"{type(model).__name__} does not provide; methods that apply: {', '.join(usable)}"
        )
    if _MARK in model.__dict__:
        raise AlreadyPrunedError(
            f"this {type(model).__name__} is already pruned "
            f"({model.__dict__[_MARK]!r}); call .remove() on that handle first"
        )
    return PruneHandle(model, adapter, spec, budget, positions, options)


class PruneHandle:
    """Pruning attached to one model instance. Use ``remove()`` (or ``with``) to detach."""

    def __init__(
        self,
        model: nn.Module,
        adapter: Adapter,
        method: MethodSpec,
        budget: Budget,
        positions: Positions,
        options: dict[str, Any],
    ) -> None:
        self.model = model
        self.adapter = adapter
        self.method = method
        self.budget = budget
        self.positions = positions
        self.options = dict(options)
        #: what the last pruned call kept (None before the first call)
        self.selection: Selection | None = None
        self._pruned_caches: weakref.WeakSet = weakref.WeakSet()
        self._saved = {name: model.__dict__.get(name) for name in _WRAPPED}
        self._original = {name: getattr(model, name) for name in _WRAPPED}
        self._forward_signature = inspect.signature(self._original["forward"])
        # wraps() keeps the original signature visible: generate() inspects it to route inputs.
        model.__dict__["forward"] = _delegate(self._original["forward"], self._forward)
        model.__dict__["generate"] = _delegate(self._original["generate"], self._generate)
        model.__dict__[_MARK] = self

    def __repr__(self) -> str:
        state = "removed" if self.removed else "active"
        return f"PruneHandle(method={self.method.name!r}, {self.budget}, {state})"

    @property
    def removed(self) -> bool:
        return self.model.__dict__.get(_MARK) is not self

    def remove(self) -> None:
        """Give the model back exactly as it was. Calling it twice is harmless."""
        if self.removed:
            return
        for name, saved in self._saved.items():
            if saved is None:
                del self.model.__dict__[name]
            else:
                self.model.__dict__[name] = saved
        del self.model.__dict__[_MARK]

    def __enter__(self) -> PruneHandle:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()

    # -- the wrapped entry points -------------------------------------------------------

    def _forward(self, *args: Any, **kwargs: Any) -> Any:
        bound = self._forward_signature.bind_partial(*args, **kwargs)
        call = dict(bound.arguments)
        for name, param in self._forward_signature.parameters.items():
            if param.kind is inspect.Parameter.VAR_KEYWORD:
                call.update(call.pop(name, {}))
        self._refuse_pruned_cache(call.get("past_key_values"))
        if call.get("pixel_values") is None:
            return self._original["forward"](*args, **kwargs)
        cache = call.get("past_key_values")
        if cache is not None and cache.get_seq_length() > 0:
            raise PruneError(
                "a pruned forward with pixel_values cannot continue a non-empty cache; "
                "start from an empty cache or use generate()"
            )
        return self._original["forward"](**self.prepare(call, for_generate=False))

    def _generate(self, *args: Any, **kwargs: Any) -> Any:
        self._refuse_pruned_cache(kwargs.get("past_key_values"))
        if kwargs.get("pixel_values") is None:
            return self._original["generate"](*args, **kwargs)
        call = dict(kwargs)
        if args:
            call["input_ids"] = args[0]
            if len(args) > 1:
                raise PruneError("pass generate()'s options by keyword when pruning")
        if "inputs" in call:
            call["input_ids"] = call.pop("inputs")
        prompt = call.get("input_ids")
        if prompt is not None:
            self._lengths_to_new_tokens(call, prompt.shape[1])
        prepared = self.prepare(call, for_generate=True)
        output = self._original["generate"](**prepared)
        cache = getattr(output, "past_key_values", None)
        if cache is not None:
            self._pruned_caches.add(cache)
        return _restore_prompt(output, prompt, prepared["input_ids"].shape[1])

    def _lengths_to_new_tokens(self, call: dict[str, Any], prompt_length: int) -> None:
        """Turn max_length / min_length into new-token counts against the caller's prompt.

        They count the prompt, and the prompt the model sees is shorter: left alone they
        would let a pruned call generate more tokens than the same unpruned call.
        """
        config = call.get("generation_config") or self.model.generation_config
        if call.get("max_new_tokens") is None and getattr(config, "max_new_tokens", None) is None:
            max_length = call.pop("max_length", None) or getattr(config, "max_length", None)
            if max_length is not None:
                call["max_new_tokens"] = max(max_length - prompt_length, 1)
        if call.get("min_new_tokens") is None and getattr(config, "min_new_tokens", None) is None:
            min_length = call.pop("min_length", None) or getattr(config, "min_length", 0)
            if min_length:
                call["min_new_tokens"] = max(min_length - prompt_length, 0)

    def _refuse_pruned_cache(self, cache: Any) -> None:
        if cache is not None and cache in self._pruned_caches:
            raise PruneError(
                "this cache holds a pruned prompt, but generate() returned the original one: "
                "continuing from both would misalign them. Send the image again with the next "
                "turn, or drive the model with handle.prepare(...) and your own cache"
            )

    # -- the pruning itself -------------------------------------------------------------

    def prepare(self, inputs: dict[str, Any], *, for_generate: bool = True) -> dict[str, Any]:
        """Pruned keyword arguments for the model's original ``forward``/``generate``.

        Encodes the images, selects the kept tokens, shortens ``input_ids``,
        ``attention_mask``, ``position_ids`` (always given explicitly), ``labels`` and
        ``token_type_ids``, and replaces the image inputs by ``mm_encoder_outputs``.
        Records the choice in ``self.selection``.
        """
        call = dict(inputs)
        input_ids = call.get("input_ids")
        if input_ids is None:
            raise PruneError("pruning needs input_ids (the image placeholders are found there)")
        image_inputs = {
            name: call.pop(name) for name in self.adapter.image_input_names if name in call
        }
        start = time.perf_counter()
        # The caller's grad mode: training through a pruned model reaches the vision side.
        encoded = self.adapter.encode(self.model, image_inputs, self.method.needs)
        _sync(input_ids.device)
        encoded_at = time.perf_counter()
        counts = [f.shape[0] for f in encoded.features]
        located = locate_images(input_ids, self.adapter.image_token_id(self.model), counts)
        kept_idx, kept_tokens, scores, details = self._select(encoded)
        _sync(input_ids.device)
        selected_at = time.perf_counter()

        keep = input_ids != self.adapter.image_token_id(self.model)
        kept_idx = [idx.to(row.device) for (row, _), idx in zip(located, kept_idx, strict=True)]
        for (row, col), idx in zip(located, kept_idx, strict=True):
            keep[row[idx], col[idx]] = True
        mask = call.get("attention_mask")
        if mask is None:
            mask = torch.ones_like(input_ids)
        positions = call.get("position_ids")
        if positions is None:
            positions = _default_positions(mask, call.get("past_key_values"), for_generate)
        if self.positions == "compact":
            positions = positions - (~keep).long().cumsum(dim=-1)
        positions = positions.masked_fill(mask == 0, 0)
        sequences = {"input_ids": input_ids, "attention_mask": mask, "position_ids": positions}
        for name in ("labels", "token_type_ids"):
            if call.get(name) is not None:
                sequences[name] = call[name]
        pad_values = {"input_ids": _pad_token(self.model, input_ids, mask), "labels": -100}
        call.update(shrink(keep, sequences, pad_values, padding_side(mask)))
        call["mm_encoder_outputs"] = {
            "image": self.adapter.encoder_output(encoded, kept_tokens),
        }
        self.selection = Selection(
            method=self.method.name,
            budget=str(self.budget),
            images=[
                ImageSelection(
                    image=i,
                    prompt=int(row[0]) if row.numel() else -1,
                    num_tokens=counts[i],
                    indices=idx,
                    scores=scores[i],
                    grid=encoded.grids[i],
                    positions=col[idx],
                )
                for i, ((row, col), idx) in enumerate(zip(located, kept_idx, strict=True))
            ],
            encode_seconds=encoded_at - start,
            select_seconds=selected_at - encoded_at,
            details=details,
        )
        return call

    def _select(
        self, encoded: EncodedImages
    ) -> tuple[list[Tensor], list[Tensor], list[Tensor | None], dict[str, Any]]:
        """Run the method on images grouped by token count (one batched call per group)."""
        count = len(encoded.features)
        groups: dict[int, list[int]] = defaultdict(list)
        for i, feats in enumerate(encoded.features):
            groups[feats.shape[0]].append(i)
        indices: list[Tensor] = [None] * count  # type: ignore[list-item]
        tokens: list[Tensor] = [None] * count  # type: ignore[list-item]
        scores: list[Tensor | None] = [None] * count
        details: dict[str, Any] = {}
        for n, members in groups.items():
            k = self.budget.tokens_for(n, members[0])
            for i in members:
                for name, t in (
                    ("features", encoded.features[i]),
                    ("tokens", encoded.projected[i]),
                ):
                    if not bool(torch.isfinite(t).all()):
                        raise NonFiniteFeaturesError(
                            f"image {i}'s visual {name} contain NaN or inf"
                        )
            token_set = TokenSet(
                features=_stack(encoded.features, members),
                projected=_stack(encoded.projected, members),
                projector=self.adapter.projector(self.model),
                grid=encoded.grids[members[0]],
                cls_attention=_stack(encoded.cls_attention, members),
                keys=_stack(encoded.keys, members),
            )
            result = self.method(token_set, k, **self.options)
            details.update(result.details)
            for row, i in enumerate(members):
                idx = result.indices[row]
                indices[i] = idx
                projected = encoded.projected[i]
                tokens[i] = (
                    projected[idx]
                    if result.tokens is None
                    else result.tokens[row].to(projected.dtype)
                )
                scores[i] = None if result.scores is None else result.scores[row]
        return indices, tokens, scores, details


def _delegate(original: Any, replacement: Any) -> Any:
    @functools.wraps(original)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        return replacement(*args, **kwargs)

    return wrapper


def _stack(per_image: list[Tensor] | None, members: list[int]) -> Tensor | None:
    return None if per_image is None else torch.stack([per_image[i] for i in members])


def _default_positions(mask: Tensor, cache: Any, for_generate: bool) -> Tensor:
    """The positions the unpruned model would use when none are given."""
    if for_generate:  # generate() numbers real tokens from 0, padding at 0
        return (mask.long().cumsum(dim=-1) - 1).clamp_min(0)
    past = cache.get_seq_length() if cache is not None else 0
    length = mask.shape[-1]
    return torch.arange(past, past + length, device=mask.device).expand(mask.shape[0], -1)


def _pad_token(model: nn.Module, input_ids: Tensor, mask: Tensor) -> int:
    """A pad id for new padding slots: one already used as padding, else the config's."""
    if bool((mask == 0).any()):
        return int(input_ids[mask == 0][0])
    for config in (getattr(model, "generation_config", None), model.config):
        pad = getattr(config, "pad_token_id", None)
        if pad is not None:
            return int(pad)
    return 0


def _restore_prompt(output: Any, prompt: Tensor, pruned_length: int) -> Any:
    """Put the caller's own prompt back in front of the generated tokens."""

    def rebuild(sequences: Tensor) -> Tensor:
        repeat = sequences.shape[0] // prompt.shape[0]
        head = prompt.repeat_interleave(repeat, dim=0).to(sequences.device)
        return torch.cat([head, sequences[:, pruned_length:]], dim=1)

    if isinstance(output, Tensor):
        return rebuild(output)
    if getattr(output, "sequences", None) is not None:
        output.sequences = rebuild(output.sequences)
    return output


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
