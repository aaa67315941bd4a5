"""FastV's ranking: the attention one query token pays every key, averaged over heads.

FastV ("An Image is Worth 1/2 Tokens After Layer 2", Chen et al., ECCV 2024) ranks an
image's visual tokens by the attention that the last token of the prompt pays them in
the last language-model layer that still sees every token, averaged over the heads,
and keeps the top ones. The softmax runs over *every* key that query attends to (text
included), as in the authors' code, which takes the layer's attention-weight matrix;
only the visual tokens' columns are then compared.

This module is the tensor math (no model): :func:`query_attention` and
:func:`top_k_ascending`. The stage that runs it inside the language model, on that
layer's own queries and keys, is ``zooprune.lm_stage``; the method is registered here so
that ``zooprune.prune(model, "fastv", ...)`` and ``zooprune methods`` know it, with
``needs=("lm_stage",)``: only families whose language model has that stage serve it.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from zooprune.errors import PruneError
from zooprune.select.registry import InLM, MethodResult, TokenSet, check_int, register_method

#: FastV's K: the first K decoder layers see every token (the authors' default, 2)
DEFAULT_LAYER = 2


def query_attention(query: Tensor, keys: Tensor, allowed: Tensor, scaling: float) -> Tensor:
    """``[B, L]`` the attention of one query per row to every key, averaged over heads.

    ``softmax(q . k_j * scaling)`` over the keys ``allowed`` lets the query see (the
    others get 0), in float32, then the mean over the query heads: FastV's score.

    Args:
        query: ``[B, H, d]`` the query token's per-head query (RoPE applied).
        keys: ``[B, H_kv, L, d]`` every token's per-head key (RoPE applied). With grouped
            queries (``H = g * H_kv``) query head h reads key head ``h // g``, as the
            language models' ``repeat_kv`` does.
        allowed: ``[B, L]`` bool, the keys the query attends to (causal and padding).
        scaling: the attention's logit scale (``head_dim ** -0.5``).
    """
    batch, heads, dim = query.shape
    groups = heads // keys.shape[1]
    grouped = query.float().view(batch, keys.shape[1], groups, dim)
    logits = torch.einsum("bkgd,bkld->bkgl", grouped, keys.float()) * scaling
    logits = logits.masked_fill(~allowed[:, None, None, :], float("-inf"))
    return logits.softmax(dim=-1).mean(dim=(1, 2))


def top_k_ascending(scores: Tensor, k: int) -> Tensor:
    """The ``k`` highest of ``scores [N]``, as indices ascending (ties: the lower index)."""
    order = torch.sort(scores, descending=True, stable=True).indices
    return order[:k].sort().values


def check_fastv_options(options: dict[str, Any], keep: int | None) -> dict[str, Any]:
    # The upper bound (the language model's depth) is checked by prune() on the model.
    return options | {"layer": check_int("layer", options["layer"], low=1)}


def fastv_layers(options: dict[str, Any], depth: int) -> list[int]:
    """One stage: layers ``layer ..`` hold the kept tokens."""
    return [options["layer"]]


def last_is_k(options: dict[str, Any], n: int, k: int, stages: int) -> list[int]:
    return [k]


@register_method(
    "fastv",
    "FastV: top tokens by the last prompt token's attention, dropped inside the LM",
    needs=("lm_stage",),
    validate=check_fastv_options,
    stages=InLM(fastv_layers, last_is_k),
)
def fastv(tokens: TokenSet, k: int, *, layer: int = DEFAULT_LAYER) -> MethodResult:
    """FastV ranks inside the language model, on its hidden states at ``layer - 1``:
    there is nothing to rank in the encoded image alone. ``zooprune.prune(model,
    "fastv", ...)`` runs it there (``zooprune.lm_stage``)."""
    raise PruneError(
        "fastv ranks visual tokens inside the language model (the last prompt token's "
        "attention at layer K-1), not from the encoded image; prune a model with "
        "zooprune.prune(model, 'fastv', ...) instead of selecting from a TokenSet"
    )
