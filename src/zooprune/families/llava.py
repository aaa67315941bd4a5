"""LLaVA-1.5's layout: one crop per image, N = (side / patch)^2 tokens on a square grid,
each filling one placeholder in raster order; the scored projector is the
``multi_modal_projector``, Linear -> GELU -> Linear."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor, nn

from zooprune.errors import PruneError
from zooprune.select.mlp import as_mlp

#: where the projector's tensors live in a checkpoint (transformers 5, and the hub's)
PROJECTOR_PREFIXES = ("model.multi_modal_projector.", "multi_modal_projector.")


def square_grid(num_tokens: int) -> tuple[int, int]:
    """``(s, s)`` when ``num_tokens == s * s``, else ``(1, num_tokens)``."""
    side = int(round(num_tokens**0.5))
    return (side, side) if side * side == num_tokens else (1, num_tokens)


def is_gelu_mlp(activation_name: str) -> bool:
    """Whether a projector ``linear_1 -> act -> linear_2`` with this activation is the
    Linear -> GELU -> Linear the MLP-only estimators need (known from the config alone)."""
    try:
        act = activation(activation_name)
    except PruneError:
        return False
    return as_mlp(nn.Sequential(nn.Linear(1, 1), act, nn.Linear(1, 1))) is not None


def activation(name: str) -> nn.Module:
    """The module for a config's ``projector_hidden_act``."""
    if name == "gelu":
        return nn.GELU()
    if name in ("gelu_pytorch_tanh", "gelu_new", "gelu_fast"):
        return nn.GELU(approximate="tanh")
    raise PruneError(f"projector activation {name!r} is not supported for scoring")


def projector_from_tensors(
    tensors: Mapping[str, Tensor], activation_name: str, dtype: torch.dtype
) -> nn.Module:
    """The projector, ``linear_1 -> act -> linear_2``, rebuilt from its checkpoint tensors
    (keys relative to the projector, e.g. ``linear_1.weight``) as a plain module: equal to
    the Hugging Face model's ``multi_modal_projector``."""
    first, second = tensors["linear_1.weight"], tensors["linear_2.weight"]
    mlp = nn.Sequential(
        nn.Linear(first.shape[1], first.shape[0], bias="linear_1.bias" in tensors),
        activation(activation_name),
        nn.Linear(second.shape[1], second.shape[0], bias="linear_2.bias" in tensors),
    )
    mlp.load_state_dict(
        {k.replace("linear_1", "0").replace("linear_2", "2"): v for k, v in tensors.items()}
    )
    return mlp.to(dtype).eval().requires_grad_(False)
