"""A tiny random LLaVA (model + processor) saved as a standard Hugging Face folder.

For tests and for trying the CLI without downloading weights: it answers nonsense, but
it runs the real loading, processing, pruning and generation path end to end.
"""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
    PreTrainedTokenizerFast,
)
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

SPECIAL = ["<pad>", "<unk>", "<s>", "</s>", "<image>"]
WORDS = (
    "user assistant what is in the image ? describe this picture colour shape of a an "
    "red green blue yellow circle square triangle cross left right top bottom yes no"
).split()


def tiny_llava_config(
    image_size: int = 48, patch_size: int = 6, vocab_size: int = 64
) -> LlavaConfig:
    """LLaVA-1.5 layout at toy size: CLIP tower, 2-layer GELU projector, Llama LM."""
    vision = CLIPVisionConfig(
        image_size=image_size,
        patch_size=patch_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=3,
        num_attention_heads=4,
        projection_dim=32,
    )
    text = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=48,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        pad_token_id=0,
        bos_token_id=2,
        eos_token_id=3,
    )
    return LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_id=SPECIAL.index("<image>"),
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        projector_hidden_act="gelu",
    )


def tiny_llava_processor(image_size: int = 48, patch_size: int = 6) -> LlavaProcessor:
    """A word-level tokenizer and a PIL image processor wrapped as a LlavaProcessor."""
    vocab = {word: i for i, word in enumerate(SPECIAL + WORDS)}
    tokenizer = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    # <image> must split off even when glued to a word, as the processor expands it in place.
    tokenizer.add_special_tokens(SPECIAL)
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        pad_token="<pad>",
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        padding_side="left",
    )
    images = CLIPImageProcessorPil(
        size={"shortest_edge": image_size},
        crop_size={"height": image_size, "width": image_size},
    )
    return LlavaProcessor(
        image_processor=images,
        tokenizer=fast,
        patch_size=patch_size,
        vision_feature_select_strategy="default",
        image_token="<image>",
        num_additional_image_tokens=1,
    )


def save_tiny_llava(path: str | Path, seed: int = 0) -> Path:
    """Build a tiny random LLaVA with its processor and ``save_pretrained`` both to ``path``."""
    path = Path(path)
    torch.manual_seed(seed)
    processor = tiny_llava_processor()
    config = tiny_llava_config(vocab_size=len(processor.tokenizer))
    model = LlavaForConditionalGeneration(config).eval()
    model.generation_config.pad_token_id = config.text_config.pad_token_id
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return path
