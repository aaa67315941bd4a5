"""The handle ``zooprune.prune`` returns: one model instance's pruned ``forward`` and
``generate``, and everything that undoes them.

A pruned call is four named steps (:meth:`PruneHandle.prepare`): the adapter encodes the
images, the engine-neutral :class:`~zooprune.pipeline.Selector` chooses the kept tokens,
the prompt is shortened around them, and the choice is recorded in ``handle.selection``.
Only the third step is particular to Hugging Face's ``forward`` / ``generate``.

``copy.deepcopy`` and ``pickle`` of a pruned model give a pruned model with a handle of
its own (:func:`handle_of` returns it): it runs on the copy's weights, and removing one
handle leaves the other model pruned.
"""

from __future__ import annotations

import contextlib
import inspect
import time
import weakref
from collections.abc import Callable, Iterator
from typing import Any, Literal

import torch
from torch import Tensor, nn

from zooprune.adapters.base import Adapter, EncodedImages, locate_images, padding_side, shrink
from zooprune.budget import Budget
from zooprune.errors import PruneError
from zooprune.pipeline import ITEM_KINDS, ImageLayout, Kept, Selector, item_names, selection_record
from zooprune.record import Selection
from zooprune.select import MethodSpec

Positions = Literal["compact", "original"]
#: ``observer(selection, error)``: one of the two is None (see :meth:`PruneHandle.observe`)
Observer = Callable[["Selection | None", "Exception | None"], None]
_MARK = "_zooprune_handle"
_WRAPPED = ("forward", "generate")


def handle_of(model: nn.Module) -> PruneHandle | None:
    """The handle that prunes ``model`` (a deep copy's or unpickled model's own), or None."""
    return model.__dict__.get(_MARK)


class _Entry:
    """A pruned model's ``forward`` / ``generate``: its handle's version of that method.

    An object rather than a closure, so that ``copy.deepcopy`` and ``pickle`` of the model
    carry it over to the copy's own handle. Its signature is the original method's
    (``generate`` reads ``forward``'s to route inputs). A reference taken while pruned
    and called after ``remove()`` runs whatever the model's method is then.
    """

    def __init__(self, handle: PruneHandle, name: str) -> None:
        self.handle = handle
        self.name = name

    def __reduce__(self) -> tuple:
        return (_Entry, (self.handle, self.name))

    @property
    def __wrapped__(self) -> Any:
        return self.handle._original(self.name)

    def __getattr__(self, attr: str) -> Any:
        # __name__, __qualname__, __func__, ... as the original method's; other dunder
        # names (__deepcopy__, __signature__) stay absent so copy and inspect work.
        if attr in ("handle", "name") or (
            attr.startswith("__") and attr not in ("__name__", "__qualname__", "__func__")
        ):
            raise AttributeError(attr)
        return getattr(self.__wrapped__, attr)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        handle = self.handle
        if handle.removed:
            return getattr(handle.model, self.name)(*args, **kwargs)
        run = handle._forward if self.name == "forward" else handle._generate
        return run(*args, **kwargs)


