"""PyramidDrop: visual tokens dropped in stages inside the language model.

Xing et al., "PyramidDrop: Accelerating Your Large Vision-Language Models via Pyramid
Visual Redundancy Reduction" (CVPR 2025, arXiv 2410.17247). The language model is cut into
``stages + 1`` parts of (about) equal depth; at the end of each of the first ``stages``
parts, the image's tokens still held are ranked by the attention the last prompt token
pays them in that part's last layer (FastV's score, :mod:`zooprune.select.fastv`), and
the top ones go on. With LLaVA-1.5's 32 layers and ``stages=3`` the cuts fall after
layers 8, 16 and 24, as in the authors' configuration.

How many each stage keeps: a geometric series from the image's N to the budget's K, stage
s of S keeping ``int(N (K / N)^(s / S))`` (the last K): the paper's ratio lambda per stage
is ``(K / N)^(1 / S)``; its default 0.5 over 3 stages is K = N / 8 (576 -> 288 -> 144 ->
72). As in the authors' code, each count is a fraction of the image's original N.

The stage itself (hooks on the language model, caches, masks) is ``zooprune.lm_stage``,
shared with FastV: PyramidDrop with one stage at layer K is FastV at ``layer=K``.
"""

from __future__ import annotations

from typing import Any

from zooprune.errors import PruneError
from zooprune.select.registry import InLM, MethodResult, TokenSet, check_int, register_method

#: the authors' stages (4 parts of LLaVA-1.5's 32 layers)
DEFAULT_STAGES = 3


def pdrop_layers(options: dict[str, Any], depth: int) -> list[int]:
    """The first layer of each later part: ``round(depth * s / (stages + 1))``. Unset,
    ``stages`` is :data:`DEFAULT_STAGES`, or ``depth - 1`` for a shallower LM (each stage
    needs a layer of its own)."""
    stages = options["stages"]
    if stages is None:
        stages = max(1, min(DEFAULT_STAGES, depth - 1))
    return [round(depth * s / (stages + 1)) for s in range(1, stages + 1)]


def pdrop_keeps(options: dict[str, Any], n: int, k: int, stages: int) -> list[int]:
    """Stage s of S keeps ``int(n (k / n)^(s / S))``, the last exactly k."""
    kept = [max(k, int(n * (k / n) ** (s / stages))) for s in range(1, stages)]
    return [*kept, k]


def check_pdrop_options(options: dict[str, Any], keep: int | None) -> dict[str, Any]:
    # Whether the language model is deep enough is checked by prune() on the model.
    stages = options["stages"]
    return options | {"stages": None if stages is None else check_int("stages", stages, low=1)}


@register_method(
    "pdrop",
    "PyramidDrop: FastV's ranking in stages, fewer tokens after each part of the LM",
    needs=("lm_stage",),
    validate=check_pdrop_options,
    stages=InLM(pdrop_layers, pdrop_keeps),
)
def pdrop(tokens: TokenSet, k: int, *, stages: int | None = None) -> MethodResult:
    """PyramidDrop ranks inside the language model; ``zooprune.prune(model, "pdrop",
    ...)`` runs it there (``zooprune.lm_stage``)."""
    raise PruneError(
        "pdrop ranks visual tokens inside the language model (the last prompt token's "
        "attention at the end of each stage), not from the encoded image; prune a model "
        "with zooprune.prune(model, 'pdrop', ...) instead of selecting from a TokenSet"
    )
