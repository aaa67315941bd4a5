"""The registered pruning methods. Each is a thin wrapper over a kernel in this package."""

from __future__ import annotations

import functools
import numbers
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from zooprune.errors import PruneError
from zooprune.select.cdpruner import conditional_kernel, greedy_dpp_map, instruction_relevance
from zooprune.select.centering import centred, distinctiveness
from zooprune.select.dart import PIVOT_NORMS, dart_select
from zooprune.select.greedy import maxmin_select
from zooprune.select.holitom import holitom_select
from zooprune.select.mlp import as_mlp, exact_sensitivity, low_rank_projector
from zooprune.select.mmtok import coverage_matrix, greedy_coverage
from zooprune.select.registry import (
    SEED_RANGE,
    MethodResult,
    TokenSet,
    check_bool,
    check_choice,
    check_int,
    check_positive_real,
    register_method,
)
from zooprune.select.sensitivity import (
    jvp_sensitivity,
    minmax_normalize,
    projector_in_dtype,
    zo_sensitivity,
)
from zooprune.select.spatial import grid_indices, nearest_centre, pool_to_centres, random_indices
from zooprune.select.stages import stage
from zooprune.select.visionzip import default_contextual, visionzip_select
from zooprune.select.vispruner import vispruner_select

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
ESTIMATORS = ("auto", "exact", "zo", "jvp", "lowrank")


def check_sensitivity_options(options: dict[str, Any], keep: int | None) -> dict[str, Any]:
    """Reject option values the sensitivity estimators cannot honour, before any call."""
    estimator = check_choice("estimator", options["estimator"], ESTIMATORS)
    zo_dtype = check_choice("zo_dtype", options["zo_dtype"], tuple(_DTYPES))
    if zo_dtype != "float32" and estimator != "zo":
        raise PruneError(f"zo_dtype={zo_dtype!r} applies to estimator='zo' only; pass it too")
    return (
        options
        | {
            "num_directions": check_int("num_directions", options["num_directions"], low=1),
            "rank": check_int("rank", options["rank"], low=1),
            # inf makes every central difference NaN; 0 makes it 0/0
            "step": check_positive_real("step", options["step"]),
            "seed": check_int("seed", options["seed"], low=SEED_RANGE[0], high=SEED_RANGE[1]),
        }
        | ({"center": check_bool("center", options["center"])} if "center" in options else {})
    )


def check_center_option(options: dict[str, Any], keep: int | None) -> dict[str, Any]:
    return options | {"center": check_bool("center", options["center"])}


def check_seed_option(options: dict[str, Any], keep: int | None) -> dict[str, Any]:
    return options | {
        "seed": check_int("seed", options["seed"], low=SEED_RANGE[0], high=SEED_RANGE[1])
    }


def check_visionzip_options(options: dict[str, Any], keep: int | None) -> dict[str, Any]:
    contextual = options["contextual"]
    if contextual is not None:
        # Under ratio= the kept count is known per image only: checked again per call.
        high = None if keep is None else keep - 1
        contextual = check_int("contextual", contextual, low=0, high=high)
    return options | {
        "contextual": contextual,
        "cls_token": check_bool("cls_token", options["cls_token"]),
    }


def check_cdpruner_options(options: dict[str, Any], keep: int | None) -> dict[str, Any]:
    theta = options["theta"]
    if theta is not None:
        # exp(alpha r) with alpha = theta / (2 (1 - theta)): finite for theta in (0, 1) only
        inside = isinstance(theta, numbers.Real) and not isinstance(theta, bool)
        if not inside or not 0 < float(theta) < 1:
            raise PruneError(f"theta must be None or a number in (0, 1), got {theta!r}")
        theta = float(theta)
    return options | {"theta": theta, "center": check_bool("center", options["center"])}


def check_dart_options(options: dict[str, Any], keep: int | None) -> dict[str, Any]:
    return options | {
        "pivots": check_int("pivots", options["pivots"], low=1),
        "pivot_norm": check_choice("pivot_norm", options["pivot_norm"], PIVOT_NORMS),
    }


