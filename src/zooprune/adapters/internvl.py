"""InternVL on Hugging Face: ``InternVLForConditionalGeneration``.

The layout (tiles: sub-crops and a thumbnail), its budget semantics, the tile count read
off the prompt and the crops' boxes are the family's (:mod:`zooprune.families.internvl`);
this adapter runs the model's own image encoding with the connector's input captured,
and computes VisionZip's CLS attention from InternViT's own layer.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn
from transformers import InternVLForConditionalGeneration
from transformers.modeling_outputs import BaseModelOutputWithPooling

from zooprune.adapters.base import CROP_BUDGETS, Adapter, EncodedImages, run_capturing
from zooprune.errors import PruneError
from zooprune.families import internvl


class InternVLAdapter(Adapter):
    """InternVL: GotOcr2 tiles (sub-crops + a thumbnail) per image, pixel-shuffled, MLP."""

    name = "internvl"
    model_classes = (InternVLForConditionalGeneration,)
    requirement = "(GotOcr2 tiling into sub-crops + a thumbnail, pixel-shuffle MLP connector)"
    tokens_per_image = (
        "(sub-crops + 1 thumbnail, or 1 tile) x (side / patch x downsample_ratio)^2; "
        "`<img>` / `</img>` excluded"
    )
    extras = {
        "cls_attention": "InternViT tower, `default` feature strategy, one feature layer (not 0)"
    }
    options = {"crop_budget": CROP_BUDGETS}
    image_input_names = (
        "pixel_values",
        "image_sizes",
        "vision_feature_layer",
        "vision_feature_select_strategy",
    )
    reads_prompt = True

    def provides(self, model: nn.Module) -> frozenset[str]:
        # The CLS token exists in InternViT; it is outside the features under "default",
        # and a single layer past the embeddings has an attention to read it from.
        config = model.config
        layer = config.vision_feature_layer
        if (
            config.vision_config.model_type == "internvl_vision"
            and config.vision_feature_select_strategy == "default"
            and isinstance(layer, int)
            and layer != 0
        ):
            return frozenset({"cls_attention"})
        return frozenset()

    def image_token_id(self, model: nn.Module) -> int:
        return model.config.image_token_id

    def projector(self, model: nn.Module) -> nn.Module:
        return model.model.multi_modal_projector

    def encode(
        self,
        model: nn.Module,
        image_inputs: dict[str, Any],
        needs: frozenset[str],
        input_ids: Tensor | None = None,
    ) -> EncodedImages:
        """Encode every tile once; group the tiles into images by the prompt's runs.

        Args:
            image_inputs: ``pixel_values [tiles, 3, H, W]`` (all images' tiles in prompt
                order), optionally ``image_sizes [images, 2]`` (height, width) and the
                call's ``vision_feature_layer`` / ``vision_feature_select_strategy``.
            input_ids: ``[B, L]`` the prompts, read only.

        Returns:
            per image: features ``[N, r^2 d_v]`` and projected ``[N, d_l]`` in prompt
            order (sub-crops, then the thumbnail), its layout, and when ``needs`` has
            ``"cls_attention"``, ``[N]`` CLS attention and ``[N, r^2 d_k]`` keys.
        """
        if input_ids is None:
            raise PruneError("InternVL pruning needs input_ids: images are read off the prompt")
        config = model.config
        pixel_values = image_inputs["pixel_values"]
        layer = image_inputs.get("vision_feature_layer")
        layer = config.vision_feature_layer if layer is None else layer
        strategy = image_inputs.get("vision_feature_select_strategy")
        strategy = config.vision_feature_select_strategy if strategy is None else strategy
        attention = _attention_layer(model, layer, strategy) if "cls_attention" in needs else None
        output, captured = run_capturing(
            lambda: model.model.get_image_features(
                pixel_values=pixel_values,
                vision_feature_layer=layer,
                vision_feature_select_strategy=strategy,
                return_dict=True,
            ),
            self.projector(model),
            attention,
        )
        features, projected = captured["features"], captured["projected"]  # [tiles, T, .]
        tiles, per_tile = projected.shape[:2]
        counts = internvl.tiles_per_image(input_ids, self.image_token_id(model), per_tile, tiles)
        sizes = internvl.image_sizes(image_inputs.get("image_sizes"), len(counts))
        tile_size = (int(pixel_values.shape[-2]), int(pixel_values.shape[-1]))
        cls_attention = keys = None
        if "cls_attention" in needs:
            attn, key = _cls_attention_and_keys(attention, captured["attention_input"])
            # The features dropped CLS ("default"): drop it here too, then regroup each
            # r x r window exactly as the model regrouped the features.
            cls_attention = _shuffle(model, attn[:, 1:, None]).sum(dim=-1)  # [tiles, T]
            keys = _shuffle(model, key[:, 1:])  # [tiles, T, r^2 d_k]
        return internvl.encoded(
            features,
            projected,
            counts,
            tile_size,
            sizes,
            cls_attention=cls_attention,
            keys=keys,
            encoder_output=output,
        )

    def encoder_output(self, encoded: EncodedImages, kept_tokens: list[Tensor]) -> Any:
        # The model expects one tensor and fills the placeholders with its rows in order;
        # [1, total kept, d_l] passes its count check (tokens x hidden == numel).
        return BaseModelOutputWithPooling(pooler_output=torch.cat(kept_tokens)[None])


def _attention_layer(model: nn.Module, feature_layer: Any, strategy: str) -> nn.Module:
    """The InternViT attention whose output becomes the feature layer's hidden states."""
    if strategy != "default":
        raise PruneError(
            f"CLS attention needs vision_feature_select_strategy='default', got {strategy!r}"
        )
    if not isinstance(feature_layer, int):
        raise PruneError(
            f"CLS attention needs a single vision_feature_layer, got {feature_layer!r}"
        )
    layers = model.model.vision_tower.encoder.layer
    # hidden_states[j] is the output of layer j - 1 (j = 0: the embeddings); -1 is the
    # last layer's output (after the tower's final norm, an identity under mean pooling).
    index = feature_layer if feature_layer < 0 else feature_layer - 1
    if feature_layer == 0 or not -len(layers) <= index < len(layers):
        raise PruneError(f"vision_feature_layer {feature_layer} has no attention layer")
    return layers[index].attention


