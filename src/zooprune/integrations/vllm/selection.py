"""What every pruned vLLM model shares: its settings, the projector it scores, and the one
selection pipeline (:mod:`zooprune.pipeline`) over the tokens vLLM's tower and projector
made.

On a CPU vLLM repacks each Linear's weights after loading and leaves ``weight`` empty, and
under tensor parallelism each rank holds a shard: the projector the sensitivity methods
score is therefore rebuilt by the family (:mod:`zooprune.families`) from a plain copy of
the checkpoint's full tensors, taken while vLLM streams them in. Every rank then scores
the whole projector and keeps the same tokens.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import logging
import time
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from zooprune.budget import Budget
from zooprune.errors import PruneError
from zooprune.integrations.vllm import SETTINGS, VARIANTS, Variant
from zooprune.pipeline import EncodedImages, Kept, Selector, item_names
from zooprune.select import get_method
from zooprune.select.methods import MLP_ESTIMATORS
from zooprune.select.stages import StageClock, clocked
from zooprune.settings import LAYOUT_OPTIONS, Settings

logger = logging.getLogger(__name__)
#: what an item whose selection fails at run time keeps instead (it reads no values)
FALLBACK = "grid"
#: the modalities whose items may carry their request's own settings
REQUEST_MODALITIES = ("image", "video")


@dataclass
class Tally:
    """The selection work done in this process: images and seconds, in all and in the
    methods' stages (:mod:`zooprune.select.stages`: scoring, greedy; the rest is data
    movement and checks), and the threads it ran on."""

    images: int = 0
    seconds: float = 0.0
    scoring_s: float = 0.0
    greedy_s: float = 0.0
    #: torch's intra-op threads at the last selection
    threads: int = 0
    #: items whose selection failed at run time and fell back (see select_or_fall_back)
    fallbacks: int = 0
    synchronize: bool = False  # wait for a GPU's queued work on both sides of the timing

    def reset(self) -> None:
        self.images, self.seconds, self.fallbacks = 0, 0.0, 0
        self.scoring_s = self.greedy_s = 0.0

    def plus(self, other: Tally, sign: int = 1) -> Tally:
        """The work of both (``sign=-1``: this one's since ``other`` was copied from it);
        threads: ``self``'s with a minus, else ``other``'s."""
        return Tally(
            images=self.images + sign * other.images,
            seconds=self.seconds + sign * other.seconds,
            scoring_s=self.scoring_s + sign * other.scoring_s,
            greedy_s=self.greedy_s + sign * other.greedy_s,
            threads=self.threads if sign < 0 else other.threads,
            fallbacks=self.fallbacks + sign * other.fallbacks,
        )

    def per_image(self) -> dict[str, float] | None:
        """Seconds per image: ``selection`` in all, ``scoring``, ``greedy`` and
        ``data_movement`` (the rest), and ``threads``; None before any image."""
        if not self.images:
            return None
        rest = self.seconds - self.scoring_s - self.greedy_s
        return {
            "selection": self.seconds / self.images,
            "scoring": self.scoring_s / self.images,
            "greedy": self.greedy_s / self.images,
            "data_movement": rest / self.images,
            "threads": self.threads,
        }


#: read by the throughput benchmark (its engine runs in the benchmark's process)
TALLY = Tally()


def selector_from(
    settings: Mapping[str, Any],
    layout: Mapping[str, tuple[str, ...]] | None = None,
    positions: str | None = None,
    why: Mapping[str, str] | None = None,
) -> Selector:
    """The :class:`~zooprune.pipeline.Selector` the settings describe, every value checked,
    and the method one that a vLLM model can serve: one that needs nothing beyond the
    features, tokens and projector. Its towers fuse q/k/v, so they give neither the CLS
    attention nor the CLS state (``visionzip``); the prompt's text embeddings
    (``cdpruner``) and a stage inside the language model (``fastv``) are not offered.

    Args:
        layout: the layout options the family's variant can honour (none by default).
        positions: the one position mode the variant gives (vLLM numbers a 1-D prompt
            contiguously, ``"compact"``; M-RoPE families keep ``"original"``); settings
            asking for another are refused. None: the variant takes no ``positions``.
        why: for a layout option the variant takes only some values of, the reason (the
            refusal of another value gives it).
    """
    parsed = Settings.from_mapping(settings)
    if parsed.positions is not None and parsed.positions != positions:
        offered = f"only positions={positions!r}" if positions else "no positions setting"
        raise PruneError(
            f"positions={parsed.positions!r} cannot be served by vLLM here: this family "
            f"takes {offered}"
        )
    for name, reason in (why or {}).items():
        value, served = parsed.options.get(name), (layout or {}).get(name, ())
        if value is not None and value not in served:
            raise PruneError(
                f"{name}={value!r} cannot be served by vLLM for this family: {reason}; it "
                f"takes {name}={' or '.join(map(repr, served))}"
            )
    selector = parsed.selector(layout or {})
    selector.check_provided(frozenset(), "vLLM model")
    return selector


def layout_options(variant: Variant | None) -> dict[str, tuple[str, ...]]:
    """The layout options a declared variant honours, with their values."""
    if variant is None:
        return {}
    return {
        name: LAYOUT_OPTIONS[name] if values is None else values
        for name, values in variant.layout.items()
    }


def check_settings(settings: Mapping[str, Any], variant: Variant | None) -> Selector:
    """``settings`` checked as the declared ``variant`` checks them at engine start
    (without one: no layout option and no position mode)."""
    if variant is None:
        return selector_from(settings)
    return selector_from(settings, layout_options(variant), variant.positions, variant.why)


@functools.lru_cache(maxsize=64)
def _cached(settings: str, architecture: str) -> Selector:
    return check_settings(json.loads(settings), VARIANTS[architecture])


def selector_for(config: Any, architecture: str) -> Selector:
    """The selector from the settings a pruned variant's HF ``config`` carries, checked
    as the variant of ``architecture`` declares (its layout options, position mode);
    built once per settings (vLLM asks for the budget at every placeholder count)."""
    settings = settings_of(config)
    return _cached(json.dumps(dict(settings), sort_keys=True, default=str), architecture)


def requested_settings(
    config: Any, architecture: str, request: Any, mlp_projector: bool = False
) -> str:
    """One request's own settings (``mm_processor_kwargs["zooprune"]``) over those the
    pruned variant's HF ``config`` carries (:meth:`~zooprune.settings.Settings.overridden_by`),
    checked as the variant of ``architecture`` checks its own, an estimator only an MLP has
    refused unless ``mlp_projector`` (the model scores one): the canonical JSON the
    request's items carry to the model (:func:`request_field`).

    Raises:
        PruneError subclasses naming ``mm_processor_kwargs['zooprune']`` and what is wrong.
    """
    try:
        merged = Settings.from_mapping(settings_of(config)).overridden_by(request)
        text = json.dumps(merged.as_dict(), sort_keys=True, default=str)
        estimator = _cached(text, architecture).options.get("estimator")
        if estimator in MLP_ESTIMATORS and not mlp_projector:
            raise PruneError(
                f"estimator {estimator!r} needs a Linear -> GELU -> Linear projector, which "
                "this model does not score; use 'jvp' or 'zo'"
            )
    except PruneError as error:
        raise type(error)(f"mm_processor_kwargs[{SETTINGS!r}]: {error}") from None
    return text


def requested_selector(text: str, architecture: str) -> Selector:
    """The selector of settings :func:`requested_settings` made (built once per text)."""
    return _cached(text, architecture)


def request_field(modality: str) -> str:
    """The per-item field an item of ``modality`` carries its request's own settings in
    (present only where the request gave some)."""
    return f"{SETTINGS}_{modality}"


def request_tensor(text: str, items: int) -> Tensor:
    """``[items, L]``: the settings' text as bytes, one row per item of the request (a
    field travels as tensors, through the processor cache and into the engine)."""
    return torch.tensor(list(text.encode()), dtype=torch.uint8).expand(items, -1).clone()


def request_texts(value: Tensor | list[Tensor]) -> list[str]:
    """Each item's settings text from its field, as vLLM batches it (one ``[B, L]``
    tensor, or a list of rows where their lengths differ)."""
    rows = value.unbind(0) if isinstance(value, Tensor) else value
    return [bytes(row.tolist()).decode() for row in rows]


def budget_of(config: Any) -> Budget:
    """The budget the settings in a pruned variant's HF ``config`` give: what a processing
    info counts placeholders with (the whole selector is checked at engine start)."""
    settings = settings_of(config)
    return Budget(keep=settings.get("keep"), ratio=settings.get("ratio"))


def settings_of(config: Any) -> Mapping[str, Any]:
    """The settings a pruned variant's HF ``config`` carries (refused unless a mapping)."""
    settings = getattr(config, SETTINGS, None)
    if not isinstance(settings, Mapping):
        raise PruneError(f"the zooprune settings must be a dict, got {settings!r}")
    return settings