def check_vispruner_options(options: dict[str, Any], keep: int | None) -> dict[str, Any]:
    ratio = options["important_ratio"]
    if isinstance(ratio, bool) or not isinstance(ratio, numbers.Real) or not 0 <= ratio <= 1:
        raise PruneError(f"important_ratio must be a number in [0, 1], got {ratio!r}")
    return options | {"important_ratio": float(ratio)}


def check_mmtok_options(options: dict[str, Any], keep: int | None) -> dict[str, Any]:
    alpha = options["alpha"]
    if isinstance(alpha, bool) or not isinstance(alpha, numbers.Real) or not 0 <= alpha < 1e6:
        raise PruneError(f"alpha must be a number in [0, 1e6), got {alpha!r}")
    return options | {
        "alpha": float(alpha),
        "text_temperature": check_positive_real("text_temperature", options["text_temperature"]),
        "vision_temperature": check_positive_real(
            "vision_temperature", options["vision_temperature"]
        ),
    }


def check_holitom_options(options: dict[str, Any], keep: int | None) -> dict[str, Any]:
    tau, beta = options["tau"], options["beta"]
    if isinstance(tau, bool) or not isinstance(tau, numbers.Real) or not -1 <= tau <= 1:
        raise PruneError(f"tau must be a number in [-1, 1] (a cosine), got {tau!r}")
    if isinstance(beta, bool) or not isinstance(beta, numbers.Real) or not 0 <= beta <= 1:
        raise PruneError(f"beta must be a number in [0, 1], got {beta!r}")
    return options | {
        "tau": float(tau),
        "beta": float(beta),
        "knn": check_int("knn", options["knn"], low=1),
    }


#: the estimators that read the projector's weights in closed form (an MLP's only)
MLP_ESTIMATORS = ("exact", "lowrank")


def check_estimator(estimator: str, projector: nn.Module) -> None:
    """Refuse an estimator ``projector`` cannot run."""
    if estimator in MLP_ESTIMATORS and as_mlp(projector) is None:
        raise PruneError(
            f"estimator {estimator!r} needs a Linear -> GELU -> Linear projector, not "
            f"{type(projector).__name__}; use 'jvp' or 'zo'"
        )


@torch.no_grad()  # scores are only ranked: no graph to keep
def sensitivity_scores(
    tokens: TokenSet,
    *,
    estimator: str = "auto",
    num_directions: int = 64,
    step: float = 0.01,
    seed: int = 0,
    zo_dtype: str = "float32",
    rank: int = 128,
) -> tuple[torch.Tensor, str]:
    """Per-token projector sensitivity ``[B, N]`` and the name of the estimator that ran.

    ``auto`` picks ``exact`` when the projector is a plain GELU MLP (closed form, no
    sampling) and ``jvp`` otherwise (exact directional derivatives over the bank).
    """
    mlp = as_mlp(tokens.projector)
    if estimator == "auto":
        estimator = "exact" if mlp is not None else "jvp"
    check_estimator(estimator, tokens.projector)
    x = tokens.features
    if estimator == "exact":
        return exact_sensitivity(tokens.projector, mlp, x), estimator
    if estimator == "jvp":
        fp32 = projector_in_dtype(tokens.projector, torch.float32)
        return jvp_sensitivity(fp32, x, num_directions=num_directions, seed=seed), estimator
    if estimator == "lowrank":
        project = low_rank_projector(tokens.projector, mlp, rank, x.device)
        zo = zo_sensitivity(project, x, num_directions=num_directions, step=step, seed=seed)
        return zo, estimator
    dtype = _DTYPES[zo_dtype]
    project = projector_in_dtype(tokens.projector, dtype)
    zo = zo_sensitivity(
        project, x, num_directions=num_directions, step=step, seed=seed, compute_dtype=dtype
    )
    return zo, estimator


def _sorted(picks: torch.Tensor) -> torch.Tensor:
    return picks.sort(dim=-1).values