class PruneHandle:
    """Pruning attached to one model instance. Use ``remove()`` (or ``with``) to detach.

    Attributes:
        model: the pruned model.
        selector: the method, its options, the budget and the layout options.
        positions: ``"compact"`` or ``"original"``.
        selection: what the last pruned call kept (None before the first call).
    """

    def __init__(
        self, model: nn.Module, adapter: Adapter, selector: Selector, positions: Positions
    ) -> None:
        self.model = model
        self.adapter = adapter
        self.selector = selector
        self.positions = positions
        self.selection: Selection | None = None
        self._pruned_caches: weakref.WeakSet = weakref.WeakSet()
        self._observers: list[Observer] = []
        self._saved = {name: model.__dict__.get(name) for name in _WRAPPED}
        self._adapter_state = adapter.save_state(model)
        for name in _WRAPPED:
            model.__dict__[name] = _Entry(self, name)
        model.__dict__[_MARK] = self

    def __repr__(self) -> str:
        state = "removed" if self.removed else "active"
        return f"PruneHandle(method={self.method.name!r}, {self.budget}, {state})"

    # The caches a pruned generate returned are only good for refusing them again; the
    # observers belong to whoever attached them, not to a copy.
    def __getstate__(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if k not in ("_pruned_caches", "_observers")}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._pruned_caches = weakref.WeakSet()
        self._observers = []

    def observe(self, callback: Observer) -> None:
        """Call ``callback(selection, None)`` after every pruned call's selection, and
        ``callback(None, error)`` when a pruned call is refused (the error is re-raised
        after, unless the callback raises first). For harnesses that must log every call
        or stop on the first refusal even where a caller swallows exceptions. Copies of
        the model do not carry observers.

        Raises:
            PruneError: ``callback`` is not callable (nothing is registered).
        """
        if not callable(callback):
            raise PruneError(f"observe takes a callable (selection, error), got {callback!r}")
        self._observers.append(callback)

    @property
    def method(self) -> MethodSpec:
        return self.selector.method

    @property
    def options(self) -> dict[str, Any]:
        return self.selector.options

    @property
    def layout(self) -> dict[str, str]:
        """The family's layout options (``crop_budget``, ``separators``), defaults filled."""
        return self.selector.layout

    @property
    def budget(self) -> Budget:
        return self.selector.budget

    @budget.setter
    def budget(self, budget: Budget) -> None:
        self.selector = Selector.build(
            self.method.name,
            keep=budget.keep,
            ratio=budget.ratio,
            options=self.options | self.layout,
            layout_options=self.adapter.options,
        )

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
        self.adapter.restore_state(self.model, self._adapter_state)
        del self.model.__dict__[_MARK]

    def __enter__(self) -> PruneHandle:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()

    def _original(self, name: str) -> Any:
        """The model's own ``forward`` / ``generate``, as it was before pruning."""
        saved = self._saved[name]
        if saved is not None:  # e.g. a hook another library had installed
            return saved
        return getattr(type(self.model), name).__get__(self.model, type(self.model))

    # -- the wrapped entry points -------------------------------------------------------

    def _forward(self, *args: Any, **kwargs: Any) -> Any:
        signature = inspect.signature(self._original("forward"))
        call = dict(signature.bind_partial(*args, **kwargs).arguments)
        for name, param in signature.parameters.items():
            if param.kind is inspect.Parameter.VAR_KEYWORD:
                call.update(call.pop(name, {}))
        self._refuse_pruned_cache(call.get("past_key_values"))
        if not self._has_items(call):
            return self._original("forward")(*args, **kwargs)
        with self._observed():
            cache = call.get("past_key_values")
            if cache is not None and cache.get_seq_length() > 0:
                raise PruneError(
                    "a pruned forward with images or videos cannot continue a non-empty cache; "
                    "start from an empty cache or use generate()"
                )
            prepared = self._prepare(call, for_generate=False)
        return self._run("forward", prepared)

    def _generate(self, *args: Any, **kwargs: Any) -> Any:
        self._refuse_pruned_cache(kwargs.get("past_key_values"))
        if not self._has_items(kwargs):
            return self._original("generate")(*args, **kwargs)
        call = dict(kwargs)
        with self._observed():
            if args:
                call["input_ids"] = args[0]
                if len(args) > 1:
                    raise PruneError("pass generate()'s options by keyword when pruning")
            if "inputs" in call:
                call["input_ids"] = call.pop("inputs")
            prompt = call.get("input_ids")
            if prompt is not None:
                self._lengths_to_new_tokens(call, prompt.shape[1])
                if call.get("streamer") is not None:
                    call["streamer"] = _CallersPromptStreamer(call["streamer"], prompt)
            prepared = self._prepare(call, for_generate=True)
        output = self._run("generate", prepared)
        cache = getattr(output, "past_key_values", None)
        if cache is not None:
            self._pruned_caches.add(cache)
        return _restore_prompt(output, prompt, prepared["input_ids"].shape[1])

    def _run(self, name: str, prepared: dict[str, Any]) -> Any:
        """The model's own ``forward`` / ``generate`` on the prepared arguments (a stage
        inside the language model arms itself around it: ``zooprune.lm_stage``)."""
        return self._original(name)(**prepared)

    def _has_items(self, call: dict[str, Any]) -> bool:
        """Whether the call holds images (or videos, where the family prunes them)."""
        return any(call.get(name) is not None for name in self.adapter.pixel_input_names)

    def _lengths_to_new_tokens(self, call: dict[str, Any], prompt_length: int) -> None:
        """Turn max_length / min_length into new-token counts against the caller's prompt.

        They count the prompt, and the prompt the model sees is shorter: left alone they
        would let a pruned call generate more tokens than the same unpruned call.
        """
        config = call.get("generation_config") or self.model.generation_config
        if call.get("max_new_tokens") is None and getattr(config, "max_new_tokens", None) is None:
            max_length = call.pop("max_length", None) or getattr(config, "max_length", None)
            if max_length is not None:
                if max_length <= prompt_length:  # as generate() refuses it unpruned
                    raise PruneError(
                        f"max_length={max_length} leaves no room for new tokens after the "
                        f"{prompt_length}-token prompt (it counts the prompt, as without "
                        "pruning); raise it or pass max_new_tokens"
                    )
                call["max_new_tokens"] = max_length - prompt_length
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
        Records the choice in ``self.selection`` and tells the observers.
        """
        with self._observed():
            return self._prepare(inputs, for_generate)

    @contextlib.contextmanager
    def _observed(self) -> Iterator[None]:
        """Tell the observers how the pruning work inside the block ended."""
        try:
            yield
        except Exception as error:
            for observer in self._observers:
                observer(None, error)
            raise
        for observer in self._observers:
            observer(self.selection, None)

    def _prepare(self, inputs: dict[str, Any], for_generate: bool) -> dict[str, Any]:
        """The pruned call's arguments. The steps every handle shares, around two hooks a
        subclass may override: :meth:`_choose` (which tokens the model gets) and
        :meth:`_record` (what ``self.selection`` says); :meth:`_check_call` refuses a
        call before anything runs."""
        if self.removed:
            raise PruneError("this handle was removed; prune the model again to prepare inputs")
        call = dict(inputs)
        self._check_call(call, for_generate)
        input_ids = call.get("input_ids")
        if input_ids is None:
            raise PruneError("pruning needs input_ids (the image placeholders are found there)")
        image_inputs = {
            name: call.pop(name) for name in self.adapter.image_input_names if name in call
        }
        mask = call.get("attention_mask")
        if mask is None:
            mask = torch.ones_like(input_ids)
        if self.method.videos_only:  # refused before the vision side runs
            image = self.adapter.image_token_id(self.model)
            if bool(((input_ids == image) & (mask != 0)).any()):
                raise PruneError(
                    f"method {self.method.name!r} merges tokens across a video's frames: it "
                    "prunes videos only, and this call has images; prune images with another "
                    "method"
                )
        start = time.perf_counter()
        encoded = self._encode(input_ids, image_inputs)
        _sync(input_ids.device)
        encoded_at = time.perf_counter()
        located = self._locate(input_ids, encoded)
        _refuse_masked_placeholders(located, encoded.layouts, mask)
        if "instruction" in self.selector.needs:
            encoded.instruction = self._instruction(input_ids, mask, located)
        kept = self._choose(encoded, located, input_ids, mask)
        _sync(input_ids.device)
        selected_at = time.perf_counter()
        call.update(self._shorten_prompt(call | image_inputs, mask, located, kept, for_generate))
        call["mm_encoder_outputs"] = self.adapter.encoder_outputs(encoded, kept.images)
        self._record(
            kept,
            located,
            encode_seconds=encoded_at - start,
            select_seconds=selected_at - encoded_at,
        )
        return call

    def _check_call(self, call: dict[str, Any], for_generate: bool) -> None:
        """Refuse a call this handle cannot prune, before the vision side runs (a hook:
        the pre-LM methods take every call)."""

    def _choose(
        self, encoded: EncodedImages, located: list[Tensor], input_ids: Tensor, mask: Tensor
    ) -> Kept:
        """The tokens the model gets: the selector's choice, before the language model."""
        return self.selector.select(encoded, self.adapter.projector(self.model))

    def _record(
        self, kept: Kept, located: list[Tensor], *, encode_seconds: float, select_seconds: float
    ) -> None:
        """Record the choice in ``self.selection`` (the observers hear of it after)."""
        self.selection = selection_record(
            kept,
            located,
            self.method.name,
            self.budget,
            encode_seconds=encode_seconds,
            select_seconds=select_seconds,
        )

    def _locate(self, input_ids: Tensor, encoded: EncodedImages) -> list[Tensor]:
        """Each item's placeholders, in the order of ``encoded.layouts``: the images'
        among the image tokens, the videos' among the video tokens (the model fills each
        kind in its own order, whatever order the adapter lists the kinds in)."""
        per_kind: dict[str, Iterator[Tensor]] = {}
        for kind in ITEM_KINDS:
            counts = [layout.placeholders for layout in encoded.layouts if layout.kind == kind]
            token = self.adapter.placeholder_id(self.model, kind)
            if counts and token is None:
                raise RuntimeError(
                    f"{type(self.adapter).__name__} encoded {len(counts)} {kind}(s) but names "
                    f"no {kind} placeholder token (placeholder_id(model, {kind!r}) is None)"
                )
            if counts or token is not None:  # no items: their tokens must be absent too
                per_kind[kind] = iter(locate_images(input_ids, token, counts, kind))
        # Each run's every slot, separators that are prompt text (Mistral 3) included.
        return [layout.run_positions(next(per_kind[layout.kind])) for layout in encoded.layouts]

    def _instruction(self, input_ids: Tensor, mask: Tensor, located: list[Tensor]) -> list[Tensor]:
        """Per item, the model's input embeddings of the text tokens of the prompt that
        holds it: every attended token that is no image or video placeholder (template,
        special and marker tokens included; the whole prompt as the call passes it)."""
        text = self._text_tokens(input_ids, mask)
        embed = self.model.get_input_embeddings()
        prompts = {int(row[0]) for row, _ in located}
        with torch.no_grad():  # only ranked: no graph to keep
            embedded = {p: embed(input_ids[p][text[p]]) for p in prompts}
        return [embedded[int(row[0])] for row, _ in located]

    def _text_tokens(self, input_ids: Tensor, mask: Tensor) -> Tensor:
        """``[B, L]`` True at every attended token that is no image or video placeholder."""
        text = mask != 0
        for kind in ITEM_KINDS:
            token = self.adapter.placeholder_id(self.model, kind)
            if token is not None:
                text &= input_ids != token
        return text

    def _encode(self, input_ids: Tensor, image_inputs: dict[str, Any]) -> EncodedImages:
        # The caller's grad mode: training through a pruned model reaches the vision side.
        prompt = {"input_ids": input_ids} if self.adapter.reads_prompt else {}
        return self.adapter.encode(self.model, image_inputs, self.selector.needs, **prompt)

    def _shorten_prompt(
        self,
        call: dict[str, Any],
        mask: Tensor,
        located: list[Tensor],
        kept: Kept,
        for_generate: bool,
    ) -> dict[str, Tensor]:
        """The call's sequences without the dropped placeholders, re-padded, with the
        positions the model is to use (``self.positions``, in the adapter's form)."""
        input_ids = call["input_ids"]
        keep = torch.ones_like(input_ids, dtype=torch.bool)
        for kind in ITEM_KINDS:
            token = self.adapter.placeholder_id(self.model, kind)
            if token is not None:
                keep &= input_ids != token
        for (row, col), image in zip(located, kept.images, strict=True):
            slots = image.slots.to(row.device)
            keep[row, col] = False  # the whole run: text separators go unless kept
            keep[row[slots], col[slots]] = True
        positions = call.get("position_ids")
        if positions is None:
            positions = self.adapter.unpruned_positions(self.model, call, mask)
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
        shortened = shrink(keep, sequences, pad_values, padding_side(mask))
        shortened["position_ids"] = self.adapter.pruned_positions(
            self.model, shortened["position_ids"], shortened["attention_mask"]
        )
        return shortened