def refuse_embeddings(image_input: dict[str, Any]) -> None:
    """Pruning selects among the tower's tokens: precomputed embeddings are refused."""
    if image_input.get("type") in ("image_embeds", "embeds"):
        raise PruneError("pruning needs pixel values, not precomputed image embeddings")


def select_or_fall_back(selector: Selector, encoded: EncodedImages, projector: nn.Module) -> Kept:
    """``selector``'s choice for every item of an encoder batch, where an item whose
    selection can only fail once it is encoded (NaN or infinite features or tokens, scores
    that rank nothing) falls back alone: :data:`FALLBACK` over its values with NaN and inf
    zeroed, logged and counted in :data:`TALLY`. Inside the engine an exception would stop
    it for every request; this way a bad image costs its own request's answer only. The
    other items keep what they keep in the batch (a batch selects as its items alone)."""
    try:
        return selector.select(encoded, projector)
    except PruneError:  # NonFiniteFeaturesError among them: every setting was checked at start
        pass
    method = get_method(FALLBACK)
    fallback = dataclasses.replace(
        selector, method=method, options=method.resolve_options({}, selector.budget.keep)
    )
    names = item_names(encoded.layouts)
    images, details = [], {}
    for i in range(len(encoded.layouts)):
        try:
            kept = selector.select(encoded.item(i), projector)
        except PruneError as error:
            kept = fallback.select(encoded.item(i, finite=True), projector)
            TALLY.fallbacks += 1
            logger.warning(
                "zooprune: %s of an encoder batch of %d keeps %s's tokens instead: %s",
                names[i],
                len(names),
                FALLBACK,
                error,
            )
        images += kept.images
        details.update(kept.details)
    return Kept(images, details)