def score_then_choose(
    choose: Callable[[TokenSet, int, torch.Tensor], torch.Tensor],
    tokens: TokenSet,
    k: int,
    *,
    estimator: str = "auto",
    num_directions: int = 64,
    step: float = 0.01,
    seed: int = 0,
    zo_dtype: str = "float32",
    rank: int = 128,
    center: bool = False,
) -> MethodResult:
    """A method that scores by projector sensitivity, then ``choose``s k tokens by them
    (``center``: with Cen-Prune's correction, :mod:`zooprune.select.centering`)."""
    with stage("scoring"):
        scores, ran = sensitivity_scores(
            tokens,
            estimator=estimator,
            num_directions=num_directions,
            step=step,
            seed=seed,
            zo_dtype=zo_dtype,
            rank=rank,
        )
    with stage("greedy"):
        picks = choose(tokens, k, scores, center)
    return MethodResult(_sorted(picks), scores=scores, details={"estimator": ran})


def _maxmin(
    fusion: str, tokens: TokenSet, k: int, scores: torch.Tensor, center: bool = False
) -> torch.Tensor:
    """ZOO-Prune's greedy: weights are the scores min-max normalised over the unit. With
    ``center``, weights times the tokens' distinctiveness, distances between centred
    tokens (Cen-Prune)."""
    weights = minmax_normalize(scores)
    features = tokens.projected
    if center:
        weights = weights * distinctiveness(features)
        features = centred(features)
    return maxmin_select(features, k, weights=weights, fusion=fusion)


def _top_k(tokens: TokenSet, k: int, scores: torch.Tensor, center: bool = False) -> torch.Tensor:
    # Stable sort so that ties go to the lower index, as in the greedy methods.
    return torch.sort(scores, dim=-1, descending=True, stable=True).indices[:, :k]


# Module-level functions bound with partial, not closures: each method's whole path is
# code that runs per call (what mutation testing can switch), none of it made at import.
for _name, _summary, _fusion in (
    ("zoo", "ZOO-Prune: projector sensitivity x max-min diversity", "product"),
    ("zoo-sum", "ablation: sensitivity + diversity (additive fusion)", "sum"),
):
    _choose = functools.partial(_maxmin, _fusion)
    _method = functools.partial(score_then_choose, _choose)
    _method.choose = _choose  # type: ignore[attr-defined]  # the speed benchmark times it alone
    register_method(_name, _summary, validate=check_sensitivity_options)(_method)


@register_method(
    "sensitivity",
    "ablation: top-k by projector sensitivity alone",
    validate=check_sensitivity_options,
)
def sensitivity(
    tokens: TokenSet,
    k: int,
    *,
    estimator: str = "auto",
    num_directions: int = 64,
    step: float = 0.01,
    seed: int = 0,
    zo_dtype: str = "float32",
    rank: int = 128,
) -> MethodResult:
    """The k most sensitive tokens: no diversity term (so no ``center`` either)."""
    return score_then_choose(
        _top_k,
        tokens,
        k,
        estimator=estimator,
        num_directions=num_directions,
        step=step,
        seed=seed,
        zo_dtype=zo_dtype,
        rank=rank,
    )


sensitivity.choose = _top_k  # type: ignore[attr-defined]  # timed alone, as zoo's greedy


@register_method(
    "divprune",
    "DivPrune: max-min diversity of projected tokens (1 - cosine)",
    validate=check_center_option,
)
def divprune(tokens: TokenSet, k: int, *, center: bool = False) -> MethodResult:
    """DivPrune: the token whose nearest neighbour is farthest, then each time the token
    farthest from those kept. ``center``: Cen-Prune's correction, distances between
    centred tokens, each after the first weighted by the token's distinctiveness."""
    with stage("greedy"):
        if center:
            weights = distinctiveness(tokens.projected)
            picks = maxmin_select(
                centred(tokens.projected), k, weights=weights, first="farthest_neighbour"
            )
        else:
            picks = maxmin_select(tokens.projected, k, first="farthest_neighbour")
    return MethodResult(_sorted(picks))


