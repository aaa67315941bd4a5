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
from zooprune.adapters.base import (
    Adapter,
    EncodedImages,
    ImageLayout,
    locate_images,
    padding_side,
    shrink,
)
from zooprune.budget import Budget, split_evenly
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
        **options: the method's options (e.g. ``num_directions``, ``step``, ``seed`` for
            ``zoo``), and the model family's layout options where it has any
            (``Adapter.options``; e.g. ``crop_budget="global"`` for LLaVA-NeXT).

    Returns:
        a :class:`PruneHandle`; ``handle.remove()`` undoes everything.

    Raises:
        PruneError subclasses on bad input; the model is then left untouched.
    """
    spec = get_method(method)
    adapter = adapter_for(model)
    layout = adapter.take_options(options)
    spec.check_options(options)
    budget = Budget(keep=keep, ratio=ratio)
    modes = adapter.position_modes
    positions = modes[0] if positions is None else positions
    if positions not in modes:
        note = f" ({adapter.position_note})" if adapter.position_note else ""
        raise PruneError(
            f"positions must be {' or '.join(map(repr, modes))} for {type(model).__name__}, "
            f"got {positions!r}{note}"
        )
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
    return PruneHandle(model, adapter, spec, budget, positions, options, layout)


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
        layout: dict[str, str] | None = None,
    ) -> None:
        self.model = model
        self.adapter = adapter
        self.method = method
        self.budget = budget
        self.positions = positions
        self.options = dict(options)
        #: the family's layout options (``crop_budget``, ``separators``), defaults filled
        self.layout = dict(layout or {})
        #: what the last pruned call kept (None before the first call)
        self.selection: Selection | None = None
        self._pruned_caches: weakref.WeakSet = weakref.WeakSet()
        self._saved = {name: model.__dict__.get(name) for name in _WRAPPED}
        self._restore_state = adapter.save_state(model)
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
        self._restore_state()
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
        ``attention_mask``, ``position_ids`` (always given explicitly, in the form the
        adapter asks for), ``labels``, ``token_type_ids`` and ``mm_token_type_ids``, and
        replaces the image inputs by ``mm_encoder_outputs``.
        Separator placeholders (row newlines) stay or go with ``self.layout``.
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
        prompt = {"input_ids": input_ids} if self.adapter.reads_prompt else {}
        encoded = self.adapter.encode(self.model, image_inputs, self.method.needs, **prompt)
        _sync(input_ids.device)
        encoded_at = time.perf_counter()
        layouts = [encoded.layout(i) for i in range(len(encoded.features))]
        counts = [layout.slots for layout in layouts]
        located = locate_images(input_ids, self.adapter.image_token_id(self.model), counts)
        kept_idx, kept_tokens, scores, details = self._select(encoded, layouts)
        separators = self.layout.get("separators", "all")
        runs = [
            layout.assemble(idx, tokens, separators)
            for layout, idx, tokens in zip(layouts, kept_idx, kept_tokens, strict=True)
        ]
        _sync(input_ids.device)
        selected_at = time.perf_counter()

        keep = input_ids != self.adapter.image_token_id(self.model)
        for (row, col), (slots, _, _) in zip(located, runs, strict=True):
            slots = slots.to(row.device)
            keep[row[slots], col[slots]] = True
        mask = call.get("attention_mask")
        if mask is None:
            mask = torch.ones_like(input_ids)
        positions = call.get("position_ids")
        if positions is None:
            positions = self.adapter.unpruned_positions(self.model, call | image_inputs, mask)
        if positions is None:
            positions = _default_positions(mask, call.get("past_key_values"), for_generate)
        if self.positions == "compact":
            positions = positions - (~keep).long().cumsum(dim=-1)
        positions = positions.masked_fill(mask == 0, 0)
        sequences = {"input_ids": input_ids, "attention_mask": mask, "position_ids": positions}
        for name in ("labels", "token_type_ids", "mm_token_type_ids"):
            if call.get(name) is not None:
                sequences[name] = call[name]
        pad_values = {"input_ids": _pad_token(self.model, input_ids, mask), "labels": -100}
        call.update(shrink(keep, sequences, pad_values, padding_side(mask)))
        call["position_ids"] = self.adapter.pruned_positions(
            self.model, call["position_ids"], call["attention_mask"]
        )
        call["mm_encoder_outputs"] = {
            "image": self.adapter.encoder_output(encoded, [run for _, run, _ in runs]),
        }
        self.selection = Selection(
            method=self.method.name,
            budget=str(self.budget),
            images=[
                _image_record(i, place, idx, scores[i], layout, run[2], encoded.grids[i])
                for i, (place, idx, layout, run) in enumerate(
                    zip(located, kept_idx, layouts, runs, strict=True)
                )
            ],
            encode_seconds=encoded_at - start,
            select_seconds=selected_at - encoded_at,
            details=details,
        )
        return call

    def _select(
        self, encoded: EncodedImages, layouts: list[ImageLayout]
    ) -> tuple[list[Tensor], list[Tensor], list[Tensor | None], dict[str, Any]]:
        """Run the method on every image's budget units (crops, or the whole image).

        Each image's budget is shared over its units (``self.layout["crop_budget"]``);
        units of equal size, budget and grid go through the method in one batched call.

        Returns:
            per image: ``[K]`` kept indices ascending, ``[K, d_l]`` the tokens placed
            there, ``[N]`` scores (NaN for tokens of a unit that kept nothing) or None;
            and the methods' details.
        """
        crop_budget = self.layout.get("crop_budget", "split")
        # (image, token indices [n_u], grid, kept) per unit
        units: list[tuple[int, Tensor, tuple[int, int], int]] = []
        for i, layout in enumerate(layouts):
            for name, t in (("features", encoded.features[i]), ("tokens", encoded.projected[i])):
                if not bool(torch.isfinite(t).all()):
                    raise NonFiniteFeaturesError(f"image {i}'s visual {name} contain NaN or inf")
            k = self.budget.tokens_for(encoded.features[i].shape[0], i)
            parts = layout.units(crop_budget)
            shares = split_evenly(k, [idx.numel() for idx, _ in parts])
            units += [
                (i, idx, grid, share)
                for (idx, grid), share in zip(parts, shares, strict=True)
                if share
            ]
        groups: dict[tuple, list[int]] = defaultdict(list)
        for u, (_, idx, grid, share) in enumerate(units):
            groups[(idx.numel(), grid, share)].append(u)
        picked: dict[int, list[tuple[Tensor, Tensor]]] = defaultdict(list)
        count = len(encoded.features)
        scores: list[Tensor | None] = [None] * count
        details: dict[str, Any] = {}

        def gather(per_image: list[Tensor] | None, members: list[int]) -> Tensor | None:
            if per_image is None:
                return None
            # A unit of the whole image needs no gather (every single-crop model).
            return torch.stack(
                [
                    per_image[i] if idx.numel() == per_image[i].shape[0] else per_image[i][idx]
                    for i, idx, _, _ in (units[u] for u in members)
                ]
            )

        for (_, grid, k), members in groups.items():
            token_set = TokenSet(
                features=gather(encoded.features, members),
                projected=gather(encoded.projected, members),
                projector=self.adapter.projector(self.model),
                grid=grid,
                cls_attention=gather(encoded.cls_attention, members),
                keys=gather(encoded.keys, members),
            )
            result = self.method(token_set, k, **self.options)
            details.update(result.details)
            for row, u in enumerate(members):
                i, idx = units[u][0], units[u][1]
                projected = encoded.projected[i]
                chosen = idx[result.indices[row].to(idx.device)]
                made = (
                    projected[chosen]
                    if result.tokens is None
                    else result.tokens[row].to(projected.dtype)
                )
                picked[i].append((chosen, made))
                if result.scores is not None:
                    if scores[i] is None:
                        n = projected.shape[0]
                        scores[i] = result.scores.new_full((n,), float("nan"))
                    scores[i][idx.to(result.scores.device)] = result.scores[row]
        indices: list[Tensor] = []
        tokens: list[Tensor] = []
        for i in range(count):
            chosen, order = torch.cat([c for c, _ in picked[i]]).sort()
            indices.append(chosen)
            tokens.append(torch.cat([t for _, t in picked[i]])[order])
        return indices, tokens, scores, details


def _delegate(original: Any, replacement: Any) -> Any:
    @functools.wraps(original)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        return replacement(*args, **kwargs)

    return wrapper


def _image_record(
    image: int,
    place: Tensor,
    indices: Tensor,
    scores: Tensor | None,
    layout: ImageLayout,
    separators: Tensor,
    grid: tuple[int, int],
) -> ImageSelection:
    """What one image kept, mapped back to prompt positions, crops and patch cells."""
    row, col = place
    device = col.device  # the record lives with the prompt, as the caller's inputs do
    return ImageSelection(
        image=image,
        prompt=int(row[0]) if row.numel() else -1,
        num_tokens=layout.token_slots.numel(),
        indices=indices.to(device),
        scores=scores,
        grid=grid,
        positions=col[layout.token_slots[indices].to(device)],
        separators=col[separators.to(device)],
        crops=layout.crop[indices].to(device),
        cells=layout.cell[indices].to(device),
        patch_grids=tuple(layout.patch_grids),
        boxes=None if layout.boxes is None else tuple(layout.boxes),
    )


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