def select_each(selectors: list[Selector], encoded: EncodedImages, projector: nn.Module) -> Kept:
    """Every item of ``encoded`` chosen by its own selector: the items of each selector
    together (:func:`select_or_fall_back`), the results back in the items' order."""
    groups: dict[int, list[int]] = {}
    for i, selector in enumerate(selectors):
        groups.setdefault(id(selector), []).append(i)
    if len(groups) == 1:
        return select_or_fall_back(selectors[0], encoded, projector)
    images: list[Any] = [None] * len(selectors)
    details: dict[str, Any] = {}
    for members in groups.values():
        kept = select_or_fall_back(selectors[members[0]], encoded.items(members), projector)
        for i, image in zip(members, kept.images, strict=True):
            images[i] = image
        details.update(kept.details)
    return Kept(images, details)


class TensorCopy:
    """Collects the checkpoint tensors under some prefixes as vLLM streams the weights in
    (keys relative to the prefix)."""

    def __init__(self, prefixes: tuple[str, ...]) -> None:
        self.prefixes = prefixes
        self.tensors: dict[str, Tensor] = {}

    def watch(self, weights: Iterable[tuple[str, Tensor]]) -> Iterator[tuple[str, Tensor]]:
        for name, tensor in weights:
            for prefix in self.prefixes:
                if name.startswith(prefix):
                    self.tensors[name[len(prefix) :]] = tensor.detach().clone()
            yield name, tensor


