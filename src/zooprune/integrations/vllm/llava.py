"""The LLaVA family on vLLM: pruned variants of vLLM's LLaVA, LLaVA-NeXT and OneVision.

Each is vLLM's own class with two changes: an image gets K placeholders instead of N (plus
its row newlines, for AnyRes), the processing info's count being the budget's pure function
of the image's N as in the Hugging Face path; and its tokens are the K the selection
pipeline keeps of the N vLLM's tower and projector made. For AnyRes the layout (crops,
cells, newlines) comes from the Hugging Face adapter, fed with vLLM's own packing, so the
two engines keep the same tokens. Checkpoints saved by transformers 5 (tower keys without
``vision_model``) load too.

What vLLM cannot give is refused at engine start, naming what applies: ``visionzip``
(vLLM's tower fuses q/k/v, so the CLS attention is not reachable) and
``separators="nonempty"`` (vLLM must know each image's placeholder count before the image is
encoded; under ``"all"`` the newlines count is a function of the image's size).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from types import SimpleNamespace
from typing import Any

import torch
from torch import Tensor
from transformers import LlavaNextModel
from transformers.models.llava_next.modeling_llava_next import get_anyres_image_grid_shape
from vllm.config import VllmConfig
from vllm.model_executor.models.llava import (
    LlavaDummyInputsBuilder,
    LlavaForConditionalGeneration,
    LlavaMultiModalProcessor,
    LlavaProcessingInfo,
)
from vllm.model_executor.models.llava_next import (
    LlavaNextForConditionalGeneration,
    LlavaNextMultiModalProcessor,
    LlavaNextProcessingInfo,
)
from vllm.model_executor.models.llava_onevision import (
    LlavaOnevisionDummyInputsBuilder,
    LlavaOnevisionForConditionalGeneration,
    LlavaOnevisionMultiModalProcessor,
    LlavaOnevisionProcessingInfo,
)
from vllm.multimodal import MULTIMODAL_REGISTRY

from zooprune.adapters.base import square_grid
from zooprune.adapters.llava_next import (
    LlavaNextAdapter,
    LlavaOnevisionAdapter,
    packing_stand_in,
)
from zooprune.errors import PruneError
from zooprune.integrations.vllm.checkpoint import hub_key
from zooprune.integrations.vllm.selection import (
    ProjectorCopy,
    refuse_embeddings,
    select_runs,
    selector_for,
)
from zooprune.pipeline import CROP_BUDGETS, SEPARATOR_POLICIES, EncodedImages, Selector

#: what vLLM can serve of the AnyRes layout options (see the module's note)
ANYRES_LAYOUT = {"crop_budget": CROP_BUDGETS, "separators": SEPARATOR_POLICIES[:1]}


def _selector(config: Any, anyres: bool = False) -> Selector:
    return selector_for(config, ANYRES_LAYOUT if anyres else None)


class _Pruned:
    """What every pruned LLaVA-family class adds: the settings, the projector it scores
    (a full-weight copy, see :mod:`zooprune.integrations.vllm.selection`) and the key
    layout of transformers 5 checkpoints."""

    anyres = False

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "") -> None:
        config = vllm_config.model_config.hf_config
        if config.vision_config.model_type not in ("clip_vision_model", "siglip_vision_model"):
            raise PruneError(
                f"zooprune's vLLM variant needs a CLIP or SigLIP tower, not "
                f"{config.vision_config.model_type}"
            )
        self.selector = _selector(config, self.anyres)  # bad settings fail at engine start
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        self._projector_copy = ProjectorCopy(
            ("model.multi_modal_projector.", "multi_modal_projector.")
        )
        # Outside the module tree: vLLM would expect its weights from the checkpoint.
        object.__setattr__(self, "scoring_projector", None)
        object.__setattr__(self, "zooprune_kept", [])

    def load_weights(self, weights: Iterable[tuple[str, Tensor]]) -> set[str]:
        loaded = super().load_weights(self._projector_copy.watch(_tower_keys(weights)))
        dtype = next(self.multi_modal_projector.parameters()).dtype
        projector = self._projector_copy.gelu_mlp(self.config.projector_hidden_act, dtype)
        object.__setattr__(self, "scoring_projector", projector)
        return loaded


def _tower_keys(weights: Iterable[tuple[str, Tensor]]) -> Iterator[tuple[str, Tensor]]:
    """transformers 5 saves the CLIP / SigLIP tower without its ``vision_model`` level;
    vLLM's tower has it (see :mod:`~zooprune.integrations.vllm.checkpoint`)."""
    for name, tensor in weights:
        yield hub_key(name), tensor


# -- LLaVA-1.5 ---------------------------------------------------------------------------


class ZoopruneLlavaProcessingInfo(LlavaProcessingInfo):
    """K placeholders per image: the budget of the image's N visual tokens."""

    def get_num_image_tokens(self, *, image_width: int, image_height: int) -> int:
        n = super().get_num_image_tokens(image_width=image_width, image_height=image_height)
        return _selector(self.get_hf_config()).budget.tokens_for(n)