@register_method(
    "visionzip",
    "VisionZip: top CLS-attention tokens + merged contextual tokens",
    needs=("cls_attention",),
    validate=check_visionzip_options,
    option_needs={"cls_token": "cls_token"},
)
def visionzip(
    tokens: TokenSet, k: int, *, contextual: int | None = None, cls_token: bool = False
) -> MethodResult:
    """VisionZip. Its authors count the CLS token among the dominant tokens (the top
    ``dominant - 1`` patches by CLS attention, plus the CLS token itself); by default
    zooprune keeps one more patch instead, so that every kept token is a patch of the
    image. ``cls_token=True`` keeps the authors' choice where the tower's CLS output is
    reachable: the CLS state at the feature layer, projected, fills the image's first
    placeholder (so it comes first, as in the authors' code), and patch 0, whose
    placeholder it takes, is never dominant or a merge target itself (it may still be
    merged into one); ``handle.selection`` then lists index 0 for the CLS token.
    """
    if tokens.cls_attention is None or tokens.keys is None:
        raise ValueError("visionzip needs the vision tower's CLS attention and keys")
    count = default_contextual(k) if contextual is None else contextual
    if count >= k:
        raise PruneError(
            f"visionzip's contextual={count} leaves no dominant token of the {k} kept here; "
            f"contextual must be below the tokens kept per image (or per crop)"
        )
    if cls_token and tokens.cls_features is None:
        raise ValueError("visionzip with cls_token=True needs the CLS token's features")
    indices, kept = visionzip_select(
        tokens.cls_attention,
        tokens.keys,
        tokens.features,
        projector_in_dtype(tokens.projector, torch.float32),
        k,
        count,
        cls_features=tokens.cls_features if cls_token else None,
    )
    return MethodResult(
        indices,
        tokens=kept,
        scores=tokens.cls_attention.float(),
        details={"dominant": k - count, "contextual": count, "cls_token": cls_token},
    )


@register_method(
    "cdpruner",
    "CDPruner: greedy MAP of a DPP whose kernel is conditioned on the instruction",
    needs=("instruction",),
    validate=check_cdpruner_options,
)
def cdpruner(
    tokens: TokenSet, k: int, *, theta: float | None = None, center: bool = False
) -> MethodResult:
    """CDPruner. The kernel is the cosine similarity of the projected tokens, each row and
    column scaled by the token's relevance to the instruction (mean cosine similarity to
    the instruction's token embeddings, min-max normalised per image; ``theta`` in (0, 1)
    scales by ``exp(theta / (2 (1 - theta)) r)`` instead, in float64), and the kept set is
    the kernel's greedy MAP (fast incremental Cholesky). Scores: the relevance.
    ``center``: Cen-Prune's correction, the cosines of centred tokens and each token's
    quality times its distinctiveness (the relevance itself is not centred).
    """
    if tokens.instruction is None or tokens.instruction_mask is None:
        raise ValueError("cdpruner needs the instruction's token embeddings")
    with stage("scoring"):
        relevance = instruction_relevance(
            tokens.projected, tokens.instruction, tokens.instruction_mask
        )
    projected, weighted = tokens.projected, relevance
    if theta is not None:
        # exp(alpha r) leaves float32's range as theta nears 1 (alpha = 49.5 at 0.99):
        # dividing an image's q by its largest (r less its max) scales every greedy gain
        # by one constant, the same picks, and float64 keeps the small q's apart.
        projected, weighted = projected.double(), (relevance - relevance.amax(-1, True)).double()
    with stage("greedy"):
        distinct = None
        if center:
            distinct = distinctiveness(tokens.projected).to(projected.dtype)
            projected = centred(projected)
        picks = greedy_dpp_map(conditional_kernel(projected, weighted, theta, distinct), k)
    return MethodResult(_sorted(picks), scores=relevance)