def _cls_attention_and_keys(attention: nn.Module, hidden: Tensor) -> tuple[Tensor, Tensor]:
    """CLS-row attention (summed over heads) and head-averaged keys of an InternViT layer.

    Computed from the layer's own projections and q/k norms, in float32.

    Args:
        hidden: ``[B, 1 + P, d_v]`` the attention's (normalised) input, CLS first.

    Returns:
        ``[B, 1 + P]`` attention from CLS to every token, ``[B, 1 + P, head_dim]`` keys.
    """
    batch, length, _ = hidden.shape
    heads, head_dim = attention.num_heads, attention.head_dim
    # The norms act on the whole projected vector (before the head split), per token.
    q = attention.q_norm(attention.q_proj(hidden[:, :1]))
    k = attention.k_norm(attention.k_proj(hidden))
    q = q.view(batch, 1, heads, head_dim).transpose(1, 2).float()
    k = k.view(batch, length, heads, head_dim).transpose(1, 2).float()
    logits = (q @ k.transpose(-1, -2)) * attention.scale  # [B, H, 1, 1 + P]
    return logits.softmax(dim=-1).sum(dim=1)[:, 0], k.mean(dim=1)


def _shuffle(model: nn.Module, per_patch: Tensor) -> Tensor:
    """``[B, P, c]`` per-patch values -> ``[B, T, r^2 c]`` by the model's own pixel shuffle."""
    batch, patches, channels = per_patch.shape
    side = int(round(patches**0.5))
    grid = per_patch.reshape(batch, side, side, channels).contiguous()
    shuffled = model.model.pixel_shuffle(grid, scale_factor=model.config.downsample_ratio)
    return shuffled.reshape(batch, -1, shuffled.shape[-1])