class PrunedVariant:
    """What every pruned vLLM class adds to vLLM's own (a mixin in front of it).

    A variant names the :attr:`architecture` it serves (whose entry in
    :data:`~zooprune.integrations.vllm.VARIANTS` declares the layout options and position
    mode it honours), :attr:`projector_prefixes` (where the scored projector's tensors live
    in a checkpoint) and :meth:`scoring_projector_from` (the family's rebuild of it). Its
    ``__init__`` checks the settings (bad ones fail at engine start), its ``load_weights``
    keeps the projector's full tensors, and :meth:`select` runs the pipeline and returns
    what it kept.

    For inspection (``LLM.apply_model``), ``zooprune_kept`` holds the kept indices of the
    last call's images.
    """

    #: where the scored projector's tensors live in a checkpoint
    projector_prefixes: tuple[str, ...] = ()
    #: the HF architecture the variant serves: its declaration (layout options, position
    #: mode) is its entry in :data:`~zooprune.integrations.vllm.VARIANTS`
    architecture: str = ""

    def __init__(self, *, vllm_config: Any, prefix: str = "") -> None:
        config = vllm_config.model_config.hf_config
        if getattr(vllm_config.compilation_config, "cudagraph_mm_encoder", False):
            # vLLM's encoder CUDA graphs run the tower and projector outside the model's
            # image path, so their tokens would skip the selection.
            raise PruneError(
                "a pruned model cannot run with cudagraph_mm_encoder=True: the encoder's "
                "CUDA graphs bypass the selection; leave it off"
            )
        multimodal = vllm_config.model_config.multimodal_config
        if multimodal is not None and multimodal.is_multimodal_pruning_enabled():
            # Both would rewrite the same placeholder runs and M-RoPE positions.
            raise PruneError(
                "vLLM's own video pruning (video_pruning_rate="
                f"{multimodal.video_pruning_rate}) cannot run in a zooprune-pruned model: "
                "serve the model with one of them"
            )
        self.check_config(config)
        self.selector = self.selector_of(config)  # bad settings fail at engine start
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        self._projector_copy = TensorCopy(self.projector_prefixes)
        # Outside the module tree: vLLM would expect their weights from the checkpoint.
        object.__setattr__(self, "scoring_projector", None)
        object.__setattr__(self, "zooprune_kept", [])

    @classmethod
    def selector_of(cls, config: Any) -> Selector:
        """The variant's selector from the settings its HF ``config`` carries."""
        return selector_for(config, cls.architecture)

    def check_config(self, config: Any) -> None:
        """Refuse a model the variant cannot serve (the default accepts every one)."""

    def rename_weights(self, weights: Iterable[tuple[str, Tensor]]) -> Iterable[tuple[str, Tensor]]:
        """Checkpoint keys as vLLM's class reads them (the default leaves them alone)."""
        return weights

    def scoring_projector_from(self, tensors: dict[str, Tensor], dtype: torch.dtype) -> nn.Module:
        """The projector the methods score, rebuilt from its checkpoint tensors."""
        raise NotImplementedError

    def load_weights(self, weights: Iterable[tuple[str, Tensor]]) -> set[str]:
        loaded = super().load_weights(self._projector_copy.watch(self.rename_weights(weights)))
        dtype = self.scoring_dtype()
        projector = self.scoring_projector_from(self._projector_copy.tensors, dtype)
        self.selector.check_projector(projector)  # e.g. an MLP-only estimator: at start
        object.__setattr__(self, "scoring_projector", projector)
        return loaded

    def scoring_dtype(self) -> torch.dtype:
        """The dtype of the projector vLLM runs (the scored copy is cast to it)."""
        return next(self.parameters()).dtype

    def embed_multimodal(self, **kwargs: Any) -> Any:
        """vLLM's, the items' own settings taken out of its inputs first: the selections
        of the call use them (:meth:`item_selectors`)."""
        requested = None
        for modality in REQUEST_MODALITIES:
            value = kwargs.pop(request_field(modality), None)
            if value is not None:
                requested = request_texts(value)
        object.__setattr__(self, "_requested", requested)
        try:
            return super().embed_multimodal(**kwargs)
        finally:
            object.__setattr__(self, "_requested", None)

    def item_selectors(self, count: int) -> list[Selector]:
        """The selector of each of the ``count`` items of the encoder call under way: its
        request's own settings, or the server's (:attr:`selector`) where it gave none."""
        return [self.selector_of_request(text) for text in self.requested_texts(count)]

    def requested_texts(self, count: int) -> list[str | None]:
        """The settings text of each of the ``count`` items of the encoder call under way
        (None: the server's)."""
        requested = getattr(self, "_requested", None)
        if requested is None:
            return [None] * count
        if len(requested) != count:
            raise ValueError(f"{len(requested)} items' settings for {count} items")
        return list(requested)

    def selector_of_request(self, text: str | None) -> Selector:
        """The selector of an item's settings text (None: the server's)."""
        return self.selector if text is None else requested_selector(text, self.architecture)

    def select(self, encoded: EncodedImages, selectors: list[Selector] | None = None) -> Kept:
        """The pipeline's choice for every item of ``encoded``, each with its selector
        (default: :meth:`item_selectors`), timed into :data:`TALLY`; items sharing a
        selector go through it in one call, and an item whose selection fails at run
        time falls back (:func:`select_or_fall_back`)."""
        device = encoded.features[0].device
        projector = self.scoring_projector.to(device)
        selectors = selectors or self.item_selectors(len(encoded.layouts))
        synchronize = TALLY.synchronize and device.type == "cuda"
        clock = StageClock(torch.cuda.synchronize if synchronize else None)
        clock.sync()
        start = time.perf_counter()
        with clocked(clock):
            kept = select_each(selectors, encoded, projector)
        clock.sync()
        TALLY.seconds += time.perf_counter() - start
        TALLY.scoring_s += clock.seconds["scoring"]
        TALLY.greedy_s += clock.seconds["greedy"]
        TALLY.threads = torch.get_num_threads()
        TALLY.images += len(kept.images)
        object.__setattr__(self, "zooprune_kept", [image.indices.cpu() for image in kept.images])
        return kept


