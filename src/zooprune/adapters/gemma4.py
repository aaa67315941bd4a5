"""Gemma 4: ``Gemma4ForConditionalGeneration`` (pooled vision tower, norm + linear projector).

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

from typing import Any

from torch import Tensor, nn
from transformers import Gemma4ForConditionalGeneration
from transformers.modeling_outputs import BaseModelOutputWithPooling

from zooprune.adapters.base import Adapter, EncodedImages, ImageLayout
from zooprune.errors import PruneError

#: the inputs of the modalities this adapter does not prune, by name in the refusal
_OTHER_MODALITIES = {"videos": "pixel_values_videos", "audio": "input_features"}


class Gemma4Adapter(Adapter):
    """Gemma 4: one pooled grid per image, its size set by the image's aspect ratio."""

    name = "gemma4"
    model_classes = (Gemma4ForConditionalGeneration,)
    requirement = "(k x k pooled vision tower; videos and audio pass unpruned)"
    tokens_per_image = (
        "the pooled grid of the resized image, at most `max_soft_tokens` (280); "
        "`<start_of_image>` / `<end_of_image>` excluded"
    )
    # The tower has no CLS token whose attention VisionZip could rank by.
    extras = {"cls_attention": ""}
    # The other modalities' inputs are taken too, so that a call mixing them with images
    # reaches encode() and is refused there (only calls with pixel_values get that far).
    image_input_names = (
        "pixel_values",
        "image_position_ids",
        "pixel_values_videos",
        "video_position_ids",
        "num_frames_per_video",
        "input_features",
        "input_features_mask",
    )

    def image_token_id(self, model: nn.Module) -> int:
        return model.config.image_token_id

    def projector(self, model: nn.Module) -> nn.Module:
        return model.model.embed_vision

    def encode(
        self, model: nn.Module, image_inputs: dict[str, Any], needs: frozenset[str]
    ) -> EncodedImages:
        """Encode every image once, capturing ``embed_vision``'s input.

        Args:
            image_inputs: ``pixel_values [I, P, 3 p^2]`` (the processor's padded patch
                rows) and ``image_position_ids [I, P, 2]``.

        Returns:
            per image: features ``[N_i, d_v]`` (the pooled states, raster order),
            projected ``[N_i, d_l]`` (the model's own tokens), grid ``(rows, cols)``.
        """
        others = [
            what for what, key in _OTHER_MODALITIES.items() if image_inputs.get(key) is not None
        ]
        if others:
            raise PruneError(
                f"pruning a call with both images and {' and '.join(others)} is not supported "
                f"for {type(model).__name__}; {' and '.join(others)} pass through unpruned only "
                "in calls without pixel_values"
            )
        positions = image_inputs.get("image_position_ids")
        if positions is None:
            raise PruneError(
                f"{type(model).__name__} needs image_position_ids with pixel_values "
                "(the processor returns them)"
            )
        grids = _pooled_grids(positions, model.config.vision_config.pooling_kernel_size)
        captured: dict[str, Tensor] = {}

        def on_projector(module: nn.Module, args: tuple, kwargs: dict) -> None:
            # The model passes the pooled states by keyword (``inputs_embeds=``).
            captured["features"] = kwargs["inputs_embeds"] if "inputs_embeds" in kwargs else args[0]

        hook = self.projector(model).register_forward_pre_hook(on_projector, with_kwargs=True)
        try:
            output = model.model.get_image_features(
                pixel_values=image_inputs["pixel_values"],
                image_position_ids=positions,
                return_dict=True,
            )
        finally:
            hook.remove()
        projected = list(output.pooler_output)  # per image [N_i, d_l]
        counts = [t.shape[0] for t in projected]
        features = captured["features"]  # [sum N_i, d_v]
        if features.shape[0] != sum(counts) or [h * w for h, w in grids] != counts:
            raise RuntimeError(
                f"{type(model).__name__}: the tower gave {' + '.join(map(str, counts))} tokens "
                f"from {features.shape[0]} pooled states; the pooled grids {grids} expected "
                f"{[h * w for h, w in grids]}"
            )
        return EncodedImages(
            features=list(features.split(counts)),
            projected=projected,
            grids=grids,
            cls_attention=None,
            keys=None,
            encoder_output=output,
            layouts=[ImageLayout.single(p, g) for p, g in zip(projected, grids, strict=True)],
        )

    def encoder_output(self, encoded: EncodedImages, kept_tokens: list[Tensor]) -> Any:
        # The model concatenates the per-image tuple and fills placeholders in order.
        return BaseModelOutputWithPooling(pooler_output=tuple(kept_tokens))


def _pooled_grids(positions: Tensor, kernel: int) -> list[tuple[int, int]]:
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
