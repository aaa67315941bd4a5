"""Benchmark of the selection kernels alone, at LLaVA-1.5-7B shapes by default.

For each sensitivity estimator: time per image and rank agreement with the faithful
zeroth-order estimator (m = 64, float32). For the greedy selection: our kernel against the
naive loop that re-slices the growing distance matrix at every step.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from functools import partial
from typing import Any

import torch
from torch import nn

from zooprune.bench.timing import machine, median_seconds, spearman, timed, topk_overlap
from zooprune.select.greedy import _distance, maxmin_select, unit_rows
from zooprune.select.mlp import GRAM_KERNELS, as_mlp, exact_sensitivity, low_rank_projector
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
    greedy_repeats: int = 5
    estimators: tuple[str, ...] = ("exact", "jvp", "lowrank", "zo")
    seed: int = 0
    device: str = "cpu"
    extra: dict[str, Any] = field(default_factory=dict)


def naive_reslice_select(projected: torch.Tensor, k: int, weights: torch.Tensor) -> list[int]:
    """The reference loop: min over the growing kept set's columns, re-sliced every step.

    One image: ``projected [N, d]``, ``weights [N]``. O(k^2 N) after the distance matrix.
    """
    distances = _pairwise_distances(projected)
    picked = [int(weights.argmax())]
    for _ in range(k - 1):
        diversity = distances[:, picked].min(dim=1).values
        score = weights * diversity
        score[picked] = -torch.inf
        picked.append(int(score.argmax()))
    return picked


def _pairwise_distances(projected: torch.Tensor) -> torch.Tensor:
    """The N x N distance matrix both greedy implementations start from."""
    unit = unit_rows(projected)
    return _distance(unit @ unit.T)


def _inputs(config: KernelBenchConfig) -> tuple[nn.Module, list[torch.Tensor]]:
    """A random LLaVA-style projector and token features with varied per-token scale."""
    torch.manual_seed(config.seed)
    projector = nn.Sequential(
        nn.Linear(config.vision_dim, config.hidden_dim),
        nn.GELU(),
        nn.Linear(config.hidden_dim, config.text_dim),
    ).to(config.device)
    g = torch.Generator().manual_seed(config.seed + 1)
    features = []
    for _ in range(config.images):
        scale = torch.exp(0.5 * torch.randn(config.tokens, 1, generator=g))
        features.append(torch.randn(config.tokens, config.vision_dim, generator=g) * scale)
    return projector, [f.to(config.device) for f in features]


def run_kernel_benchmark(
    config: KernelBenchConfig, progress: Callable[[str], None] = lambda _: None
) -> dict[str, Any]:
    """Run the benchmark; returns a JSON-ready dict (see ``zooprune speed-kernels``)."""
    projector, features = _inputs(config)
    mlp = as_mlp(projector)
    m = config.num_directions
    estimators: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
        "zo": lambda x: zo_sensitivity(projector, x, num_directions=m),
        "jvp": lambda x: jvp_sensitivity(projector, x, num_directions=m),
        "lowrank": lambda x: zo_sensitivity(
            low_rank_projector(projector, mlp, config.rank, x.device), x, num_directions=m
        ),
        "exact": lambda x: exact_sensitivity(projector, mlp, x),
    }
    chosen = ["zo", *[e for e in config.estimators if e != "zo"]]
    with torch.no_grad():
        # Build the per-model caches first and time them apart: they are paid once per model.
        setup = {
            "exact_gram_kernel_s": timed(
                lambda: GRAM_KERNELS.build(mlp, features[0].device), config.device
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
        estimator_rows = []
        for name in chosen:
            row = {
                "estimator": name,
                "seconds_per_image": statistics.median(seconds[name]),
                "speedup_vs_zo": statistics.median(seconds["zo"])
                / statistics.median(seconds[name]),
                "spearman_vs_zo": statistics.median(
                    spearman(a, b) for a, b in zip(scores[name], scores["zo"], strict=True)
                ),
            }
            for k in config.budgets:
                row[f"top{k}_overlap_vs_zo"] = statistics.median(
                    topk_overlap(a, b, k) for a, b in zip(scores[name], scores["zo"], strict=True)
                )
            estimator_rows.append(row)

        projected = projector(features[0])
        weights = minmax_normalize(scores["exact" if "exact" in scores else "zo"][0][None])[0]
        weights = weights.to(projected.device)
        greedy_rows = []
        for k in config.budgets:
            progress(f"greedy k={k}")
            ours = median_seconds(
                lambda k=k: maxmin_select(projected[None], k, weights=weights[None]),
                repeats=config.greedy_repeats,
                warmup=1,
                device=config.device,
            )
            naive = median_seconds(
                lambda k=k: naive_reslice_select(projected, k, weights),
                repeats=config.greedy_repeats,
                warmup=1,
                device=config.device,
            )
            shared = median_seconds(
                partial(_pairwise_distances, projected),
                repeats=config.greedy_repeats,
                warmup=1,
                device=config.device,
            )
            same = maxmin_select(projected[None], k, weights=weights[None])[0].tolist() == (
                naive_reslice_select(projected, k, weights)
            )
            greedy_rows.append(
                {
                    "k": k,
                    "ours_s": ours,
                    "naive_reslice_s": naive,
                    "speedup": naive / ours,
                    "distance_matrix_s": shared,
                    "loop_speedup": (naive - shared) / max(ours - shared, 1e-9),
                    "same_selection": same,
                }
            )
    return {
        "config": asdict(config),
        "machine": machine(),
        "dtype": "float32",
        "setup": setup,
        "estimators": estimator_rows,
        "greedy": greedy_rows,
    }
