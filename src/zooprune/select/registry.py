"""The method registry: every pruning method, selectable by name.

A method is a function ``fn(tokens: TokenSet, k: int, **options) -> MethodResult`` whose
keyword-only parameters are its options. It sees a batch of images that all have the
same number of tokens N, and keeps exactly k of them per image (a method registered
``videos_only`` sees whole videos instead: ``TokenSet.frames`` grids each). Registering one is a
decorator on one function (see ``zooprune.select.methods``), with a validator that checks
and normalises its option values before any call.
"""

from __future__ import annotations

import inspect
import math
import numbers
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from zooprune.errors import PruneError, UnknownMethodError


@dataclass(frozen=True)
class TokenSet:
    """What a method may look at for B images of N visual tokens each.

    Attributes:
        features: projector inputs X, ``[B, N, d_v]``.
        projected: projector outputs Z (the tokens the LM would see), ``[B, N, d_l]``.
        projector: the token-wise projector module M.
        grid: ``(height, width)`` of the patch grid, ``height * width == N``, or
            ``(1, N)`` when the tokens do not form a grid.
        cls_attention: ``[B, N]`` attention from the vision CLS token to each token,
            summed over heads; present only for methods that need it.
        keys: ``[B, N, d_k]`` that layer's keys, averaged over heads; likewise.
        cls_features: ``[B, d_v]`` the CLS token's projector input (the feature layer's
            CLS state); present only for methods that need it.
        instruction: ``[B, T, d_l]`` the input embeddings of the text tokens of the
            prompt that holds each image (``"instruction"``: every attended token that is
            not an image or video placeholder), padded to the longest; present only for
            methods that need it.
        instruction_mask: ``[B, T]`` True where ``instruction`` holds a real token.
        tower_attention: ``[B, N]`` the attention each token receives in the vision
            tower's feature layer, averaged over heads and queries (pooled or merged as
            the tokens are); present only for methods that need it.
    """

    features: Tensor
    projected: Tensor
    projector: nn.Module
    grid: tuple[int, int]
    cls_attention: Tensor | None = None
    keys: Tensor | None = None
    cls_features: Tensor | None = None
    instruction: Tensor | None = None
    instruction_mask: Tensor | None = None
    frames: int = 1
    tower_attention: Tensor | None = None


@dataclass
class MethodResult:
    """What a method keeps of a :class:`TokenSet`.

    Attributes:
        indices: ``[B, k]`` kept token indices, ascending (original raster order).
        tokens: ``[B, k, d_l]`` the token placed at each kept index when the method
            builds new ones (merging, pooling); None means ``projected`` at ``indices``.
        scores: ``[B, N]`` the per-token score the method ranked by, if it has one.
        details: anything else worth recording (e.g. which estimator ran).
    """

    indices: Tensor
    tokens: Tensor | None = None
    scores: Tensor | None = None
    details: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class InLM:
    """How a method that drops visual tokens inside the language model spreads the drops
    over its layers (its stages).

    Attributes:
        layers: ``(options, depth) -> [K_1 < K_2 < ...]``: each stage's first layer that
            holds fewer tokens (0-based; ``K_s`` in [1, depth]); stage s ranks by layer
            ``K_s - 1``'s attention.
        keeps: ``(options, n, k, stages) -> [k_1 >= k_2 >= ... = k]``: of an image's ``n``
            visual tokens, how many each stage keeps (the last keeps the budget's ``k``).
        raters: ``(visual [N, d], text [T, d]) -> [T] bool``: which text tokens after the
            image rank it (their attention, averaged), from its projected tokens and the
            text's input embeddings; None: the last prompt token ranks (FastV's query).
    """

    layers: Callable[[dict[str, Any], int], list[int]]
    keeps: Callable[[dict[str, Any], int, int, int], list[int]]
    raters: Callable[[Tensor, Tensor], Tensor] | None = None


#: ``validate(options, keep)``: the full option dict (defaults filled) and the budget's
#: ``keep`` (None under ``ratio``) -> the same options, checked and normalised
Validator = Callable[[dict[str, Any], "int | None"], dict[str, Any]]


