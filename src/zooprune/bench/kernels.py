"""Benchmark of the selection kernels alone, at LLaVA-1.5-7B shapes by default.

For each sensitivity estimator: time per image and rank agreement with the faithful
zeroth-order estimator (m = 64, float32). For the greedy selection: our kernel in full
(its distance work included), in each distance mode, against the naive loop that
re-slices the growing distance matrix at every step (its N x N product included).
"""

from __future__ import annotations

import statistics
from collections.abc import Callable
from dataclasses import asdict, dataclass
from functools import partial
from typing import Any

import torch
from torch import nn

from zooprune.bench.timing import machine, median_seconds, spearman, timed, topk_overlap
from zooprune.select.greedy import distance_mode, maxmin_select, pairwise_distances, unit_rows
from zooprune.select.mlp import (
    GRAM_KERNELS,
    as_mlp,
    exact_sensitivity,
    low_rank_factors,
    low_rank_projector,
)
from zooprune.select.sensitivity import jvp_sensitivity, minmax_normalize, zo_sensitivity


@dataclass
class KernelBenchConfig:
    tokens: int = 576
    vision_dim: int = 1024
    hidden_dim: int = 4096
    text_dim: int = 4096
    budgets: tuple[int, ...] = (64, 128, 192)
    images: int = 4
    num_directions: int = 64
    rank: int = 128
    greedy_repeats: int = 11
    #: "zo-reseeded" is zo with another direction bank: how well zo agrees with itself
    estimators: tuple[str, ...] = ("exact", "jvp", "lowrank", "zo-reseeded")
    #: sigma of a per-token log-normal scale on the features; 0 = plain N(0, 1) features.
    #: Scaled tokens differ more in sensitivity, which makes rankings easier to agree on.
    token_scale: float = 0.0
    seed: int = 0
    device: str = "cpu"


def naive_reslice_select(
    projected: torch.Tensor,
    k: int,
    weights: torch.Tensor,
    distances: torch.Tensor | None = None,
) -> list[int]:
    """The reference loop: min over the growing kept set's columns, re-sliced every step.

    One image: ``projected [N, d]``, ``weights [N]``, optional precomputed ``distances
    [N, N]``. O(k^2 N) after the distance matrix.
    """
    if distances is None:
        distances = pairwise_distances(projected[None])[0]
    picked = [int(weights.argmax())]
    for _ in range(k - 1):
        diversity = distances[:, picked].min(dim=1).values
        score = weights * diversity
        score[picked] = -torch.inf
        picked.append(int(score.argmax()))
    return picked


def random_projector_inputs(
    widths: tuple[int, int, int],
    *,
    tokens: int,
    images: int,
    token_scale: float,
    seed: int,
    device: str,
) -> tuple[nn.Module, list[torch.Tensor]]:
    """A random LLaVA-style projector of ``widths`` (input, hidden, output) and ``images``
    of Gaussian token features, each token scaled by log-normal(``token_scale``)."""
    vision_dim, hidden, text_dim = widths
    torch.manual_seed(seed)
    projector = nn.Sequential(
        nn.Linear(vision_dim, hidden), nn.GELU(), nn.Linear(hidden, text_dim)
    ).to(device)
    g = torch.Generator().manual_seed(seed + 1)
    features = []
    for _ in range(images):
        scale = torch.exp(token_scale * torch.randn(tokens, 1, generator=g))
        features.append(torch.randn(tokens, vision_dim, generator=g) * scale)
    return projector, [f.to(device) for f in features]


def _inputs(config: KernelBenchConfig) -> tuple[nn.Module, list[torch.Tensor]]:
    return random_projector_inputs(
        (config.vision_dim, config.hidden_dim, config.text_dim),
        tokens=config.tokens,
        images=config.images,
        token_scale=config.token_scale,
        seed=config.seed,
        device=config.device,
    )


