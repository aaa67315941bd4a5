"""Gemma 4 (k x k pooled vision tower, ``embed_vision`` projector), any engine.

How the model lays out one image (transformers v5): the processor resizes the image,
keeping its aspect ratio, to the largest ``H x W`` with both sides multiples of
``k * p`` (``p = patch_size``, ``k = pooling_kernel_size``: 16 and 3 for the released
models) and at most ``max_soft_tokens * k^2`` patches (``max_soft_tokens`` is one of 70,
140, 280, 560, 1120; 280 by default). It cuts the image into ``(H/p) x (W/p)`` patch
rows, pads them to ``max_soft_tokens * k^2`` rows and gives each real patch its
``(x, y)`` coordinate in ``image_position_ids`` (``(-1, -1)`` for padding). The vision
tower embeds the patches with a 2-D position table, runs its encoder (2-D axial RoPE,
padding masked out), averages every ``k x k`` window of patches into one token, in raster
order over the ``(H/(p k)) x (W/(p k))`` pooled grid, scales by ``sqrt(d_v)``
(standardises, where the config asks) and strips the padding. ``embed_vision`` then maps
each pooled token to the language model: an RMSNorm without a learned scale, then one
matrix. The prompt holds, per image, ``<start_of_image>``, then N image placeholders in
raster order, then ``<end_of_image>``; ``mm_token_type_ids`` marks the placeholders 1.

What "projector" means here: ``embed_vision`` is token-wise (token j's output depends on
pooled token j only), so the projector the methods score is the model's own
``embed_vision``, ``M(x) = W x / rms(x)``, and the projector inputs X are the tower's
pooled states (what ``embed_vision`` receives), one per LM token. The pooling is inside
the tower, before X. ``M`` is not a GELU MLP, so ``estimator="auto"`` runs ``jvp``;
``exact`` and ``lowrank`` are refused with a message naming ``jvp`` and ``zo``. The norm
has no scale, so ``M(c x) = M(x)``: along x the derivative is zero, and across it it is
``W / rms(x)``, so ZOO-Prune's sensitivity falls as a token's norm grows.

Budget semantics:

- **N** = the pooled tokens of the image, ``(H/(p k)) * (W/(p k))``, at most
  ``max_soft_tokens``; it differs between images of different aspect ratios, and so does
  K under ``ratio=``. ``<start_of_image>`` / ``<end_of_image>`` are text, never scored,
  selected or counted, and always kept.
- One image is one crop: the record gives crop 0 and each kept token's ``cells``
  (row, column) in the pooled grid, ``grid == patch_grids[0]``. The processor's resize is
  unknown to the model, so ``boxes`` is None (draw over the image as processed).

Attention: where ``text_config.use_bidirectional_attention == "vision"``, the
sliding-window layers let the tokens of one image (a contiguous run of
``mm_token_type_ids`` 1) attend to each other both ways; the global layers stay causal.
With ``None`` (the smaller models) every layer is causal. Dropped placeholders leave
``input_ids``, ``attention_mask`` and ``mm_token_type_ids`` alike, so the kept tokens of
an image stay one run and keep their bidirectional attention among themselves (the masked
unpruned model's behaviour). The per-layer embeddings (PLE) are per token: a dropped
placeholder takes its own with it. As for Gemma 3, the sliding-window layers count cache
slots, not positions, so pruning equals "the dropped tokens never existed" for them
exactly while the prompt fits in the window.

Positions: 1-D (default RoPE in the sliding layers, "proportional" RoPE in the global
ones, both over the same 1-D ids), so both modes apply: ``"compact"`` (default) renumbers
the shortened prompt, ``"original"`` keeps every token's unpruned position.

Other modalities: videos (``pixel_values_videos``) and audio (``input_features``) are not
pruned. A call without ``pixel_values`` passes through unpruned whatever else it holds;
a call with images and videos or audio is refused with a PruneError before the model runs.
The tower has no CLS token: ``visionzip`` is refused, naming the methods that apply.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from zooprune.errors import PruneError
from zooprune.pipeline import EncodedImages, ImageLayout

#: where the projector's tensors live in a checkpoint (transformers 5)
PROJECTOR_PREFIXES = ("model.embed_vision.", "embed_vision.")


class UnscaledRMSNorm(nn.Module):
    """Gemma 4's RMSNorm without a scale: ``x / rms(x)``, computed in float32."""

    def __init__(self, eps: float) -> None:
        super().__init__()
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        h = x.float()
        return (h * torch.pow(h.pow(2).mean(-1, keepdim=True) + self.eps, -0.5)).type_as(x)


