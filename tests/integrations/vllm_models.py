"""Tiny models for the vLLM tests, saved with ``save_pretrained`` together with their
processors (vLLM loads both from the folder). vLLM's CPU attention needs head_dim >= 32,
so the language models are 64 wide with 2 heads."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import LlavaForConditionalGeneration

from tests.adapters import test_llava_next as anyres
from zooprune.tiny import SPECIAL, llava_layout_config, tiny_llava_processor

IMAGE = SPECIAL.index("<image>")


def save_llava(path: Path) -> Path:
    torch.manual_seed(0)
    processor = tiny_llava_processor()
    config = llava_layout_config(
        image_size=48,
        patch_size=6,
        vision=(32, 2, 4, 64),
        text=(64, 2, 2, 2, 128),
        vocab_size=len(processor.tokenizer),
        image_token_id=IMAGE,
    )
    model = LlavaForConditionalGeneration(config).eval()
    model.generation_config.pad_token_id = 0
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return path


def save_anyres(family: str, path: Path) -> Path:
    anyres.build(family, path, text_width=64, text_heads=2)
    if family == "onevision":  # the stock processor, videos and all (vLLM loads it)
        from transformers import LlavaOnevisionProcessor
        from transformers.models.llava_onevision.video_processing_llava_onevision import (
            LlavaOnevisionVideoProcessor,
        )

        crop = {"height": anyres.CROP, "width": anyres.CROP}
        processor = LlavaOnevisionProcessor(
            image_processor=anyres.processor_for(family).image_processor,
            tokenizer=anyres.tokenizer(),
            video_processor=LlavaOnevisionVideoProcessor(size=crop),
            num_image_tokens=anyres.SIDE * anyres.SIDE,
            vision_feature_select_strategy="full",
            image_token="<image>",
            video_token="<video>",
        )
    else:
        processor = anyres.processor_for(family)
    processor.save_pretrained(path)
    return path


def save_qwen(family: str, path: Path) -> Path:
    """Qwen2-VL / Qwen2.5-VL, with the stock processor (its video processor runs in the vLLM
    environment, where torchvision imports)."""
    from transformers import Qwen2VLProcessor
    from transformers.models.qwen2_vl.video_processing_qwen2_vl import Qwen2VLVideoProcessor

    from tests.adapters import test_qwen2_vl as qwen

    qwen.build(family, path, text_width=64, text_heads=2)
    image_processor = qwen.processor().image_processor
    processor = Qwen2VLProcessor(
        image_processor=image_processor,
        tokenizer=qwen.processor().tokenizer,
        video_processor=Qwen2VLVideoProcessor(
            patch_size=qwen.PATCH, merge_size=qwen.MERGE, temporal_patch_size=2
        ),
    )
    processor.save_pretrained(path)
    return path