@contextlib.contextmanager
def input_of(module: nn.Module, name: str | None = None) -> Iterator[dict[str, Tensor]]:
    """What ``module`` receives on the calls inside the block: its first argument, or the
    one called ``name`` when given by keyword (``captured["x"]``). An instance ``forward``
    rather than a hook: vLLM's custom ops may bypass hooks."""
    captured: dict[str, Tensor] = {}
    original = module.forward

    def forward(*args: Any, **kwargs: Any) -> Any:
        captured["x"] = kwargs[name] if name in kwargs else args[0]
        return original(*args, **kwargs)

    module.forward = forward
    try:
        yield captured
    finally:
        del module.forward


def run_lengths(tokens: list[int], token: int) -> list[int]:
    """The length of every maximal run of ``token`` in ``tokens``, in order."""
    lengths: list[int] = []
    previous = None
    for value in tokens:
        if value == token:
            if previous == token:
                lengths[-1] += 1
            else:
                lengths.append(1)
        previous = value
    return lengths


def cut_runs(tokens: list[int], token: int, kept: list[int]) -> list[int]:
    """``tokens`` with the r-th maximal run of ``token`` cut to its first ``kept[r]``
    (one count per run: an image's crops, each with its own share of K)."""
    cut, run, runs = [], 0, -1
    for value in tokens:
        if value != token:
            run = 0
        else:
            runs, run = (runs + 1, 1) if run == 0 else (runs, run + 1)
            if run > kept[runs]:
                continue
        cut.append(value)
    if runs + 1 != len(kept):
        raise PruneError(f"{runs + 1} runs of image tokens, {len(kept)} counts for them")
    return cut