class _CallersPromptStreamer:
    """Hands a streamer the caller's prompt where ``generate`` puts the shortened one.

    ``generate`` puts the prompt first, then each new token; only the first put differs.
    """

    def __init__(self, streamer: Any, prompt: Tensor) -> None:
        self.streamer = streamer
        self.prompt = prompt
        self.started = False

    def put(self, value: Tensor) -> None:
        if not self.started:
            self.started = True
            value = self.prompt.to(value.device)
        self.streamer.put(value)

    def end(self) -> None:
        self.streamer.end()

    def __getattr__(self, name: str) -> Any:
        if name in ("streamer", "prompt", "started"):
            raise AttributeError(name)
        return getattr(self.streamer, name)


def _refuse_masked_placeholders(
    located: list[Tensor], layouts: list[ImageLayout], mask: Tensor
) -> None:
    """Pruning decides which visual tokens the model sees: none may be masked out already."""
    for name, layout, (row, col) in zip(item_names(layouts), layouts, located, strict=True):
        hidden = int((mask[row, col] == 0).sum())
        if hidden:
            # Mistral 3's runs hold its [IMG_BREAK] text tokens too: they count here.
            what = "placeholder (or separator)" if layout.text_separators else "placeholder"
            raise PruneError(
                f"{name}: {hidden} of its {col.numel()} {what} tokens are masked out by "
                "attention_mask; pruning chooses which visual tokens the model sees, so pass "
                "the attention_mask the processor made (all placeholders attended)"
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
