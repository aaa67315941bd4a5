"""The stage inside the language model: FastV drops visual tokens between decoder layers.

zooprune chooses tokens at one of two insertion points. The pipeline
(``zooprune.pipeline``) chooses *before* the language model: the dropped placeholders
never enter it. This stage chooses *inside* it, as FastV ("An Image is Worth 1/2 Tokens
After Layer 2", Chen et al., ECCV 2024) does: ``zooprune.prune(model, "fastv", keep=K)``
(or ``ratio=``) with ``layer=`` (default 2).

What it computes. With ``layer=K`` (FastV's K; 0-based decoder layer indices below):

- Layers ``0 .. K-1`` run on every token of the prompt, as unpruned.
- Layer ``K-1`` (the last one that sees every token) gives the ranking: the attention
  that the last prompt token pays every token, ``softmax(q k^T / sqrt(d))`` over all the
  keys it sees (text included, as FastV's code takes the layer's attention weights),
  averaged over the heads. The stage computes that one query row itself from the
  layer's own input norm, q / k projections and RoPE, so the layer keeps running SDPA
  (no ``output_attentions``). FastV's code does the same with ``idx == AGG_LAYER``
  reading ``layer_outputs[1]``: the weights of the layer before.
- Each image keeps its top ``K_img`` visual tokens by that score (``keep=`` / ``ratio=``
  per image, as for every method; ties to the lower index); its other visual tokens are
  dropped from the hidden states after layer ``K-1``, so layers ``K ..`` neither compute
  them nor attend to them, and they never enter those layers' KV cache.
- Kept tokens keep their original positions (their RoPE rotations are gathered with
  them), and so does every later token: the stage drops tokens, it never renumbers. In
  1-based counting ("after layer 2"), the first K layers see all tokens and layers K+1..
  see the kept ones. ``layer`` may equal the model's depth: then no layer is pruned and
  only the outputs of the dropped tokens go (the ranking still runs).

So the pruned forward equals the unpruned forward with the dropped visual tokens masked
out of attention in layers ``K ..`` (their own outputs discarded); ``tests/test_fastv.py``
checks exactly that, with a reference that masks those keys in the unpruned model.

Several stages (PyramidDrop, ``zooprune.select.pdrop``): a method declares the first layer
``K_s`` of each stage and how many tokens each keeps (``MethodSpec.stages``). Stage s ranks
the tokens still held at layer ``K_s - 1`` (on the rows the earlier stages left, the query
found by its column) and drops after it; each group of layers ``K_s .. K_{s+1} - 1`` gets
the rows, mask and positions of what stage s left, and its own cached-step mask.
``tests/test_pdrop.py`` checks it against masking each stage's drops from ``K_s`` on.

How (per model instance, reversible). :class:`LMStageHandle` is the handle
``zooprune.prune`` returns for a method that ``needs=("lm_stage",)``. Like every handle it
wraps ``forward`` / ``generate`` of that instance; a pruned call encodes the images through
the family's adapter and hands them to the model with *no* placeholder removed (the
adapter's explicit positions, e.g. Qwen's 3-D M-RoPE ones), and arms the stage with where
each image's visual tokens sit, its budget and the ranking query (each row's last
attended token). :class:`FastVStage` holds forward hooks on that instance's text model
(``model.model.language_model``), registered by the handle and removed by ``remove()``;
no class is patched and no module is replaced:

- a pre-hook on the text model notes each call: the armed prompt's prefill, or a cached
  step of a cache that the stage pruned, or neither (then every hook passes through);
- a pre-hook on layer ``K-1`` ranks (prefill only), and a hook on its output drops the
  tokens, re-padding the shortened rows on the side the prompt was padded on;
- a pre-hook on each layer ``K ..`` hands it what fits the shortened rows: the causal
  mask built by transformers' own ``create_causal_mask`` sized against *that* group's
  cache layer (``layer_idx=K``), and, at the prefill, the kept tokens' position
  embeddings and ids.

The KV cache: a ``DynamicCache`` keeps per-layer tensors, so layers ``< K`` hold the whole
prompt and layers ``>= K`` only the kept tokens, and nothing is copied. At a cached step
the model builds one mask from its 2-D attention mask against layer 0 (the whole
prompt): right for layers ``< K``. Layers ``>= K`` get the mask of the shortened prompt
(the prefill's kept columns) followed by the columns of the tokens generated since. The
stage remembers each cache it pruned (weakly); a cache made under the stage is good only
while the handle is attached.

What the caller sees: ``forward`` returns logits for the kept positions only (the prompt
re-padded like the pre-LM methods'), ``generate`` returns the caller's prompt and the new
tokens, and ``handle.selection`` records per image the kept indices and the attention
score of every visual token (``details["layer"]``), filled in once the language model
has ranked (observers are told then). :meth:`LMStageHandle.query_at` makes a forward
rank by another token than the last one (e.g. the last prompt token when an answer is
appended, as ``generate`` ranks).

Scope: the families whose adapter declares ``extras["lm_stage"]`` (LLaVA-1.5's
``LlavaForConditionalGeneration``, Qwen2-VL, Qwen2.5-VL), when their language model is a
plain full-attention decoder (pre-norm ``input_layernorm``, ``q_proj`` / ``k_proj``, no
q/k norm, rotate-half RoPE over the whole head, no sliding-window or chunked layers,
whether declared by ``layer_types`` or, as Mistral's configs do, by ``sliding_window`` /
``attention_chunk_size``), with images (a call with videos is refused), a
``DynamicCache``, one sequence per prompt (no beam search, no ``num_return_sequences``)
and no ``labels`` (the logits cover the kept positions only). ``positions=`` other than
``"original"`` and the family's layout options (e.g. ``video_budget``) are refused at
``zooprune.prune``: the stage never renumbers, and it ranks each image as one set.
Anything else is refused with a :class:`~zooprune.errors.PruneError`; where the model
cannot run the stage at all, at ``zooprune.prune``, and otherwise before the vision
encoder runs, except what only the language model's call shows (its cache, a chunked
prefill).
"""

