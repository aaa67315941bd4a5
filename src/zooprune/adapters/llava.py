"""LLaVA-1.5 layout: ``LlavaForConditionalGeneration`` (CLIP-style tower, MLP projector).

Every image gives N = (side / patch)^2 tokens (576 for LLaVA-1.5), the projector input is
the selected vision layer's hidden states (CLS dropped under the ``"default"`` strategy),
and each visual token fills one ``<image>`` placeholder of the prompt, in order.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn
from transformers import LlavaForConditionalGeneration
from transformers.modeling_outputs import BaseModelOutputWithPooling

from zooprune.adapters.base import Adapter, EncodedImages, run_capturing
from zooprune.errors import PruneError
from zooprune.families.llava import square_grid


def _cls_attention_and_keys(attention: nn.Module, hidden: Tensor) -> tuple[Tensor, Tensor]:
    """CLS-row attention (summed over heads) and head-averaged keys of a CLIP attention layer.

    Computed from the layer's own projections, so the tower may keep running SDPA.

    Args:
        hidden: ``[B, T, D]`` the layer's (normalised) input, CLS at position 0.

    Returns:
        ``[B, T]`` attention from CLS to every token, ``[B, T, head_dim]`` keys.
    """
    batch, length, _ = hidden.shape
    heads, head_dim = attention.num_heads, attention.head_dim
    q = attention.q_proj(hidden[:, :1]).view(batch, 1, heads, head_dim).transpose(1, 2)
    k = attention.k_proj(hidden).view(batch, length, heads, head_dim).transpose(1, 2)
    logits = (q.float() @ k.float().transpose(-1, -2)) * attention.scale  # [B, H, 1, T]
    return logits.softmax(dim=-1).sum(dim=1)[:, 0], k.float().mean(dim=1)


def attention_received(attention: nn.Module, hidden: Tensor) -> Tensor:
    """``[B, T]`` the attention each token receives in a CLIP or SigLIP attention layer,
    averaged over heads and queries (from the layer's own projections, one crop or frame
    at a time: a ``[H, T, T]`` map per crop, not per call).

    Args:
        hidden: ``[B, T, D]`` the layer's (normalised) input.
    """
    heads, head_dim = attention.num_heads, attention.head_dim
    received = []
    for one in hidden:
        q = attention.q_proj(one).view(-1, heads, head_dim).transpose(0, 1).float()
        k = attention.k_proj(one).view(-1, heads, head_dim).transpose(0, 1).float()
        weights = ((q @ k.transpose(-1, -2)) * attention.scale).softmax(dim=-1)  # [H, T, T]
        received.append(weights.mean(dim=(0, 1)))
    return torch.stack(received)


_TOWERS = ("clip_vision_model", "siglip_vision_model")


class LlavaAdapter(Adapter):
    name = "llava"
    model_classes = (LlavaForConditionalGeneration,)
    requirement = "with a CLIP or SigLIP vision tower (the LLaVA-1.5 layout)"
    tokens_per_image = "(image side / patch)^2, CLS excluded"
    extras = {
        "cls_attention": "CLIP tower, `default` feature strategy, one feature layer",
        # visionzip's cls_token=True: the feature layer's CLS state, one per image
        "cls_token": "CLIP tower, `default` feature strategy, one feature layer",
        # fastv's stage inside the language model (zooprune.lm_stage), not the tower's
        "lm_stage": "a full-attention decoder language model (e.g. Llama), DynamicCache",
    }
    image_input_names = (
        "pixel_values",
        "image_sizes",
        "vision_feature_layer",
        "vision_feature_select_strategy",
    )

    @classmethod
    def supports(cls, model: nn.Module) -> bool:
        # Other towers under this class (Pixtral) pack all images into one sequence.
        tower = getattr(model.config, "vision_config", None)
        return super().supports(model) and getattr(tower, "model_type", None) in _TOWERS

    def provides(self, model: nn.Module) -> frozenset[str]:
        # A CLS token exists only in CLIP, and is dropped from the features only by "default".
        config = model.config
        single_layer = isinstance(config.vision_feature_layer, int)
        if (
            config.vision_config.model_type == "clip_vision_model"
            and config.vision_feature_select_strategy == "default"
            and single_layer
        ):
            tower = ("cls_attention", "cls_token")  # lm_stage is the engine's (available())
            return frozenset(name for name in tower if self.extras.get(name))
        return frozenset()

    def image_token_id(self, model: nn.Module) -> int:
        return model.config.image_token_id

    def projector(self, model: nn.Module) -> nn.Module:
        return model.model.multi_modal_projector

    def _feature_layer(self, model: nn.Module, feature_layer: Any) -> nn.Module:
        """The tower layer whose output is the feature layer (its attention gives the CLS
        attention, its output the CLS state)."""
        if not isinstance(feature_layer, int):
            raise PruneError(
                f"the CLS token's attention and state need a single vision_feature_layer, "
                f"got {feature_layer!r}"
            )
        tower = model.model.vision_tower
        tower = getattr(tower, "vision_model", tower)  # older layouts nest the encoder
        layers = tower.encoder.layers
        # hidden_states[j] is the output of layers[j - 1]; negative j counts from the end.
        index = feature_layer if feature_layer < 0 else feature_layer - 1
        if feature_layer == 0 or not -len(layers) <= index < len(layers):
            raise PruneError(f"vision_feature_layer {feature_layer} has no attention layer")
        return layers[index]

    def encode(
        self, model: nn.Module, image_inputs: dict[str, Any], needs: frozenset[str]
    ) -> EncodedImages:
        layer, strategy = self._feature_choice(model, image_inputs)
        output, features, projected, cls_attention, keys, cls = self._encode_hooked(
            model,
            needs,
            layer,
            strategy,
            lambda: model.model.get_image_features(
                pixel_values=image_inputs["pixel_values"],
                vision_feature_layer=layer,
                vision_feature_select_strategy=strategy,
                image_sizes=image_inputs.get("image_sizes"),
                return_dict=True,
            ),
        )
        return EncodedImages(
            features=list(features),
            projected=list(projected),
            grids=[square_grid(f.shape[0]) for f in features],
            cls_attention=None if cls_attention is None else list(cls_attention),
            keys=None if keys is None else list(keys),
            encoder_output=output,
            cls_features=None if cls is None else list(cls),
        )

    def _feature_choice(self, model: nn.Module, image_inputs: dict[str, Any]) -> tuple[Any, str]:
        """The vision feature layer and select strategy of this call (config defaults)."""
        config = model.config
        layer = image_inputs.get("vision_feature_layer")
        layer = config.vision_feature_layer if layer is None else layer
        strategy = image_inputs.get("vision_feature_select_strategy")
        strategy = config.vision_feature_select_strategy if strategy is None else strategy
        return layer, strategy

    def _encode_hooked(
        self,
        model: nn.Module,
        needs: frozenset[str],
        layer: Any,
        strategy: str,
        run: Callable[[], Any],
    ) -> tuple[Any, Tensor, Tensor, Tensor | None, Tensor | None, Tensor | None]:
        """Run the vision side with ``run()``, capturing what the projector saw.

        Returns:
            the model's encoder output; projector inputs ``[P, T, d_v]`` and outputs
            ``[P, T, d_l]`` of all P crops (images, for LLaVA-1.5); when
            ``"cls_attention"`` is needed, ``[P, T]`` CLS attention and ``[P, T, d_k]``
            keys aligned with the feature tokens (else None, None); when ``"cls_token"``
            is needed, ``[P, d_v]`` the feature layer's CLS state (else None).
        """
        wanted = {"cls_attention", "cls_token"} & needs
        encoder_layer = self._feature_layer(model, layer) if wanted else None
        output, captured = run_capturing(
            run,
            self.projector(model),
            attention=encoder_layer.self_attn if "cls_attention" in needs else None,
            layer=encoder_layer if "cls_token" in needs else None,
        )
        cls_attention = keys = cls = None
        if "cls_attention" in needs:
            attn, k = _cls_attention_and_keys(encoder_layer.self_attn, captured["attention_input"])
            # Align with the feature tokens: without CLS under "default", with it otherwise.
            skip = 1 if strategy == "default" else 0
            cls_attention, keys = attn[:, skip:], k[:, skip:]
        if "cls_token" in needs:
            cls = captured["layer_output"][:, 0]
        return output, captured["features"], captured["projected"], cls_attention, keys, cls

    def encoder_output(self, encoded: EncodedImages, kept_tokens: list[Tensor]) -> Any:
        return BaseModelOutputWithPooling(pooler_output=kept_tokens)