@MULTIMODAL_REGISTRY.register_processor(
    LlavaMultiModalProcessor,
    info=ZoopruneLlavaProcessingInfo,
    dummy_inputs=LlavaDummyInputsBuilder,
)
class ZoopruneLlava(_Pruned, LlavaForConditionalGeneration):
    """vLLM's LLaVA, its visual tokens pruned by the zooprune settings in its HF config."""

    def _process_image_input(self, image_input: Any) -> tuple[Tensor, ...]:
        refuse_embeddings(image_input)
        features = list(self._process_image_pixels(image_input))  # [N, d_v] per image
        sizes = [f.shape[0] for f in features]
        projected = list(self.multi_modal_projector(torch.cat(features)).split(sizes))
        grids = [square_grid(n) for n in sizes]
        encoded = EncodedImages(features, projected, grids, None, None, None)
        return tuple(select_runs(self, encoded))


# -- AnyRes: LLaVA-NeXT and OneVision -------------------------------------------------------


class _AnyResCount:
    """K + the image's row newlines: the newline count is a function of its size."""

    def get_num_image_tokens(self, *, image_width: int, image_height: int) -> int:
        total = super().get_num_image_tokens(image_width=image_width, image_height=image_height)
        config = self.get_hf_config()
        encoder = self.get_vision_encoder_info()
        rows, cols = get_anyres_image_grid_shape(
            image_size=(image_height, image_width),
            grid_pinpoints=config.image_grid_pinpoints,
            patch_size=encoder.get_image_size(),
        )
        _, newlines = self._get_num_unpadded_features(
            original_height=image_height,
            original_width=image_width,
            npatches=encoder.get_patch_grid_length(),
            num_patch_height=rows,
            num_patch_width=cols,
        )
        kept = _selector(config, anyres=True).budget.tokens_for(total - newlines)
        return kept + newlines


class ZoopruneLlavaNextProcessingInfo(_AnyResCount, LlavaNextProcessingInfo):
    pass


class ZoopruneLlavaOnevisionProcessingInfo(_AnyResCount, LlavaOnevisionProcessingInfo):
    pass


class _PrunedAnyRes(_Pruned):
    """Encodes every crop, packs with vLLM's own code, lays the image out with the HF
    adapter's rules, and keeps each image's run of tokens and newlines."""

    anyres = True
    adapter: LlavaNextAdapter

    def _pack_coordinates(self, config: Any) -> Any:
        """The stand-in model the HF adapter packs the crop coordinates with."""
        raise NotImplementedError

    def _process_image_input(self, image_input: Any) -> list[Tensor]:
        refuse_embeddings(image_input)
        pixel_values = image_input["pixel_values"]
        image_sizes = image_input["image_sizes"]
        per_image = list(pixel_values)  # [crops (maybe padded), 3, H, W] each
        stand_in = self._pack_coordinates(self.config)
        crops = self.adapter._crops_per_image(stand_in, {"image_sizes": image_sizes})
        pixels = torch.cat([p[:n] for p, n in zip(per_image, crops, strict=True)])
        features = self._image_pixels_to_features(self.vision_tower, pixels)
        projected = self.multi_modal_projector(features)
        packed = [
            self._pack_tokens(size, tokens)
            for size, tokens in zip(image_sizes, projected.split(crops), strict=True)
        ]
        encoded = self.adapter.encoded_from(
            stand_in,
            features,
            packed,
            {"image_sizes": image_sizes},
            self.config.vision_feature_select_strategy,
        )
        return select_runs(self, encoded)

    def _pack_tokens(self, size: Tensor, tokens: Tensor) -> Tensor:
        raise NotImplementedError


@MULTIMODAL_REGISTRY.register_processor(
    LlavaNextMultiModalProcessor,
    info=ZoopruneLlavaNextProcessingInfo,
    dummy_inputs=LlavaDummyInputsBuilder,
)
class ZoopruneLlavaNext(_PrunedAnyRes, LlavaNextForConditionalGeneration):
    """vLLM's LLaVA-NeXT, pruned (``crop_budget`` split or global; every newline kept)."""

    adapter = LlavaNextAdapter()

    def _pack_coordinates(self, config: Any) -> Any:
        return packing_stand_in(LlavaNextModel, config)

    def _pack_tokens(self, size: Tensor, tokens: Tensor) -> Tensor:
        return self._merge_image_patch_embeddings(size, tokens, strategy="spatial_unpad")


@MULTIMODAL_REGISTRY.register_processor(
    LlavaOnevisionMultiModalProcessor,
    info=ZoopruneLlavaOnevisionProcessingInfo,
    dummy_inputs=LlavaOnevisionDummyInputsBuilder,
)
class ZoopruneLlavaOnevision(_PrunedAnyRes, LlavaOnevisionForConditionalGeneration):
    """vLLM's LLaVA-OneVision, pruned; its images (not its videos, which pass unpruned)."""

    adapter = LlavaOnevisionAdapter()

    def _pack_coordinates(self, config: Any) -> Any:
        # vLLM packs every image AnyRes with its own code (its own anyres_max): so are
        # the coordinates, through the same function with a newline of their width.
        inner = SimpleNamespace(config=config, pack_image_features=self._pack_all)
        return SimpleNamespace(config=config, model=inner)

    def _pack_all(
        self, per_image: list[Tensor], image_sizes: Tensor, image_newline: Tensor, **_: Any
    ) -> tuple[list[Tensor], None]:
        packed = [
            self._merge_image_patch_embeddings(
                size, crops, image_newline=image_newline, strategy="spatial_unpad"
            )
            for size, crops in zip(image_sizes, per_image, strict=True)
        ]
        return packed, None

    def _pack_tokens(self, size: Tensor, tokens: Tensor) -> Tensor:
        return self._merge_image_patch_embeddings(
            size, tokens, image_newline=self.image_newline, strategy="spatial_unpad"
        )
