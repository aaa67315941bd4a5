"""The sensitivity estimators at the projector widths of real models, and what a selection
costs beside the language model's prefill of the pruned prompt.

For each shape: a random Linear -> GELU -> Linear projector of that shape and random
token features (float32, as the estimators score), each estimator's scoring time per
image, its rank agreement with ``exact`` (the closed form the others estimate), and the
whole selection (scoring, then ZOO-Prune's greedy at ``keep``) as a share of the prefill of
the pruned prompt (``keep`` visual and ``text_tokens`` text tokens) through an LM of the
model's shape, timed here: one decoder layer's matrix products and causal attention in
the fast dtype of the device, times the layer count.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from functools import partial
from typing import Any

import torch
from torch import nn

from zooprune.bench.kernels import random_projector_inputs
from zooprune.bench.timing import fast_dtype, machine, median_seconds, spearman, timed, topk_overlap
from zooprune.select.greedy import maxmin_select
from zooprune.select.methods import sensitivity_scores
from zooprune.select.registry import TokenSet
from zooprune.select.sensitivity import minmax_normalize


@dataclass(frozen=True)
class WidthShape:
    """A projector (input, hidden H, output) and the LM it feeds."""

    name: str
    vision_dim: int
    hidden: int
    text_dim: int
    lm_layers: int
    lm_ffn: int
    lm_heads: int
    lm_kv_heads: int


#: the default model of ``zooprune speed``, LLaVA-1.5-7B and -13B (CLIP ViT-L/14-336 into
#: a 2-layer MLP), and the MLP of Qwen2.5-VL-7B's merger (2 x 2 patches of its 1280-wide
#: tower, concatenated; the RMSNorm in front of it is left out, so that ``exact`` applies)
SHAPES = (
    WidthShape("zooprune speed default", 256, 1024, 1024, 12, 2816, 16, 16),
    WidthShape("LLaVA-1.5-7B", 1024, 4096, 4096, 32, 11008, 32, 32),
    WidthShape("LLaVA-1.5-13B", 1024, 5120, 5120, 40, 13824, 40, 40),
    WidthShape("Qwen2.5-VL-7B merger", 5120, 5120, 3584, 28, 18944, 28, 4),
)


@dataclass
class WidthBenchConfig:
    tokens: int = 576
    keep: int = 64
    text_tokens: int = 40
    images: int = 1
    num_directions: int = 64
    rank: int = 128
    estimators: tuple[str, ...] = ("exact", "lowrank", "jvp", "zo")
    #: names of :data:`SHAPES`, or shapes of one's own
    shapes: tuple[str | WidthShape, ...] = tuple(shape.name for shape in SHAPES)
    #: sigma of a per-token log-normal scale on the features (tokens differ in size, as
    #: an image's do; 0: plain N(0, 1) features)
    token_scale: float = 0.5
    repeats: int = 3
    seed: int = 0
    device: str = "cpu"
    lm_dtype: str = "auto"


#: the Spearman correlation with ``exact`` from which an estimator counts as ranking the
#: tokens as ``exact`` does (``estimator="auto"`` is checked against the cheapest of those)
AGREEMENT = 0.99
#: a timed call shorter than this is repeated (the median taken); a longer one is taken once
QUICK = 0.5


def _median(fn: Callable[[], Any], config: WidthBenchConfig) -> float:
    with torch.no_grad():
        return median_seconds(fn, repeats=config.repeats, warmup=1, device=config.device)


def shape_named(name: str | WidthShape) -> WidthShape:
    if isinstance(name, WidthShape):
        return name
    for shape in SHAPES:
        if shape.name == name:
            return shape
    raise ValueError(f"unknown shape {name!r}; shapes: {', '.join(s.name for s in SHAPES)}")


def _inputs(
    shape: WidthShape, config: WidthBenchConfig
) -> tuple[nn.Module, list[torch.Tensor], list[torch.Tensor]]:
    projector, features = random_projector_inputs(
        (shape.vision_dim, shape.hidden, shape.text_dim),
        tokens=config.tokens,
        images=config.images,
        token_scale=config.token_scale,
        seed=config.seed,
        device=config.device,
    )
    with torch.no_grad():
        projected = [projector(x) for x in features]
    return projector, features, projected


def lm_dtype(config: WidthBenchConfig) -> str:
    return fast_dtype(config.device) if config.lm_dtype == "auto" else config.lm_dtype


def lm_prefill_seconds(shape: WidthShape, tokens: int, config: WidthBenchConfig) -> float:
    """The prefill of ``tokens`` through an LM of the shape: one decoder layer (its q, k, v,
    o and gated-MLP products, causal attention), timed, times the layers."""
    dtype = getattr(torch, lm_dtype(config))
    d, head = shape.text_dim, shape.text_dim // shape.lm_heads
    kv = shape.lm_kv_heads * head
    g = torch.Generator().manual_seed(config.seed)

    def weight(rows: int, cols: int) -> torch.Tensor:
        w = torch.randn(rows, cols, generator=g) / cols**0.5
        return w.to(config.device, dtype)

    q, k, v, o = weight(d, d), weight(kv, d), weight(kv, d), weight(d, d)
    gate, up, down = weight(shape.lm_ffn, d), weight(shape.lm_ffn, d), weight(d, shape.lm_ffn)
    x = torch.randn(1, tokens, d, generator=g).to(config.device, dtype)
    linear = nn.functional.linear

    def layer() -> torch.Tensor:
        heads = lambda t, n: t.view(1, tokens, n, head).transpose(1, 2)  # noqa: E731
        attended = nn.functional.scaled_dot_product_attention(
            heads(linear(x, q), shape.lm_heads),
            heads(linear(x, k), shape.lm_kv_heads),
            heads(linear(x, v), shape.lm_kv_heads),
            is_causal=True,
            enable_gqa=shape.lm_kv_heads != shape.lm_heads,
        )
        h = x + linear(attended.transpose(1, 2).reshape(1, tokens, d), o)
        return h + linear(nn.functional.silu(linear(h, gate)) * linear(h, up), down)

    return _median(layer, config) * shape.lm_layers


def run_width_benchmark(
    config: WidthBenchConfig, progress: Callable[[str], None] = lambda _: None
) -> dict[str, Any]:
    """Per shape and estimator: scoring and selection time per image, agreement with
    ``exact``, and the selection's share of the pruned prefill; a JSON-ready dict."""
    rows = []
    for shape in map(shape_named, config.shapes):
        name = shape.name
        progress(f"{name}: the pruned prefill")
        prefill_s = lm_prefill_seconds(shape, config.keep + config.text_tokens, config)
        projector, features, projected = _inputs(shape, config)
        token_sets = [
            TokenSet(
                features=x[None], projected=z[None], projector=projector, grid=(1, config.tokens)
            )
            for x, z in zip(features, projected, strict=True)
        ]
        scored: dict[str, list[torch.Tensor]] = {}
        for estimator in config.estimators:
            score = partial(
                sensitivity_scores,
                estimator=estimator,
                num_directions=config.num_directions,
                rank=config.rank,
            )
            # Warm-up on a few tokens: the per-model caches (exact's factor, lowrank's SVD)
            # and first-call paths, paid once per model.
            score(replace(token_sets[0], features=token_sets[0].features[:, :8]))
            seconds, greedy, scores = [], [], []
            for i, tokens in enumerate(token_sets):
                progress(f"{name}: {estimator}, image {i + 1} of {len(token_sets)}")
                elapsed, (s, _) = timed(partial(score, tokens), config.device)
                if elapsed < QUICK:  # cheap enough to take the median of a few
                    elapsed = _median(partial(score, tokens), config)
                weights = minmax_normalize(s)
                choose = partial(maxmin_select, tokens.projected, config.keep, weights=weights)
                greedy.append(_median(choose, config))
                seconds.append(elapsed)
                scores.append(s[0].cpu())
            scored[estimator] = scores
            scoring_s = statistics.median(seconds)
            selection_s = scoring_s + statistics.median(greedy)
            rows.append(
                {
                    "shape": name,
                    "estimator": estimator,
                    "scoring_s_per_image": scoring_s,
                    "greedy_s_per_image": statistics.median(greedy),
                    "selection_s_per_image": selection_s,
                    "prefill_s": prefill_s,
                    "share_of_prefill": selection_s / prefill_s,
                }
            )
        reference = scored.get("exact")
        for row in rows:
            if row["shape"] != name:
                continue
            mine = scored[row["estimator"]]
            row["spearman_vs_exact"] = (
                None
                if reference is None
                else statistics.median(spearman(a, b) for a, b in zip(mine, reference, strict=True))
            )
            row[f"top{config.keep}_overlap_vs_exact"] = (
                None
                if reference is None
                else statistics.median(
                    topk_overlap(a, b, config.keep) for a, b in zip(mine, reference, strict=True)
                )
            )
    return {
        "config": asdict(config),
        "shapes": [asdict(shape_named(shape)) for shape in config.shapes],
        "machine": machine(),
        "lm_dtype": lm_dtype(config),
        "rows": rows,
    }