@dataclass(frozen=True)
class MethodSpec:
    name: str
    summary: str
    fn: Callable[..., MethodResult]
    needs: frozenset[str]
    validate: Validator | None = None
    #: option name -> an extra the method needs when that option is truthy
    option_needs: dict[str, str] = field(default_factory=dict)
    #: a method that drops tokens inside the language model: its stages
    stages: InLM | None = None
    #: a method that merges across a video's frames: it sees each video whole (its
    #: ``frames``) and prunes no image
    videos_only: bool = False

    @property
    def in_lm(self) -> bool:
        """Whether the method chooses inside the language model (the layers before its
        first stage run on every visual token)."""
        return self.stages is not None

    def lm_stages(
        self, options: dict[str, Any], n: int, k: int, depth: int
    ) -> list[tuple[int, int]]:
        """``[(K_s, k_s)]``: from layer ``K_s`` on, ``k_s`` of an image's ``n`` tokens are
        held (none for a method before the LM). ``options`` as given (defaults filled)."""
        if self.stages is None:
            return []
        options = self.options | options
        layers = self.stages.layers(options, depth)
        return list(zip(layers, self.stages.keeps(options, n, k, len(layers)), strict=True))

    def layer_tokens(self, options: dict[str, Any], n: int, k: int, depth: int) -> list[int]:
        """The visual tokens each of ``depth`` LM layers holds when ``k`` of ``n`` are kept:
        ``k`` everywhere before the LM; for a method inside it, ``n`` before its first
        stage, then each stage's count."""
        if self.stages is None:
            return [k] * depth
        held = [n] * depth
        for layer, kept in self.lm_stages(options, n, k, depth):
            held[min(layer, depth) :] = [kept] * (depth - min(layer, depth))
        return held

    def __reduce__(self) -> tuple:
        # By name: a pickled or copied spec is the registered one (its function may be a
        # closure, which pickle cannot store).
        return (get_method, (self.name,))

    @property
    def options(self) -> dict[str, Any]:
        """The method's options and their defaults."""
        params = inspect.signature(self.fn).parameters.values()
        return {p.name: p.default for p in params if p.kind is inspect.Parameter.KEYWORD_ONLY}

    def resolve_options(self, options: dict[str, Any], keep: int | None = None) -> dict[str, Any]:
        """``options`` checked against the method's names and value ranges, normalised.

        Returns only the options given (normalised: numpy numbers become Python ones).

        Raises:
            PruneError: naming an unknown option (and the accepted ones) or a bad value
                (and the accepted range).
        """
        unknown = sorted(set(options) - set(self.options))
        if unknown:
            accepted = ", ".join(sorted(self.options)) or "none"
            raise PruneError(
                f"method {self.name!r} has no option {', '.join(map(repr, unknown))}; "
                f"its options are: {accepted}"
            )
        if self.validate is None:
            return dict(options)
        checked = self.validate(self.options | options, keep)
        return {name: checked[name] for name in options}

    def needs_for(self, options: dict[str, Any]) -> frozenset[str]:
        """What the method needs from the model with these options."""
        extra = {need for name, need in self.option_needs.items() if options.get(name)}
        return self.needs | extra

    def __call__(self, tokens: TokenSet, k: int, **options: Any) -> MethodResult:
        with torch.no_grad():
            result = self.fn(tokens, k, **options)
        # Kept tokens fill placeholders in order: a method's indices must be a clean set.
        batch, n = tokens.projected.shape[:2]
        idx = result.indices
        if (
            tuple(idx.shape) != (batch, k)
            or (k > 1 and not bool((idx[:, 1:] > idx[:, :-1]).all()))
            or bool((idx < 0).any() | (idx >= n).any())
        ):
            raise RuntimeError(
                f"method {self.name!r} returned indices of shape {tuple(idx.shape)} that are not "
                f"{k} distinct ascending token indices in [0, {n}) per image"
            )
        return result


METHODS: dict[str, MethodSpec] = {}


def register_method(
    name: str,
    summary: str,
    *,
    needs: tuple[str, ...] = (),
    validate: Validator | None = None,
    option_needs: dict[str, str] | None = None,
    stages: InLM | None = None,
    videos_only: bool = False,
) -> Callable[[Callable[..., MethodResult]], Callable[..., MethodResult]]:
    """Add a method to the registry under ``name``."""

    def add(fn: Callable[..., MethodResult]) -> Callable[..., MethodResult]:
        if name in METHODS:
            raise ValueError(f"method {name!r} is already registered")
        METHODS[name] = MethodSpec(
            name,
            summary,
            fn,
            frozenset(needs),
            validate,
            dict(option_needs or {}),
            stages,
            videos_only,
        )
        return fn

    return add


def get_method(name: str) -> MethodSpec:
    """The registered method called ``name``; the error lists the known ones."""
    try:
        return METHODS[name]
    except (KeyError, TypeError):
        known = ", ".join(sorted(METHODS))
        raise UnknownMethodError(f"unknown method {name!r}; known methods: {known}") from None


# -- option value checks, shared by the validators --------------------------------------


def check_int(name: str, value: Any, *, low: int, high: int | None = None) -> int:
    """``value`` as a plain int in ``[low, high]`` (numpy ints accepted, bools not)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise PruneError(f"{name} must be an int, got {value!r}")
    value = int(value)
    if value < low or (high is not None and value > high):
        bound = f"in [{low}, {high}]" if high is not None else f">= {low}"
        raise PruneError(f"{name} must be an int {bound}, got {value}")
    return value


def check_positive_real(name: str, value: Any) -> float:
    """``value`` as a finite positive float (ints and numpy numbers accepted, bools not)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise PruneError(f"{name} must be a number, got {value!r}")
    value = float(value)
    if not (math.isfinite(value) and value > 0):
        raise PruneError(f"{name} must be finite and positive, got {value}")
    return value


def check_choice(name: str, value: Any, allowed: tuple[str, ...]) -> str:
    if not isinstance(value, str) or value not in allowed:
        raise PruneError(f"{name} must be one of {', '.join(allowed)}, got {value!r}")
    return value


def check_bool(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise PruneError(f"{name} must be True or False, got {value!r}")
    return value


#: seeds a ``torch.Generator`` takes
SEED_RANGE = (0, 2**63 - 1)
