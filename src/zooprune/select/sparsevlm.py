"""SparseVLM: visual tokens ranked inside the language model by the text that looks at them.

Zhang et al., "SparseVLM: Visual Token Sparsification for Efficient Vision-Language Model
Inference" (ICML 2025, arXiv 2410.04417), as its authors' released code runs it without
token recycling (their "v2" setting, which also keeps positions):

- **raters**, once per image before the language model: of the text tokens after the
  image in its prompt, those whose relevance to the image is above their mean. The
  relevance of text token t is ``mean_j softmax_t(v_j . e_t)``: each visual token's
  (projected, ``v_j``) softmax over the text tokens' input embeddings ``e_t`` (raw dot
  products), averaged over the visual tokens (:func:`select_raters`).
- **stages**, inside the language model, at the authors' relative depths (their LLaVA-1.5
  ranks at layers 2, 6 and 15 of 32, fewer tokens from 3, 7, 16 on; scaled to the model's
  depth, one stage per distinct layer): each ranks the image's tokens still held by the
  attention its raters pay them in that layer (softmax over every key a rater sees,
  averaged over heads and raters) and keeps the top ones.

How many each stage keeps: the authors' code has fixed counts for 576-token LLaVA-1.5 at
its three budgets; zooprune takes the geometric series from N to the budget's K that
``pdrop`` takes (the last stage keeps exactly K). The paper's adaptive count (from the
rank of the raters' attention) and its recycling of dropped tokens into merged ones are
not implemented.

An image with no text after it in its prompt has no raters: its last prompt token ranks
alone (FastV's score).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from zooprune.errors import PruneError
from zooprune.select.ops import at_least_float32
from zooprune.select.pdrop import pdrop_keeps
from zooprune.select.registry import InLM, MethodResult, TokenSet, register_method

#: the first layer holding fewer tokens after each of the authors' pruning layers (2, 6, 15)
AUTHORS_LAYERS = (3, 7, 16)
#: the depth they are for (LLaVA-1.5-7B's language model)
AUTHORS_DEPTH = 32
#: how far above the mean relevance (relatively) a rater must be: past float rounding
RATER_MARGIN = 1e-5


def sparsevlm_layers(options: dict[str, Any], depth: int) -> list[int]:
    """The authors' stage layers scaled to ``depth`` (at least 1, one stage per layer)."""
    scaled = {max(1, round(depth * layer / AUTHORS_DEPTH)) for layer in AUTHORS_LAYERS}
    return sorted(layer for layer in scaled if layer <= depth)


def select_raters(visual: Tensor, text: Tensor) -> Tensor:
    """``[T]`` bool: the text tokens whose relevance to the image is above the mean.

    Args:
        visual: ``[N, d]`` the image's projected tokens.
        text: ``[T, d]`` the input embeddings of the text tokens after the image.
    """
    if text.shape[0] == 0:
        return torch.zeros(0, dtype=torch.bool, device=text.device)
    v = at_least_float32(visual)
    relevance = (v @ text.to(v.dtype).T).softmax(dim=-1).mean(dim=0)  # [T]
    # The relevances sum to 1, so their mean is 1/T; a token at it up to rounding (equally
    # relevant text) is not above it.
    return relevance > (1 + RATER_MARGIN) / text.shape[0]


@register_method(
    "sparsevlm",
    "SparseVLM: inside the LM, the tokens the prompt's relevant text attends to, in stages",
    needs=("lm_stage",),
    stages=InLM(sparsevlm_layers, pdrop_keeps, raters=select_raters),
)
def sparsevlm(tokens: TokenSet, k: int) -> MethodResult:
    """SparseVLM ranks inside the language model; ``zooprune.prune(model, "sparsevlm",
    ...)`` runs it there (``zooprune.lm_stage``)."""
    raise PruneError(
        "sparsevlm ranks visual tokens inside the language model (its raters' attention at "
        "each stage), not from the encoded image; prune a model with "
        "zooprune.prune(model, 'sparsevlm', ...) instead of selecting from a TokenSet"
    )
