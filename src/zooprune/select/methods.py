"""The registered pruning methods. Each is a thin wrapper over a kernel in this package."""

from __future__ import annotations

import torch

from zooprune.select.greedy import maxmin_select
from zooprune.select.registry import MethodResult, TokenSet, register_method
from zooprune.select.sensitivity import minmax_normalize, projector_in_dtype, zo_sensitivity
from zooprune.select.spatial import grid_indices, nearest_centre, pool_to_centres, random_indices
from zooprune.select.visionzip import default_contextual, visionzip_select

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def _sensitivity(
    tokens: TokenSet, num_directions: int, step: float, seed: int, zo_dtype: str
) -> torch.Tensor:
    if zo_dtype not in _DTYPES:
        raise ValueError(f"zo_dtype must be one of {', '.join(_DTYPES)}, got {zo_dtype!r}")
    dtype = _DTYPES[zo_dtype]
    return zo_sensitivity(
        projector_in_dtype(tokens.projector, dtype),
        tokens.features,
        num_directions=num_directions,
        step=step,
        seed=seed,
        compute_dtype=dtype,
    )


def _sorted(picks: torch.Tensor) -> torch.Tensor:
    return picks.sort(dim=-1).values


def _zoo_greedy(tokens: TokenSet, k: int, fusion: str, **zo: object) -> MethodResult:
    sensitivity = _sensitivity(tokens, **zo)
    picks = maxmin_select(
        tokens.projected,
        k,
        weights=minmax_normalize(sensitivity),
        fusion=fusion,
        first="max_weight",
    )
    return MethodResult(_sorted(picks), scores=sensitivity, details={"estimator": "zo"})


@register_method("zoo", "ZOO-Prune: zeroth-order projector sensitivity x max-min diversity")
def zoo(
    tokens: TokenSet,
    k: int,
    *,
    num_directions: int = 64,
    step: float = 0.01,
    seed: int = 0,
    zo_dtype: str = "float32",
) -> MethodResult:
    return _zoo_greedy(
        tokens, k, "product", num_directions=num_directions, step=step, seed=seed, zo_dtype=zo_dtype
    )


@register_method("zoo-sum", "ablation: sensitivity + diversity (additive fusion)")
def zoo_sum(
    tokens: TokenSet,
    k: int,
    *,
    num_directions: int = 64,
    step: float = 0.01,
    seed: int = 0,
    zo_dtype: str = "float32",
) -> MethodResult:
    return _zoo_greedy(
        tokens, k, "sum", num_directions=num_directions, step=step, seed=seed, zo_dtype=zo_dtype
    )


@register_method("sensitivity", "ablation: top-k by zeroth-order sensitivity alone")
def sensitivity_only(
    tokens: TokenSet,
    k: int,
    *,
    num_directions: int = 64,
    step: float = 0.01,
    seed: int = 0,
    zo_dtype: str = "float32",
) -> MethodResult:
    scores = _sensitivity(tokens, num_directions, step, seed, zo_dtype)
    # Stable sort so that ties go to the lower index, as in the greedy methods.
    order = torch.sort(scores, dim=-1, descending=True, stable=True).indices
    return MethodResult(_sorted(order[:, :k]), scores=scores, details={"estimator": "zo"})


@register_method("divprune", "DivPrune: max-min diversity of projected tokens (1 - cosine)")
def divprune(tokens: TokenSet, k: int) -> MethodResult:
    picks = maxmin_select(tokens.projected, k, first="farthest_neighbour")
    return MethodResult(_sorted(picks))


@register_method(
    "visionzip",
    "VisionZip: top CLS-attention tokens + merged contextual tokens",
    needs=("cls_attention",),
)
def visionzip(tokens: TokenSet, k: int, *, contextual: int | None = None) -> MethodResult:
    if tokens.cls_attention is None or tokens.keys is None:
        raise ValueError("visionzip needs the vision tower's CLS attention and keys")
    count = default_contextual(k) if contextual is None else contextual
    indices, kept = visionzip_select(
        tokens.cls_attention,
        tokens.keys,
        tokens.features,
        projector_in_dtype(tokens.projector, torch.float32),
        k,
        count,
    )
    return MethodResult(
        indices,
        tokens=kept,
        scores=tokens.cls_attention.float(),
        details={"dominant": k - count, "contextual": count},
    )


@register_method("random", "uniformly random tokens (seeded)")
def random(tokens: TokenSet, k: int, *, seed: int = 0) -> MethodResult:
    batch, n = tokens.projected.shape[:2]
    index = random_indices(n, k, seed=seed, device=tokens.projected.device)
    return MethodResult(index.expand(batch, -1))


@register_method("grid", "uniform spatial subsampling of the patch grid")
def grid(tokens: TokenSet, k: int) -> MethodResult:
    batch = tokens.projected.shape[0]
    index = grid_indices(*tokens.grid, k, device=tokens.projected.device)
    return MethodResult(index.expand(batch, -1))


@register_method("pool", "average pooling to the budget (each token into its nearest grid cell)")
def pool(tokens: TokenSet, k: int) -> MethodResult:
    batch = tokens.projected.shape[0]
    centres = grid_indices(*tokens.grid, k, device=tokens.projected.device)
    pooled = pool_to_centres(tokens.projected, nearest_centre(*tokens.grid, centres), k)
    return MethodResult(centres.expand(batch, -1), tokens=pooled)