def run_kernel_benchmark(
    config: KernelBenchConfig, progress: Callable[[str], None] = lambda _: None
) -> dict[str, Any]:
    """Run the benchmark; returns a JSON-ready dict (see ``zooprune speed-kernels``)."""
    projector, features = _inputs(config)
    mlp = as_mlp(projector)
    m = config.num_directions
    estimators: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
        "zo": lambda x: zo_sensitivity(projector, x, num_directions=m),
        "zo-reseeded": lambda x: zo_sensitivity(projector, x, num_directions=m, seed=1),
        "jvp": lambda x: jvp_sensitivity(projector, x, num_directions=m),
        "lowrank": lambda x: zo_sensitivity(
            low_rank_projector(projector, mlp, config.rank, x.device), x, num_directions=m
        ),
        "exact": lambda x: exact_sensitivity(projector, mlp, x),
    }
    chosen = ["zo", *[e for e in config.estimators if e != "zo"]] if config.estimators else []
    with torch.no_grad():
        setup, estimator_rows = _estimator_rows(config, estimators, chosen, mlp, features, progress)
        projected = projector(features[0])
        scores = exact_sensitivity(projector, mlp, features[0][None])
        greedy_rows = _greedy_rows(config, projected, minmax_normalize(scores)[0], progress)
    return {
        "config": asdict(config),
        "machine": machine(),
        "dtype": "float32",
        "setup": setup,
        "estimators": estimator_rows,
        "greedy": greedy_rows,
    }


def _estimator_rows(config, estimators, chosen, mlp, features, progress):
    """Per estimator: time per image and agreement with zo; and the one-off setup costs."""
    if not chosen:
        return {}, []
    # Build the per-model caches first and time them apart: they are paid once per model.
    setup = {
        "exact_gram_kernel_s": timed(
            partial(GRAM_KERNELS.build, mlp, features[0].device), config.device
        )[0],
        "lowrank_svd_s": timed(
            partial(low_rank_factors, mlp, features[0].device, config.rank), config.device
        )[0],
    }
    for name in chosen:  # warm-up: caches and first-call paths, on a few tokens
        estimators[name](features[0][None, :8])
    seconds: dict[str, list[float]] = {name: [] for name in chosen}
    scores: dict[str, list[torch.Tensor]] = {name: [] for name in chosen}
    for i, x in enumerate(features):
        for name in chosen:
            progress(f"image {i + 1}/{len(features)}: {name}")
            elapsed, s = timed(partial(estimators[name], x[None]), config.device)
            seconds[name].append(elapsed)
            scores[name].append(s[0].cpu())
    rows = []
    for name in chosen:
        row = {
            "estimator": name,
            "seconds_per_image": statistics.median(seconds[name]),
            "speedup_vs_zo": statistics.median(seconds["zo"]) / statistics.median(seconds[name]),
            "spearman_vs_zo": statistics.median(
                spearman(a, b) for a, b in zip(scores[name], scores["zo"], strict=True)
            ),
        }
        for k in config.budgets:
            row[f"top{k}_overlap_vs_zo"] = statistics.median(
                topk_overlap(a, b, k) for a, b in zip(scores[name], scores["zo"], strict=True)
            )
        rows.append(row)
    return setup, rows


def _greedy_rows(config, projected, weights, progress):
    """Per budget k: ours in full (each distance mode, and what auto picks) against the
    naive re-slicing loop in full, and the two loops alone on one precomputed matrix."""

    def median(fn: Callable[[], Any]) -> float:
        return median_seconds(fn, repeats=config.greedy_repeats, warmup=1, device=config.device)

    z, w = projected[None], weights[None]
    distances = pairwise_distances(z)
    matrix_s = median(partial(pairwise_distances, z))
    unit = unit_rows(z)[0]
    rows = []
    for k in config.budgets:
        progress(f"greedy k={k}")
        ours = partial(maxmin_select, z, k, weights=w)
        naive = partial(naive_reslice_select, projected, k, weights)
        picks = ours(distances=distances)[0]
        row = {
            "k": k,
            "auto_mode": distance_mode("auto", 1, z.shape[1], k, "max_weight", z.device),
            "ours_s": median(ours),
            "ours_matrix_s": median(partial(ours, distances="matrix")),
            "ours_rows_s": median(partial(ours, distances="rows")),
            "naive_reslice_s": median(naive),
            # the loops alone, both on one precomputed distance matrix
            "ours_loop_s": median(partial(ours, distances=distances)),
            "naive_loop_s": median(partial(naive, distances=distances[0])),
            "distance_matrix_s": matrix_s,
            # the distances an exact selection cannot avoid: the k picks' rows, as one
            # product, as if the picks were known in advance (a floor, not a method)
            "picks_rows_s": median(partial(torch.matmul, unit[picks], unit.T)),
            "same_selection": ours(distances="matrix")[0].tolist() == naive()
            and ours(distances="rows")[0].tolist() == naive(),
        }
        row["speedup"] = row["naive_reslice_s"] / row["ours_s"]
        row["loop_speedup"] = row["naive_loop_s"] / row["ours_loop_s"]
        rows.append(row)
    return rows