from __future__ import annotations

import bisect
import contextlib
import functools
import time
import weakref
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from transformers.cache_utils import Cache, DynamicLayer
from transformers.masking_utils import create_causal_mask

from zooprune.adapters import ADAPTERS
from zooprune.adapters.base import Adapter, padding_side
from zooprune.capabilities import language_model, unsupported
from zooprune.errors import PruneError
from zooprune.handle import Positions, PruneHandle
from zooprune.pipeline import EncodedImages, Kept, KeptImage, Selector, selection_record
from zooprune.select import METHODS
from zooprune.select.fastv import query_attention, top_k_ascending
from zooprune.select.ops import all_finite

__all__ = ["LMStage", "LMStageHandle", "Plan", "language_model"]


# -- which models have the stage (zooprune.capabilities decides) -------------------------


def _supported_classes() -> str:
    return ", ".join(
        cls.__name__
        for adapter in ADAPTERS.values()
        if adapter.extras.get("lm_stage")
        for cls in adapter.model_classes
    )


# -- what the handle hands the stage, and what the stage gives back ---------------------


@dataclass(frozen=True)
class Plan:
    """What a pruned call asks of the stage for its prompt.

    Attributes:
        length: L, the prompt's length (the prefill must run all of it at once).
        mask: ``[B, L]`` the prompt's 2-D attention mask (ones where none was given).
        query: ``[B]`` the column of each row's ranking query (its last attended token).
        images: per image, ``(row, columns, keeps)``: its prompt row, ``[N]`` the columns
            of its visual tokens in token order, and how many it keeps at each stage.
        raters: per image, the prompt columns of the text tokens whose attention ranks it
            (averaged), or None: the row's query ranks it (as for every image if absent).
    """

    length: int
    mask: Tensor
    query: Tensor
    images: list[tuple[int, Tensor, tuple[int, ...]]]
    raters: list[Tensor | None] | None = None


@dataclass(frozen=True)
class Ranking:
    """The stage's outcome at a prefill: per image ``(kept [K] ascending, scores [N])``
    (the first stage's scores, of every token), and per stage each image's kept indices."""

    picks: list[tuple[Tensor, Tensor]]
    stages: list[list[Tensor]]
    seconds: float


@dataclass(frozen=True)
class _Shortened:
    """The rows after a drop: ``index [B, L']`` the prompt column each slot holds (new
    padding slots hold column 0, masked), ``mask [B, L']`` their attention mask, ``slots
    [B, L]`` the slot of each prompt column (-1 where dropped)."""

    index: Tensor
    mask: Tensor
    slots: Tensor


@dataclass(frozen=True)
class _Prefix:
    """A pruned cache's prompt: L columns before the first stage, ``masks[s] [B, L_s]``
    from stage s's first layer on."""

    length: int
    masks: list[Tensor]


