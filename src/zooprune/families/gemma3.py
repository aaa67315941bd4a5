"""Gemma 3 (SigLIP tower, pooling projector), whatever engine runs it.

How the model lays out one image (transformers v5): the SigLIP tower turns the image,
resized to its square input, into ``p x p`` patch states (``p = image_size / patch``);
the multi-modal projector average-pools them to ``s x s`` (``s = sqrt(mm_tokens_per_image)``,
a ``p / s`` window per token), applies an RMSNorm and one matrix. The prompt holds, per
image, ``<start_of_image>``, then ``s * s`` image placeholders in raster order, then
``<end_of_image>``; image placeholders carry ``token_type_ids == 1``, which the model
turns into bidirectional attention among the tokens of one image.

What "projector" means here: the average pool mixes ``(p / s)^2`` patches into one token,
so the projector as a whole is not token-wise. Its token-wise part is what follows the
pool, ``M(x) = RMSNorm(x) @ W`` on one pooled token; that is the projector the methods see
(:class:`PooledProjector`), and the projector inputs X are the pooled patch states (the
RMSNorm's input), one per LM token. ZOO-Prune's sensitivity is thus that of ``M`` at each
pooled token. ``M`` is not a GELU MLP, so ``estimator="auto"`` runs ``jvp``; ``exact`` and
``lowrank`` are refused with a message naming ``jvp`` and ``zo``.

Budget semantics:

- **N** = ``mm_tokens_per_image`` (256 for the released models), the pooled grid; the
  ``<start_of_image>`` / ``<end_of_image>`` markers are ordinary text tokens, never
  scored, selected or counted, and always kept. N is the same for every image, so K is.
- One image is one crop. With pan-and-scan the processor adds each crop as an image of
  its own (its own marker pair and run) and the model gets no grouping of crops into
  images, so each crop has its own budget of K.

Sequence surgery: dropped placeholders leave ``input_ids``, ``attention_mask`` and
``token_type_ids`` alike, so the kept tokens of an image stay one contiguous block with
type 1 and keep their bidirectional attention among themselves (the masked unpruned
model's behaviour). The sliding-window layers count cache slots, not positions: a pruned
prompt brings text closer together in the cache, so pruning equals "the dropped tokens
never existed" for those layers exactly while the prompt fits in the window (1024 for the
released models).

The SigLIP tower has no CLS token: ``visionzip`` is refused, naming the methods that apply.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from zooprune.pipeline import EncodedImages

#: where the projector's tensors live in a checkpoint (transformers 5, and the hub's)
PROJECTOR_PREFIXES = ("model.multi_modal_projector.", "multi_modal_projector.")


class PooledProjector(nn.Module):
    """The token-wise part of Gemma 3's projector: ``[..., d_v] -> [..., d_l]``.

    ``RMSNorm(x) @ W`` with the model's own norm and weight (held, not copied), applied
    to pooled patch states ``x``. Equal to the model's projector on the pooled grid.
    """

    def __init__(self, projector: nn.Module) -> None:
        super().__init__()
        # A child, not a copy: the estimators read (and may recast) the live weights.
        self.projector = projector

    def forward(self, x: Tensor) -> Tensor:
        normed = self.projector.mm_soft_emb_norm(x)
        return torch.matmul(normed, self.projector.mm_input_projection_weight)


class GemmaRMSNorm(nn.Module):
    """Gemma's RMSNorm: ``x / rms(x) * (1 + w)``, computed in float32."""

    def __init__(self, width: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(width))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return (h * (1.0 + self.weight.float())).type_as(x)


class _Projector(nn.Module):
    """Gemma 3's projector parts the scored map uses, as plain modules."""

    def __init__(self, weight: Tensor, eps: float) -> None:
        super().__init__()
        self.mm_input_projection_weight = nn.Parameter(torch.zeros_like(weight))
        self.mm_soft_emb_norm = GemmaRMSNorm(weight.shape[0], eps)


def projector_from_tensors(
    tensors: Mapping[str, Tensor], config: Any, dtype: torch.dtype
) -> nn.Module:
    """The scored projector, rebuilt from the checkpoint's ``mm_input_projection_weight``
    and ``mm_soft_emb_norm.weight`` (keys relative to the projector): equal to the Hugging
    Face adapter's."""
    weight = tensors["mm_input_projection_weight"]
    parts = _Projector(weight, config.vision_config.layer_norm_eps)
    parts.load_state_dict(dict(tensors), strict=False)
    return PooledProjector(parts.to(dtype).eval().requires_grad_(False))


def encoded(
    features: Tensor, projected: Tensor, side: int, *, engine: str, encoder_output: Any = None
) -> EncodedImages:
    """Every image (pan-and-scan crop) of a call: ``features`` ``[P, N, d_v]`` the pooled
    states the norm receives, ``projected`` ``[P, N, d_l]`` the tokens, on ``side x side``."""
    if features.shape[1] != side * side or projected.shape[:2] != features.shape[:2]:
        raise RuntimeError(
            f"{engine}: Gemma 3's projector gave {tuple(projected.shape)} tokens from pooled "
            f"states {tuple(features.shape)}; expected {side} x {side} per image"
        )
    return EncodedImages(
        features=list(features),
        projected=list(projected),
        grids=[(side, side)] * features.shape[0],
        cls_attention=None,
        keys=None,
        encoder_output=encoder_output,
    )