@register_method(
    "dart",
    "DART: pivots by norm, then the tokens least duplicating each pivot (cosine)",
    validate=check_dart_options,
)
def dart(tokens: TokenSet, k: int, *, pivots: int = 8, pivot_norm: str = "l2") -> MethodResult:
    """DART before the language model, on the projected tokens: the ``min(pivots, k)``
    tokens of largest norm, then each pivot in turn (largest first) claims an even share of
    the rest: the unclaimed tokens of lowest cosine similarity to it.
    """
    return MethodResult(_sorted(dart_select(tokens.projected, k, pivots=pivots, norm=pivot_norm)))


@register_method("random", "uniformly random tokens (seeded)", validate=check_seed_option)
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


@register_method(
    "vispruner",
    "VisPruner: top CLS-attention tokens, then diverse ones by removing near-duplicates",
    needs=("cls_attention",),
    validate=check_vispruner_options,
)
def vispruner(tokens: TokenSet, k: int, *, important_ratio: float = 0.5) -> MethodResult:
    """VisPruner: ``int(k * important_ratio)`` tokens by the tower's CLS attention, the
    rest from the others by rounds of removing the most duplicated (cosine of the
    projector's inputs): :mod:`zooprune.select.vispruner`. Scores: the CLS attention."""
    if tokens.cls_attention is None:
        raise ValueError("vispruner needs the vision tower's CLS attention")
    indices = vispruner_select(tokens.cls_attention, tokens.features, k, important_ratio)
    return MethodResult(
        indices,
        scores=tokens.cls_attention.float(),
        details={"important": int(k * important_ratio), "diverse": k - int(k * important_ratio)},
    )


@register_method(
    "mmtok",
    "MMTok: greedy coverage of the instruction's tokens and of the image's own tokens",
    needs=("instruction",),
    validate=check_mmtok_options,
)
def mmtok(
    tokens: TokenSet,
    k: int,
    *,
    alpha: float = 0.5,
    text_temperature: float = 0.02,
    vision_temperature: float = 0.2,
) -> MethodResult:
    """MMTok: the greedy of a coverage function over the instruction's token embeddings
    (cosine to the projected tokens) and the image's tokens (cosine of the projector's
    inputs), each a softmax over the visual tokens: :mod:`zooprune.select.mmtok`."""
    if tokens.instruction is None or tokens.instruction_mask is None:
        raise ValueError("mmtok needs the instruction's token embeddings")
    with stage("scoring"):
        cover = coverage_matrix(
            tokens.projected,
            tokens.features,
            tokens.instruction,
            tokens.instruction_mask,
            alpha=alpha,
            text_temperature=text_temperature,
            vision_temperature=vision_temperature,
        )
    with stage("greedy"):
        picks = greedy_coverage(cover, k)
    return MethodResult(_sorted(picks))


@register_method(
    "holitom",
    "HoliTom: a video's static tokens merged over time, then each frame's by attention",
    needs=("tower_attention",),
    validate=check_holitom_options,
    videos_only=True,
)
def holitom(
    tokens: TokenSet, k: int, *, tau: float = 0.8, beta: float = 0.6, knn: int = 7
) -> MethodResult:
    """HoliTom before the language model: temporal segments whose static tokens merge
    into their first frame, then the dynamic tokens kept by the tower's attention and the
    static ones merged by DPC-kNN, at one ratio: :mod:`zooprune.select.holitom`."""
    if tokens.tower_attention is None:
        raise ValueError("holitom needs the attention each token receives in the tower")
    frames = tokens.frames
    batch, n, dim = tokens.projected.shape
    per_frame = n // frames
    kept, made = [], []
    for b in range(batch):
        indices, merged, _ = holitom_select(
            tokens.projected[b].reshape(frames, per_frame, dim),
            tokens.tower_attention[b].reshape(frames, per_frame),
            k,
            tau=tau,
            beta=beta,
            knn=knn,
        )
        kept.append(indices)
        made.append(merged)
    return MethodResult(torch.stack(kept), tokens=torch.stack(made))
