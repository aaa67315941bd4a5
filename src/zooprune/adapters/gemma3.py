"""Gemma 3: ``Gemma3ForConditionalGeneration`` (SigLIP tower, pooling projector).

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

from typing import Any

import torch
from torch import Tensor, nn
from transformers import Gemma3ForConditionalGeneration
from transformers.modeling_outputs import BaseModelOutputWithPooling

from zooprune.adapters.base import Adapter, EncodedImages


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


class Gemma3Adapter(Adapter):
    """Gemma 3: a fixed ``s x s`` pooled grid per image, marker tokens around it."""

    name = "gemma3"
    model_classes = (Gemma3ForConditionalGeneration,)
    requirement = "(SigLIP tower, average-pooled to `mm_tokens_per_image` tokens)"
    tokens_per_image = (
        "`mm_tokens_per_image` (256): the pooled grid; `<start_of_image>` / `<end_of_image>` "
        "excluded; a pan-and-scan crop counts as an image"
    )
    # SigLIP has no CLS token whose attention VisionZip could rank by.
    extras = {"cls_attention": ""}
    image_input_names = ("pixel_values",)

    def image_token_id(self, model: nn.Module) -> int:
        return model.config.image_token_id

    def projector(self, model: nn.Module) -> nn.Module:
        return PooledProjector(model.model.multi_modal_projector)

    def encode(
        self, model: nn.Module, image_inputs: dict[str, Any], needs: frozenset[str]
    ) -> EncodedImages:
        """Encode ``pixel_values`` ``[P, 3, H, W]`` once, capturing the pooled states.

        Returns per image: features ``[N, d_v]`` (the pooled patch states the RMSNorm
        receives), projected ``[N, d_l]`` (the model's own tokens), grid ``(s, s)``.
        """
        projector = model.model.multi_modal_projector
        captured: dict[str, Tensor] = {}

        def on_norm(module: nn.Module, args: tuple) -> None:
            captured["features"] = args[0]

        hook = projector.mm_soft_emb_norm.register_forward_pre_hook(on_norm)
        try:
            output = model.model.get_image_features(
                pixel_values=image_inputs["pixel_values"], return_dict=True
            )
        finally:
            hook.remove()
        features, projected = captured["features"], output.pooler_output  # [P, N, d_v], [P, N, d_l]
        side = projector.tokens_per_side
        if features.shape[1] != side * side or projected.shape[:2] != features.shape[:2]:
            raise RuntimeError(
                f"Gemma 3 projector gave {tuple(projected.shape)} tokens from pooled states "
                f"{tuple(features.shape)}; expected {side} x {side} per image"
            )
        return EncodedImages(
            features=list(features),
            projected=list(projected),
            grids=[(side, side)] * features.shape[0],
            cls_attention=None,
            keys=None,
            encoder_output=output,
        )

    def encoder_output(self, encoded: EncodedImages, kept_tokens: list[Tensor]) -> Any:
        # The model fills placeholders in order from one tensor; runs may differ in length
        # only if N did, so one row of all kept tokens serves every case.
        return BaseModelOutputWithPooling(pooler_output=torch.cat(kept_tokens)[None])