@dataclass
class _Call:
    """One text-model call the stage acts on: a prefill (``plan``) or a cached step
    (``prefix``); ``mask`` is the 2-D attention mask the text model got. At a prefill,
    ``keep [B, L]`` marks the prompt columns still held, ``shortened`` the rows after each
    stage so far, ``relative`` where the latest stage's rows sit in the rows before it."""

    mask: Any
    plan: Plan | None = None
    prefix: _Prefix | None = None
    keep: Tensor | None = None
    shortened: list[_Shortened] = field(default_factory=list)
    relative: Tensor | None = None
    picks: list[list[Tensor]] = field(default_factory=list)
    first_scores: list[Tensor] = field(default_factory=list)
    seconds: float = 0.0
    redirect: dict[int, dict[str, Any]] = field(default_factory=dict)


# -- the stage ----------------------------------------------------------------------------


class LMStage:
    """An in-LM method's hooks on one text model. For each stage s with first layer
    ``K_s``: rank at layer ``K_s - 1``, drop after it; layers ``K_s ..`` (up to the next
    stage) get the rows, masks and positions of what is held.

    :meth:`attach` registers the hooks and :meth:`detach` removes them; :meth:`arm`
    hands the next text-model call (a prompt's prefill) its :class:`Plan`. Between calls
    the stage holds only the caches it pruned (weakly) and the last :class:`Ranking`.
    """

    def __init__(self, text_model: nn.Module, layers: Sequence[int], method: str = "fastv") -> None:
        self.text = text_model
        self.layers = tuple(layers)
        self.method = method
        self.result: Ranking | None = None
        self._hooks: list[Any] = []
        self._armed: Plan | None = None
        self._call: _Call | None = None
        self._prefixes: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()

    # A copy (deepcopy, pickle) of a pruned model carries the hooks, not the per-call
    # state nor the caches this stage pruned.
    def __getstate__(self) -> dict[str, Any]:
        transient = ("result", "_armed", "_call", "_prefixes")
        return {k: v for k, v in self.__dict__.items() if k not in transient}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self.result = self._armed = self._call = None
        self._prefixes = weakref.WeakKeyDictionary()

    def attach(self) -> None:
        hooks = [
            self.text.register_forward_pre_hook(self._on_call, with_kwargs=True),
            self.text.register_forward_hook(self._after_call),
        ]
        for index, layer in enumerate(self.text.layers):
            group = bisect.bisect_right(self.layers, index)  # stages this layer is past
            if group:  # first: a ranking layer reads the rows its group holds
                redirect = functools.partial(self._redirect, group)
                hooks.append(layer.register_forward_pre_hook(redirect, with_kwargs=True))
            if index + 1 in self.layers:
                stage = self.layers.index(index + 1)
                rank = functools.partial(self._rank, stage)
                hooks.append(layer.register_forward_pre_hook(rank, with_kwargs=True))
                hooks.append(layer.register_forward_hook(functools.partial(self._drop, stage)))
        self._hooks = hooks

    def detach(self) -> None:
        for hook in self._hooks:
            hook.remove()
        self._hooks = []
        self._armed = self._call = None

    def arm(self, plan: Plan | None) -> None:
        """The next text-model call is ``plan``'s prefill (None: no call is)."""
        self._armed = plan
        self.result = None

    # -- hooks ------------------------------------------------------------------------

    def _on_call(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        plan, self._armed = self._armed, None
        cache = kwargs.get("past_key_values")
        mask = kwargs.get("attention_mask")
        if plan is not None:
            self._call = _Call(mask, plan=plan)
        elif isinstance(cache, Cache) and cache in self._prefixes:
            if mask is not None and not (isinstance(mask, Tensor) and mask.ndim == 2):
                raise PruneError(
                    f"a cached step after {self.method} needs a 2-D attention_mask (or none); "
                    "the later layers' masks are rebuilt from it"
                )
            self._call = _Call(mask, prefix=self._prefixes[cache])
        else:
            self._call = None

    def _after_call(self, module: nn.Module, args: tuple, output: Any) -> None:
        self._call = None

    def _rank(self, stage: int, layer: nn.Module, args: tuple, kwargs: dict) -> None:
        call = self._call
        if call is None or call.plan is None or len(call.shortened) != stage:
            return
        plan = call.plan
        hidden = args[0] if args else kwargs["hidden_states"]
        device = hidden.device
        cache = kwargs.get("past_key_values")
        if stage == 0:
            if hidden.shape[1] != plan.length:
                raise PruneError(
                    f"{self.method} ranks the whole prompt at once, but the language model got "
                    f"{hidden.shape[1]} of its {plan.length} tokens (chunked prefill?)"
                )
            if cache is not None:
                _check_cache(cache, self.layers[0] - 1, self.method)
            call.keep = torch.ones(plan.mask.shape, dtype=torch.bool, device=device)
        start = time.perf_counter()
        # where each prompt column sits in the rows now held (-1: dropped)
        if stage == 0:
            slot = torch.arange(plan.length, device=device).expand(hidden.shape[0], -1)
            mask = plan.mask.to(device)
        else:
            held = call.shortened[-1]
            slot, mask = held.slots, held.mask
        # Each image's ranking queries: its raters, or its row's query; one pass for all.
        queries = []
        for image, (row, _, _) in enumerate(plan.images):
            raters = None if plan.raters is None else plan.raters[image]
            if raters is None or raters.numel() == 0:
                queries.append(slot[row, plan.query[row].to(device)].reshape(1))
            else:
                queries.append(slot[row, raters.to(device)])
        rows = torch.cat(
            [torch.full_like(q, row) for q, (row, _, _) in zip(queries, plan.images, strict=True)]
        )
        with torch.no_grad():  # scores are only ranked
            attention = _query_attention(
                layer, hidden, kwargs["position_embeddings"], mask, rows, torch.cat(queries)
            )
        per_image = attention.split([q.numel() for q in queries])
        keep = call.keep
        picks = []
        for (row, columns, keeps), rated in zip(plan.images, per_image, strict=True):
            columns = columns.to(device)
            present = keep[row, columns].nonzero().flatten()  # indices into the image's N
            # a single query's row, or the raters' rows averaged
            scores = rated.mean(dim=0)[slot[row, columns[present]]]
            if not all_finite(scores):
                raise PruneError(
                    f"{self.method}'s attention scores of prompt {row}'s image are NaN or "
                    f"infinite at layer {self.layers[stage] - 1}"
                )
            kept = present[top_k_ascending(scores, keeps[stage])]
            dropped = torch.ones(columns.numel(), dtype=torch.bool, device=device)
            dropped[kept] = False
            keep[row, columns[dropped]] = False
            picks.append(kept)
            if stage == 0:
                call.first_scores.append(scores)
        shortened = _shorten(keep, plan.mask.to(device))
        # the slot each new row's column held before (a new padding slot: any, masked)
        call.relative = shortened.index if stage == 0 else _gather(slot, shortened.index)
        call.relative = call.relative.clamp_min(0)
        call.shortened.append(shortened)
        call.picks.append(picks)
        call.seconds += time.perf_counter() - start
        if cache is not None:
            self._prefixes[cache] = _Prefix(plan.length, [s.mask for s in call.shortened])
        if stage == len(self.layers) - 1:
            self.result = Ranking(
                list(zip(picks, call.first_scores, strict=True)), call.picks, call.seconds
            )

    def _drop(self, stage: int, layer: nn.Module, args: tuple, output: Any) -> Any:
        call = self._call
        if call is None or call.plan is None or len(call.shortened) != stage + 1:
            return None
        if isinstance(output, tuple):
            return (_gather(output[0], call.relative), *output[1:])
        return _gather(output, call.relative)

    def _redirect(self, group: int, layer: nn.Module, args: tuple, kwargs: dict) -> Any:
        call = self._call
        if call is None or (call.plan is not None and len(call.shortened) < group):
            return None
        if group not in call.redirect:  # the same for every layer of the group
            hidden = args[0] if args else kwargs["hidden_states"]
            call.redirect[group] = self._group_inputs(call, group, hidden, kwargs)
        return args, kwargs | call.redirect[group]

    def _group_inputs(self, call: _Call, group: int, hidden: Tensor, kwargs: dict) -> dict:
        """What the layers of stage ``group - 1`` (from ``K_group`` to the next stage) get
        instead of the model's own mask (and, at a prefill, positions) for this call."""
        cache = kwargs.get("past_key_values")
        first = self.layers[group - 1]
        if call.plan is not None:  # the prefill: the rows that stage left
            shortened = call.shortened[group - 1]
            cos, sin = kwargs["position_embeddings"]
            redirect: dict[str, Any] = {
                "attention_mask": self._mask(hidden, shortened.mask, cache, first),
                "position_embeddings": (
                    _gather(cos, shortened.index),
                    _gather(sin, shortened.index),
                ),
            }
            ids = kwargs.get("position_ids")
            if isinstance(ids, Tensor) and ids.ndim == 2 and ids.shape[-1] == call.plan.length:
                redirect["position_ids"] = _gather(ids, shortened.index)
            return redirect
        prefix = call.prefix  # a cached step: the shortened prompt, then what came since
        held = prefix.masks[group - 1]
        if call.mask is not None:
            since = call.mask[:, prefix.length :]
        else:
            seen = cache.layers[first].get_seq_length() - held.shape[1]
            since = torch.ones(hidden.shape[0], seen + hidden.shape[1], device=hidden.device)
        mask = torch.cat([held.to(since.device, since.dtype), since], dim=-1)
        return {"attention_mask": self._mask(hidden, mask, cache, first)}

    def _mask(self, hidden: Tensor, mask: Tensor, cache: Cache | None, layer: int) -> Any:
        """The model's own kind of causal mask for the 2-D ``mask`` of a group whose first
        layer is ``layer``, sized against that layer's cache."""
        return create_causal_mask(
            config=self.text.config,
            inputs_embeds=hidden,
            attention_mask=mask,
            past_key_values=cache,
            position_ids=None,
            layer_idx=layer,
        )


def _check_cache(cache: Any, layer: int, method: str) -> None:
    """The stage keeps layer groups of different lengths: only plain dynamic layers can."""
    layers = getattr(cache, "layers", None)
    if not isinstance(cache, Cache) or not layers:
        raise PruneError(
            f"{method} needs a DynamicCache of full-attention layers (the default), not a "
            f"{type(cache).__name__}: its later layers hold fewer tokens than its first ones"
        )
    other = sorted({type(c).__name__ for c in layers if type(c) is not DynamicLayer})
    if other:
        raise PruneError(
            f"{method} needs a cache of plain DynamicLayer layers (a DynamicCache of a "
            f"full-attention model, the default), but this {type(cache).__name__} has "
            f"{', '.join(other)} layers: its later layers hold fewer tokens than its first ones"
        )
    if cache.get_seq_length(layer) > 0:
        raise PruneError(
            f"{method} ranks a prompt from an empty cache; this one holds tokens already"
        )


def _rotate(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """RoPE as the decoders apply it (rotate-half form)."""
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin


def _query_attention(
    layer: nn.Module,
    hidden: Tensor,
    position_embeddings: tuple[Tensor, Tensor],
    mask: Tensor,
    rows: Tensor,
    slots: Tensor,
) -> Tensor:
    """``[Q, L]`` the head-averaged attention of Q query tokens, the one at slot
    ``slots[i]`` of prompt row ``rows[i]``, to every slot of its row (softmax over the
    keys it sees: causal and ``mask``ed), in ``layer``, from the layer's own norm,
    projections and RoPE (what its attention computes). Keys are computed once per row."""
    attention = layer.self_attn
    batch, length, _ = hidden.shape
    device = hidden.device
    rows, slots = rows.to(device), slots.to(device)
    cos, sin = position_embeddings
    if cos.ndim != 3:
        raise PruneError(
            f"the in-LM stage expects [B, L, d] rotary embeddings, got {tuple(cos.shape)}"
        )
    dim = attention.head_dim
    if cos.shape[-1] != dim:  # prune() refuses partial rotary; this guards the math
        raise PruneError(
            f"the in-LM stage rotates whole heads of {dim}, but the rotary embedding covers "
            f"{cos.shape[-1]}"
        )
    cos, sin = cos.expand(batch, -1, -1), sin.expand(batch, -1, -1)
    normed = layer.input_layernorm(hidden)
    q = attention.q_proj(normed[rows, slots]).view(slots.numel(), -1, dim)
    k = attention.k_proj(normed).view(batch, length, -1, dim).transpose(1, 2)
    q = _rotate(q, cos[rows, slots][:, None], sin[rows, slots][:, None])
    k = _rotate(k, cos[:, None], sin[:, None])
    seen = torch.arange(length, device=device)[None] <= slots[:, None]
    allowed = mask.to(device).bool()[rows] & seen
    return query_attention(q, k[rows], allowed, attention.scaling)


def _shorten(keep: Tensor, mask: Tensor) -> _Shortened:
    """The rows without the dropped columns, re-padded on the prompt's padding side."""
    lengths = keep.sum(dim=-1)
    width = int(lengths.max())
    slot = keep.long().cumsum(dim=-1) - 1
    if padding_side(mask) == "left":
        slot = slot + (width - lengths)[:, None]
    rows, cols = keep.nonzero(as_tuple=True)
    index = torch.zeros(keep.shape[0], width, dtype=torch.long, device=keep.device)
    index[rows, slot[rows, cols]] = cols
    shortened = torch.zeros(keep.shape[0], width, dtype=mask.dtype, device=keep.device)
    shortened[rows, slot[rows, cols]] = mask[rows, cols]
    return _Shortened(index, shortened, slot.masked_fill(~keep, -1))


def _gather(values: Tensor, index: Tensor) -> Tensor:
    """``values [B or 1, L, ...]`` at ``index [B, L']`` along the sequence."""
    values = values.expand(index.shape[0], *values.shape[1:])
    rows = torch.arange(index.shape[0], device=index.device)[:, None]
    return values[rows, index.to(values.device)]


# -- the handle ---------------------------------------------------------------------------


@dataclass
class _Pending:
    """A prepared call waiting for the language model's ranking (``encode_seconds`` is
    filled in when the handle records it)."""

    plan: Plan
    everything: Kept
    projected: list[Tensor]
    located: list[Tensor]
    encode_seconds: float = 0.0


class LMStageHandle(PruneHandle):
    """A :class:`~zooprune.handle.PruneHandle` whose method chooses inside the language
    model (FastV, PyramidDrop). The prompt reaches the model whole; :class:`LMStage`
    drops tokens at each of the method's stages. ``remove()`` detaches its hooks too.

    Attributes:
        stage: the :class:`LMStage` on this model's text model.
    """

    def __init__(
        self, model: nn.Module, adapter: Adapter, selector: Selector, positions: Positions
    ) -> None:
        layers = self.check(model, adapter, selector)
        self.stage = LMStage(language_model(model), layers, selector.method.name)
        self._pending: _Pending | None = None
        self._query: Tensor | None = None
        # Tokens are dropped after the positions are fixed: the kept ones keep theirs.
        super().__init__(model, adapter, selector, "original")
        self.stage.attach()

    @staticmethod
    def check(
        model: nn.Module,
        adapter: Adapter,
        selector: Selector,
        positions: str | None = None,
        options: dict[str, Any] | None = None,
    ) -> list[int]:
        """Refuse a model whose language model cannot run the stage (naming the models
        that can, and the methods that apply), stages past its depth, ``positions`` other
        than ``"original"`` and any of the family's layout ``options``; else each stage's
        first layer. ``zooprune.prune`` calls it before anything is attached."""
        method = selector.method.name
        if positions not in (None, "original"):
            raise PruneError(
                f"{method!r} keeps every token's original position (it drops tokens inside "
                f"the language model and never renumbers), so positions={positions!r} does "
                "not apply; leave positions unset or pass 'original'"
            )
        layout = sorted(set(options or {}) & set(adapter.options))
        if layout:
            raise PruneError(
                f"{method!r} ranks each image's tokens as one set inside the language model "
                f"and refuses videos, so the layout option(s) {', '.join(layout)} do not apply"
            )
        name = type(model).__name__
        text = language_model(model)
        reason = unsupported(text)
        if not adapter.extras.get("lm_stage") or reason is not None:
            available = adapter.available(model)
            usable = sorted(m for m, spec in METHODS.items() if spec.needs_for({}) <= available)
            raise PruneError(
                f"method {method!r} runs inside the language model, which this "
                f"{name} does not allow ({reason or 'its family has no in-LM stage'}); models "
                f"that can: {_supported_classes()}; methods that apply: {', '.join(usable)}"
            )
        options = selector.method.options | selector.options
        depth = len(text.layers)
        if "layer" in options and options["layer"] > depth:
            layer = options["layer"]
            raise PruneError(
                f"layer={layer} is past the {depth} decoder layers of this {name}'s language "
                f"model; layer must be in [1, {depth}]"
            )
        layers = selector.method.stages.layers(options, depth)
        rising = all(a < b for a, b in zip([0, *layers], layers, strict=False))
        if not rising or layers[-1] > depth:
            shown = ", ".join(f"{k}={v}" for k, v in selector.options.items()) or "the defaults"
            raise PruneError(
                f"{method!r} with {shown} would start its stages at layers {layers}, which "
                f"{name}'s {depth}-layer language model cannot hold (each stage needs at "
                "least one layer of its own); use fewer stages"
            )
        return layers

    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__()
        return {k: v for k, v in state.items() if k not in ("_pending", "_query")}

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self._pending = self._query = None

    def remove(self) -> None:
        if not self.removed:
            self.stage.detach()
        super().remove()

    @contextlib.contextmanager
    def query_at(self, columns: int | Sequence[int] | Tensor) -> Iterator[None]:
        """Within the block, a pruned ``forward`` ranks by the token at ``columns`` (one
        per prompt row, or one for all) instead of each row's last attended token.

        ``generate`` ranks by the last prompt token; to score tokens appended to a prompt
        as it would (or to run its uncached loop), rank by the prompt's last column.
        """
        self._query = _query_tensor(columns)
        try:
            yield
        finally:
            self._query = None

    def prepare(self, inputs: dict[str, Any], *, for_generate: bool = True) -> dict[str, Any]:
        raise PruneError(
            f"{self.method.name!r} chooses tokens inside the language model, so there are no "
            "pruned arguments to hand over: call the model's forward / generate"
        )

    @contextlib.contextmanager
    def _observed(self) -> Iterator[None]:
        # A refusal while preparing is told here; the selection only once the language
        # model has ranked (in _run).
        try:
            yield
        except Exception as error:
            self._tell(None, error)
            raise

    def _tell(self, selection: Any, error: Exception | None) -> None:
        for observer in self._observers:
            observer(selection, error)

    def _run(self, name: str, prepared: dict[str, Any]) -> Any:
        pending, self._pending = self._pending, None
        self.stage.arm(pending.plan)
        try:
            output = super()._run(name, prepared)
            ranking = self.stage.result
            if ranking is None:
                raise PruneError(
                    f"the language model never ran the prompt, so {self.method.name} ranked nothing"
                )
        except PruneError as error:
            self._tell(None, error)
            raise
        finally:
            self.stage.arm(None)
        self.selection = self._selection(pending, ranking)
        self._tell(self.selection, None)
        return output

    def _selection(self, pending: _Pending, ranking: Ranking) -> Any:
        """The record of a call, once the language model has ranked."""
        images = []
        for image, projected, (kept, scores) in zip(
            pending.everything.images, pending.projected, ranking.picks, strict=True
        ):
            kept = kept.to(projected.device)
            slots, run, separators = image.layout.assemble(kept, projected[kept], "all")
            images.append(
                KeptImage(kept, scores.float(), slots, run, separators, image.layout, image.grid)
            )
        if self.method.name == "fastv":
            details: dict[str, Any] = {"layer": self.stage.layers[0]}
        else:
            details = {
                "layers": list(self.stage.layers),
                # per stage, each image's token indices still held after it
                "stages": [[kept.tolist() for kept in stage] for stage in ranking.stages],
            }
        if pending.plan.raters is not None:  # each image's raters, as prompt columns
            details["raters"] = [
                None if raters is None else raters.tolist() for raters in pending.plan.raters
            ]
        kept = Kept(images, details)
        return selection_record(
            kept,
            pending.located,
            self.method.name,
            self.budget,
            encode_seconds=pending.encode_seconds,
            select_seconds=ranking.seconds,
        )

    # -- PruneHandle._prepare's hooks: the whole prompt goes in, the stage is planned ----

    def _check_call(self, call: dict[str, Any], for_generate: bool) -> None:
        if call.get("labels") is not None:
            raise PruneError(
                f"{self.method.name!r} drops tokens inside the language model, so the logits "
                "cover the kept positions only and labels cannot be aligned with them; compute "
                "the loss from the logits (handle.selection says which positions are kept)"
            )
        if for_generate:
            # generate() would run beams * sequences rows for each prompt; the stage plans
            # one per prompt.
            config = call.get("generation_config") or self.model.generation_config
            for option in ("num_beams", "num_return_sequences"):
                value = call.get(option)
                value = getattr(config, option, None) if value is None else value
                if value is not None and value > 1:
                    raise PruneError(
                        f"{self.method.name!r} ranks one sequence per prompt inside the "
                        f"language model, so generate() with {option}={value} is refused; "
                        "use greedy or sampled decoding with one sequence per prompt"
                    )
            # Without the cache every step runs the whole prompt again: only the first
            # would be pruned, and the rest would silently be the unpruned model's.
            use_cache = call.get("use_cache")
            if (getattr(config, "use_cache", True) if use_cache is None else use_cache) is False:
                raise PruneError(
                    f"{self.method.name!r} prunes inside the language model once, in the "
                    "prefill, and decodes from the kept tokens' cache: generate() with "
                    "use_cache=False would prune its first step only, so it is refused; "
                    "leave the cache on (the default)"
                )

    def _choose(
        self, encoded: EncodedImages, located: list[Tensor], input_ids: Tensor, mask: Tensor
    ) -> Kept:
        """Every token: the model gets the whole prompt. The stage's :class:`Plan` waits
        in ``self._pending`` for :meth:`_run`."""
        if any(layout.kind != "image" for layout in encoded.layouts):
            raise PruneError(f"{self.method.name!r} prunes images; this call holds videos")
        everything = Kept(
            [
                _whole(layout, projected, grid)
                for layout, projected, grid in zip(
                    encoded.layouts, encoded.projected, encoded.grids, strict=True
                )
            ]
        )
        images = [
            (
                int(row[0]),
                col[layout.token_slots.to(col.device)],
                self._keeps(layout.token_slots.numel(), i),
            )
            for i, ((row, col), layout) in enumerate(zip(located, encoded.layouts, strict=True))
        ]
        raters = None
        rate = self.method.stages.raters
        if rate is not None:
            raters = self._raters(rate, encoded, located, input_ids, mask)
        plan = Plan(input_ids.shape[1], mask, self._query_columns(mask), images, raters)
        self._pending = _Pending(plan, everything, encoded.projected, located)
        return everything

    def _raters(
        self,
        rate: Any,
        encoded: EncodedImages,
        located: list[Tensor],
        input_ids: Tensor,
        mask: Tensor,
    ) -> list[Tensor | None]:
        """Per image, the prompt columns of its raters among the text after it (None where
        no text follows: the row's query ranks it)."""
        text = self._text_tokens(input_ids, mask)
        embed = self.model.get_input_embeddings()
        raters: list[Tensor | None] = []
        for projected, (row, col) in zip(encoded.projected, located, strict=True):
            prompt = int(row[0])
            after = text[prompt].clone()
            after[: int(col.max()) + 1] = False
            columns = after.nonzero().flatten()
            if columns.numel() == 0:
                raters.append(None)
                continue
            with torch.no_grad():  # only ranked
                chosen = rate(projected.detach(), embed(input_ids[prompt, columns]))
            raters.append(columns[chosen.to(columns.device)])
        return raters

    def _keeps(self, n: int, image: int) -> tuple[int, ...]:
        """How many of an image's ``n`` tokens each stage keeps (the last: the budget's)."""
        k = self.budget.tokens_for(n, image)
        depth = len(self.stage.text.layers)
        options = self.method.options | self.options
        return tuple(kept for _, kept in self.method.lm_stages(options, n, k, depth))

    def _record(
        self, kept: Kept, located: list[Tensor], *, encode_seconds: float, select_seconds: float
    ) -> None:
        # Nothing is chosen yet: the selection is recorded once the language model ranked.
        self._pending.encode_seconds = encode_seconds

    def _query_columns(self, mask: Tensor) -> Tensor:
        """``[B]`` each row's ranking query: its last attended column, or ``query_at``'s."""
        batch, length = mask.shape
        if self._query is None:
            columns = torch.arange(length, device=mask.device).expand(batch, -1)
            return columns.masked_fill(mask == 0, -1).amax(dim=-1)
        if self._query.numel() not in (1, batch):
            raise PruneError(
                f"{self._query.numel()} query_at columns for {batch} prompts: give one "
                "column per prompt, or one for all"
            )
        query = self._query.to(mask.device).expand(batch).clone()
        query[query < 0] += length
        if bool(((query < 0) | (query >= length)).any()):
            raise PruneError(
                f"query_at columns {self._query.tolist()} are outside the {length}-token prompt"
            )
        if bool((mask[torch.arange(batch), query] == 0).any()):
            raise PruneError(f"query_at columns {query.tolist()} include a padding token")
        return query


def _query_tensor(columns: Any) -> Tensor:
    """``query_at``'s columns as a 0-D or 1-D long tensor.

    Raises:
        PruneError: anything but an int or a flat sequence of ints.
    """
    try:
        query = torch.as_tensor(columns)
    except (TypeError, ValueError, RuntimeError):
        query = None
    if (
        query is None
        or isinstance(columns, bool)
        or query.dtype in (torch.bool,)
        or query.is_floating_point()
        or query.is_complex()
        or query.ndim > 1
    ):
        raise PruneError(f"query_at takes one int column, or one per prompt, got {columns!r}")
    return query.long()


def _whole(layout: Any, projected: Tensor, grid: tuple[int, int]) -> KeptImage:
    """An image with every visual token kept: what the model gets before the stage."""
    indices = torch.arange(layout.token_slots.numel(), device=projected.device)
    slots, run, separators = layout.assemble(indices, projected, "all")
    return KeptImage(indices, None, slots, run, separators, layout, grid)
