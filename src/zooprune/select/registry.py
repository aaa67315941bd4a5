"""The method registry: every pruning method, selectable by name.

A method is a function ``fn(tokens: TokenSet, k: int, **options) -> MethodResult`` whose
keyword-only parameters are its options. It sees a batch of images that all have the
same number of tokens N, and keeps exactly k of them per image. Registering one is a
decorator on one function (see ``zooprune.select.methods``).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn


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
    """

    features: Tensor
    projected: Tensor
    projector: nn.Module
    grid: tuple[int, int]
    cls_attention: Tensor | None = None
    keys: Tensor | None = None


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
class MethodSpec:
    name: str
    summary: str
    fn: Callable[..., MethodResult]
    needs: frozenset[str]
    validate: Callable[[dict[str, Any]], None] | None = None

    @property
    def options(self) -> dict[str, Any]:
        """The method's options and their defaults."""
        params = inspect.signature(self.fn).parameters.values()
        return {p.name: p.default for p in params if p.kind is inspect.Parameter.KEYWORD_ONLY}

    def check_options(self, options: dict[str, Any]) -> None:
        from zooprune.errors import PruneError

        unknown = sorted(set(options) - set(self.options))
        if unknown:
            accepted = ", ".join(sorted(self.options)) or "none"
            raise PruneError(
                f"method {self.name!r} has no option {', '.join(map(repr, unknown))}; "
                f"its options are: {accepted}"
            )
        if self.validate is not None:
            self.validate(self.options | options)

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
    validate: Callable[[dict[str, Any]], None] | None = None,
) -> Callable[[Callable[..., MethodResult]], Callable[..., MethodResult]]:
    """Add a method to the registry under ``name``."""

    def add(fn: Callable[..., MethodResult]) -> Callable[..., MethodResult]:
        if name in METHODS:
            raise ValueError(f"method {name!r} is already registered")
        METHODS[name] = MethodSpec(name, summary, fn, frozenset(needs), validate)
        return fn

    return add


def get_method(name: str) -> MethodSpec:
    """The registered method called ``name``; the error lists the known ones."""
    from zooprune.errors import UnknownMethodError

    try:
        return METHODS[name]
    except KeyError:
        known = ", ".join(sorted(METHODS))
        raise UnknownMethodError(f"unknown method {name!r}; known methods: {known}") from None