class Embedder(nn.Module):
    """``embed_vision`` as plain modules: the unscaled RMSNorm, then one matrix. The
    Hugging Face model's own module is the projector the methods score there; this is the
    same map rebuilt from checkpoint tensors for another engine."""

    def __init__(self, weight: Tensor, eps: float) -> None:
        super().__init__()
        self.embedding_pre_projection_norm = UnscaledRMSNorm(eps)
        self.embedding_projection = nn.Linear(weight.shape[1], weight.shape[0], bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.embedding_projection(self.embedding_pre_projection_norm(x))


def projector_from_tensors(
    tensors: Mapping[str, Tensor], config: Any, dtype: torch.dtype
) -> nn.Module:
    """``embed_vision`` rebuilt from its checkpoint tensors (keys relative to it)."""
    weight = tensors["embedding_projection.weight"]
    embedder = Embedder(weight, config.vision_config.rms_norm_eps)
    embedder.load_state_dict({"embedding_projection.weight": weight})
    return embedder.to(dtype).eval().requires_grad_(False)


def encoded(
    features: Tensor,
    projected: list[Tensor],
    grids: list[tuple[int, int]],
    *,
    engine: str,
    encoder_output: Any = None,
) -> EncodedImages:
    """Every image of a call: ``features`` ``[sum N_i, d_v]`` the pooled states the
    projector receives, ``projected`` the tokens per image, on the pooled ``grids``."""
    counts = [t.shape[0] for t in projected]
    if features.shape[0] != sum(counts) or [h * w for h, w in grids] != counts:
        raise RuntimeError(
            f"{engine}: the tower gave {' + '.join(map(str, counts))} tokens "
            f"from {features.shape[0]} pooled states; the pooled grids {grids} expected "
            f"{[h * w for h, w in grids]}"
        )
    return EncodedImages(
        features=list(features.split(counts)),
        projected=projected,
        grids=grids,
        cls_attention=None,
        keys=None,
        encoder_output=encoder_output,
        layouts=[ImageLayout.single(p, g) for p, g in zip(projected, grids, strict=True)],
    )


def pooled_grids(positions: Tensor, kernel: int) -> list[tuple[int, int]]:
    """Per image, ``(rows, cols)`` of its pooled grid, from its patches' ``(x, y)``.

    The tower pools ``kernel x kernel`` windows of a full patch grid whose sides are
    multiples of ``kernel`` (the processor's resize ensures it); anything else is refused,
    since the model would then pool patches of different rows into one token.
    """
    grids = []
    for image, xy in enumerate(positions):
        real = xy[(xy != -1).all(dim=-1)]
        if real.numel() == 0:
            raise PruneError(f"image {image} has no patches in image_position_ids")
        width, height = (int(v) + 1 for v in real.amax(dim=0))
        full = real.shape[0] == width * height and bool((real.amin(dim=0) == 0).all())
        if not full or width % kernel or height % kernel:
            raise PruneError(
                f"image {image}'s image_position_ids do not form a full patch grid with sides "
                f"multiple of pooling_kernel_size={kernel} ({real.shape[0]} patches, up to "
                f"x={width - 1}, y={height - 1}); build the inputs with the model's processor"
            )
        grids.append((height // kernel, width // kernel))
    return grids
