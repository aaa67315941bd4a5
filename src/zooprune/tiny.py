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


def llava_layout_config(
    *,
    image_size: int,
    patch_size: int,
    vision: tuple[int, int, int, int],
    text: tuple[int, int, int, int, int],
    vocab_size: int,
    image_token_id: int,
    projection_dim: int = 32,
    vision_feature_layer: int = -2,
    max_positions: int = 4096,
    tie_word_embeddings: bool = False,
) -> LlavaConfig:
    """The LLaVA-1.5 layout (CLIP tower, 2-layer GELU projector, Llama LM) at any size.

    Token ids follow :data:`SPECIAL`: pad 0, bos 2, eos 3.

    Args:
        vision: ``(hidden, layers, heads, ffn)`` of the CLIP tower.
        text: ``(hidden, layers, heads, kv_heads, ffn)`` of the Llama model.
    """
    v_hidden, v_layers, v_heads, v_ffn = vision
    t_hidden, t_layers, t_heads, t_kv_heads, t_ffn = text
    return LlavaConfig(
        vision_config=CLIPVisionConfig(
            image_size=image_size,
            patch_size=patch_size,
            hidden_size=v_hidden,
            intermediate_size=v_ffn,
            num_hidden_layers=v_layers,
            num_attention_heads=v_heads,
            projection_dim=projection_dim,
        ),
        text_config=LlamaConfig(
            vocab_size=vocab_size,
            hidden_size=t_hidden,
            intermediate_size=t_ffn,
            num_hidden_layers=t_layers,
            num_attention_heads=t_heads,
            num_key_value_heads=t_kv_heads,
            max_position_embeddings=max_positions,
            tie_word_embeddings=tie_word_embeddings,
            pad_token_id=SPECIAL.index("<pad>"),
            bos_token_id=SPECIAL.index("<s>"),
            eos_token_id=SPECIAL.index("</s>"),
        ),
        image_token_id=image_token_id,
        vision_feature_layer=vision_feature_layer,
        vision_feature_select_strategy="default",
        projector_hidden_act="gelu",
    )


def tiny_llava_config(
    image_size: int = 48, patch_size: int = 6, vocab_size: int = 64
) -> LlavaConfig:
    """LLaVA-1.5 layout at toy size: 8 x 8 = 64 visual tokens at the defaults."""
    return llava_layout_config(
        image_size=image_size,
        patch_size=patch_size,
        vision=(32, 3, 4, 64),
        text=(48, 2, 4, 2, 96),
        vocab_size=vocab_size,
        image_token_id=SPECIAL.index("<image>"),
    )


# "<s> <image> question" for a user turn, " answer" for an assistant turn: the prompt
# format the test-bed model is trained on, so chat-template callers need no special case.
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if loop.first %}<s>{% endif -%}"
    "{%- if message['content'] is string %} {{ message['content'] }}"
    "{%- else -%}{%- for part in message['content'] -%}"
    "{%- if part['type'] == 'image' %} <image>"
    "{%- elif part['type'] == 'text' %} {{ part['text'] }}{% endif -%}"
    "{%- endfor -%}{%- endif -%}"
    "{%- endfor -%}"
)


def word_tokenizer(
    words: list[str], special: list[str] = SPECIAL, **named: str
) -> PreTrainedTokenizerFast:
    """A left-padding word-level tokenizer over ``words`` (ids in list order).

    ``special`` split off even when glued to a word: processors expand an image marker in
    place into glued runs (``"<image><image>..."``). ``named`` are a family's named special
    tokens (e.g. ``image_token="<image>"``).
    """
    tokenizer = Tokenizer(
        models.WordLevel(vocab={w: i for i, w in enumerate(words)}, unk_token="<unk>")
    )
    tokenizer.add_special_tokens(special)
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    extra = {"extra_special_tokens": named} if named else {}
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        pad_token="<pad>",
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        padding_side="left",
        **extra,
    )


def word_level_llava_processor(
    words: list[str],
    image_size: int,
    patch_size: int,
    image_mean: list[float] | None = None,
    image_std: list[float] | None = None,
) -> LlavaProcessor:
    """A LlavaProcessor over a word-level tokenizer (``words``, :data:`SPECIAL` first) and a
    PIL image processor that passes ``image_size`` square images through unresized."""
    fast = word_tokenizer(words)
    normalisation = {} if image_mean is None else {"image_mean": image_mean, "image_std": image_std}
    images = CLIPImageProcessorPil(
        size={"shortest_edge": image_size},
        crop_size={"height": image_size, "width": image_size},
        **normalisation,
    )
    return LlavaProcessor(
        image_processor=images,
        tokenizer=fast,
        patch_size=patch_size,
        vision_feature_select_strategy="default",
        image_token="<image>",
        num_additional_image_tokens=1,
        chat_template=CHAT_TEMPLATE,
    )


def tiny_llava_processor(image_size: int = 48, patch_size: int = 6) -> LlavaProcessor:
    """The tiny model's processor: a few dozen words, 48 px images."""
    return word_level_llava_processor(SPECIAL + WORDS, image_size, patch_size)


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
