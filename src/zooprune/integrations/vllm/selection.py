"""What every pruned vLLM model shares: its settings, the projector it scores, and the one
selection pipeline (:mod:`zooprune.pipeline`) over the tokens vLLM's tower and projector
made.

On a CPU vLLM repacks each Linear's weights after loading and leaves ``weight`` empty, and
under tensor parallelism each rank holds a shard: the projector the sensitivity methods
score is therefore a plain copy of the checkpoint's full weights, taken while vLLM streams
them in. Every rank then scores the whole projector and keeps the same tokens.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from zooprune.errors import PruneError
from zooprune.pipeline import EncodedImages, Selector
from zooprune.select import get_method

#: the settings keys that are not method options
GENERAL = ("method", "keep", "ratio")


@dataclass
class Tally:
    """The selection work done in this process: images and seconds (scoring and greedy)."""

    images: int = 0
    seconds: float = 0.0
    synchronize: bool = False  # wait for a GPU's queued work on both sides of the timing

    def reset(self) -> None:
        self.images, self.seconds = 0, 0.0


#: read by the throughput benchmark (its engine runs in the benchmark's process)
TALLY = Tally()


def selector_from(
    settings: dict[str, Any], layout: dict[str, tuple[str, ...]] | None = None
) -> Selector:
    """The :class:`~zooprune.pipeline.Selector` the settings describe, every value checked,
    and the method one that a vLLM model can serve: one that needs nothing beyond the
    features, tokens and projector. Its towers fuse q/k/v, so they give neither the CLS
    attention nor the CLS state (``visionzip``); the prompt's text embeddings
    (``cdpruner``) and a stage inside the language model (``fastv``) are not offered."""
    if not isinstance(settings, dict):
        raise PruneError(f"the zooprune settings must be a dict, got {settings!r}")
    options = {k: v for k, v in settings.items() if k not in GENERAL}
    get_method(settings.get("method", "zoo"))
    selector = Selector.build(
        settings.get("method", "zoo"),
        keep=settings.get("keep"),
        ratio=settings.get("ratio"),
        options=options,
        layout_options=layout or {},
    )
    selector.check_provided(frozenset(), "vLLM model")
    return selector


def selector_for(config: Any, layout: dict[str, tuple[str, ...]] | None = None) -> Selector:
    """The selector of a pruned variant: from the settings its HF ``config`` carries."""
    from zooprune.integrations.vllm import SETTINGS

    return selector_from(getattr(config, SETTINGS, None), layout)


def refuse_embeddings(image_input: dict[str, Any]) -> None:
    """Pruning selects among the tower's tokens: precomputed embeddings are refused."""
    if image_input.get("type") == "image_embeds":
        raise PruneError("pruning needs pixel values, not precomputed image embeddings")


class ProjectorCopy:
    """Collects the projector's checkpoint tensors as vLLM streams the weights in."""

    def __init__(self, prefixes: tuple[str, ...]) -> None:
        self.prefixes = prefixes
        self.tensors: dict[str, Tensor] = {}

    def watch(self, weights: Iterable[tuple[str, Tensor]]) -> Iterator[tuple[str, Tensor]]:
        for name, tensor in weights:
            for prefix in self.prefixes:
                if name.startswith(prefix):
                    self.tensors[name[len(prefix) :]] = tensor.detach().clone()
            yield name, tensor

    def gelu_mlp(self, activation: str, dtype: torch.dtype) -> nn.Module:
        """The LLaVA projector, Linear -> activation -> Linear, as a plain module."""
        t = self.tensors
        first, second = t["linear_1.weight"], t["linear_2.weight"]
        mlp = nn.Sequential(
            nn.Linear(first.shape[1], first.shape[0], bias="linear_1.bias" in t),
            _activation(activation),
            nn.Linear(second.shape[1], second.shape[0], bias="linear_2.bias" in t),
        )
        mlp.load_state_dict(
            {k.replace("linear_1", "0").replace("linear_2", "2"): v for k, v in t.items()}
        )
        return mlp.to(dtype).eval().requires_grad_(False)


def _activation(name: str) -> nn.Module:
    if name == "gelu":
        return nn.GELU()
    if name in ("gelu_pytorch_tanh", "gelu_new", "gelu_fast"):
        return nn.GELU(approximate="tanh")
    raise PruneError(f"projector activation {name!r} is not supported for scoring")


def select_runs(model: nn.Module, encoded: EncodedImages) -> list[Tensor]:
    """Per image, the run of tokens that fills its (already shortened) placeholders.

    ``model`` is the pruned vLLM model (its ``selector`` and ``scoring_projector``); it
    keeps the last call's kept indices per image in ``zooprune_kept`` (for inspection,
    e.g. through ``LLM.apply_model``).
    """
    projector = model.scoring_projector.to(encoded.features[0].device)
    synchronize = TALLY.synchronize and encoded.features[0].is_cuda
    if synchronize:
        torch.cuda.synchronize()
    start = time.perf_counter()
    kept = model.selector.select(encoded, projector)
    if synchronize:
        torch.cuda.synchronize()
    TALLY.seconds += time.perf_counter() - start
    TALLY.images += len(kept.images)
    object.__setattr__(model, "zooprune_kept", [image.indices.cpu() for image in kept.images])
    return [image.run for image in kept.images]
