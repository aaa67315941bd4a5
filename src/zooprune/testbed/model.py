"""The test-bed VLM: a small, real ``LlavaForConditionalGeneration`` for the scenes.

Layout follows LLaVA-1.5 at toy size: a CLIP vision tower (144 px images, 9 px
patches -> 16x16 = 256 visual tokens, CLS dropped), the standard 2-layer GELU
projector, and a Llama language model over a word-level vocabulary.

Prompt format (one or more turns, the answer is always the next single token)::

    <s> <image> what shape is the red square how many circles two

The processor expands ``<image>`` into 256 image tokens. Prediction is the argmax
of the logits at the last token of the question, which is exactly
``generate(max_new_tokens=1)``.

Besides the config/processor builders, this module holds the forward pass used by
training and evaluation: it runs the vision tower once, splices the projected
features into the text embeddings and can drop visual tokens while keeping the
original RoPE position ids of the kept ones (how token pruning behaves in the
zoo's adapters).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from transformers import (
    AutoProcessor,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
)

from zooprune.testbed.scenes import DEFAULT_CONFIG, SceneConfig, vocabulary
from zooprune.tiny import SPECIAL, llava_layout_config, word_level_llava_processor

__all__ = [
    "BUNDLED",
    "IMAGE_MEAN",
    "IMAGE_STD",
    "SPECIAL_TOKENS",
    "bundled_path",
    "encode_prompt",
    "forward_answer_logits",
    "load_testbed",
    "num_image_tokens",
    "pixel_values_from_images",
    "prompt_text",
    "save_testbed",
    "testbed_config",
    "testbed_processor",
    "testbed_vocabulary",
    "vision_features",
]

SPECIAL_TOKENS: tuple[str, ...] = tuple(SPECIAL)  # the same ids as zooprune.tiny
PAD_ID, UNK_ID, BOS_ID, EOS_ID, IMAGE_ID = range(5)
# OpenAI CLIP statistics: kept so the processor is a stock CLIP one.
IMAGE_MEAN: tuple[float, float, float] = (0.48145466, 0.4578275, 0.40821073)
IMAGE_STD: tuple[float, float, float] = (0.26862954, 0.26130258, 0.27577711)


def testbed_vocabulary(scene_config: SceneConfig = DEFAULT_CONFIG) -> list[str]:
    """Special tokens (ids 0-4) followed by every scene question/answer word."""
    return list(SPECIAL_TOKENS) + vocabulary(scene_config)


def testbed_config(
    vocab_size: int | None = None,
    image_size: int = 144,
    patch_size: int = 9,
    vision_hidden: int = 192,
    vision_layers: int = 4,
    vision_heads: int = 6,
    vision_ffn: int = 768,
    text_hidden: int = 256,
    text_layers: int = 4,
    text_heads: int = 4,
    text_ffn: int = 688,
    max_positions: int = 1024,
    vision_feature_layer: int = -1,
) -> LlavaConfig:
    """LLaVA-1.5 layout at test-bed size (defaults: ~5.2 M parameters, 256 tokens).

    ``vision_feature_layer=-1`` because the dense auxiliary losses are put on
    the last layer, so that is where colour/shape/position are known to live.
    """
    if vocab_size is None:
        vocab_size = len(testbed_vocabulary())
    return llava_layout_config(
        image_size=image_size,
        patch_size=patch_size,
        vision=(vision_hidden, vision_layers, vision_heads, vision_ffn),
        text=(text_hidden, text_layers, text_heads, text_heads, text_ffn),
        vocab_size=vocab_size,
        image_token_id=IMAGE_ID,
        projection_dim=vision_hidden,
        vision_feature_layer=vision_feature_layer,
        max_positions=max_positions,
        tie_word_embeddings=False,
    )


def num_image_tokens(config: LlavaConfig) -> int:
    """Visual tokens per image: ``(image_size // patch_size) ** 2`` (CLS dropped)."""
    v = config.vision_config
    return (v.image_size // v.patch_size) ** 2


def testbed_processor(
    config: LlavaConfig, scene_config: SceneConfig = DEFAULT_CONFIG
) -> LlavaProcessor:
    """Word-level tokenizer + stock CLIP PIL image processor, as a ``LlavaProcessor``.

    Images of ``image_size`` pass through unresized (shortest edge and crop both
    equal the size, which PIL treats as identity); other sizes are resized/cropped.
    """
    v = config.vision_config
    words = testbed_vocabulary(scene_config)
    if len(words) > config.text_config.vocab_size:
        raise ValueError("vocabulary larger than the model's vocab_size")
    return word_level_llava_processor(
        words, v.image_size, v.patch_size, list(IMAGE_MEAN), list(IMAGE_STD)
    )


def prompt_text(turns: Sequence[tuple[str, str | None]]) -> str:
    """``"<s> <image> q1 a1 q2 a2 ... qn"``; a ``None`` answer ends the prompt there."""
    parts = ["<s>", "<image>"]
    for q, a in turns:
        parts.append(q)
        if a is None:
            break
        parts.append(a)
    return " ".join(parts)


def encode_prompt(
    turns: Sequence[tuple[str, str | None]], vocab: dict[str, int], n_image: int
) -> tuple[list[int], list[int]]:
    """Fast path of the processor's tokenisation for training.

    Returns ``(ids, targets)``, both of length ``L``: ``ids`` with ``n_image``
    image tokens expanded, ``targets[t]`` the answer id predicted at position
    ``t`` (the last word of a question) or -100. Same ids as the processor
    on ``prompt_text(turns)`` (checked in the tests).
    """
    ids = [BOS_ID] + [IMAGE_ID] * n_image
    targets = [-100] * len(ids)
    for q, a in turns:
        q_ids = [vocab[w] for w in q.split()]
        ids += q_ids
        targets += [-100] * len(q_ids)
        if a is None:
            break
        targets[-1] = vocab[a]
        ids.append(vocab[a])
        targets.append(-100)
    return ids, targets


def pixel_values_from_images(images: np.ndarray) -> torch.Tensor:
    """uint8 ``[B, H, W, 3]`` -> normalised float32 ``[B, 3, H, W]`` (processor's maths)."""
    x = torch.from_numpy(np.array(images, dtype=np.uint8)).permute(0, 3, 1, 2).float() / 255.0
    mean = torch.tensor(IMAGE_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGE_STD).view(1, 3, 1, 1)
    return (x - mean) / std


def vision_features(
    model: LlavaForConditionalGeneration, pixel_values: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Run the vision tower once.

    Returns ``(patch_hidden [B, N, Dv], projected [B, N, Dt])``: the selected
    layer's patch states (CLS dropped; what the auxiliary heads read) and their
    projection (what the LM sees, identical to ``get_image_features``).
    """
    cfg = model.config
    out = model.model.vision_tower(pixel_values, output_hidden_states=True, return_dict=True)
    hidden = out.hidden_states[cfg.vision_feature_layer][:, 1:]
    return hidden, model.model.multi_modal_projector(hidden)


def forward_answer_logits(
    model: LlavaForConditionalGeneration,
    input_ids: torch.Tensor,
    image_embeds: torch.Tensor,
    query_mask: torch.Tensor,
    keep: Sequence[torch.Tensor] | None = None,
) -> torch.Tensor:
    """Logits at the query positions, optionally with visual tokens dropped.

    ``input_ids`` ``[B, L]`` right-padded with ``PAD_ID``, each row with
    exactly ``N`` image tokens; ``image_embeds`` ``[B, N, Dt]``; ``query_mask``
    bool ``[B, L]`` marks positions whose next-token logits are wanted.
    ``keep``: per row, sorted indices into ``0..N-1`` of the visual tokens to
    keep; dropped tokens are removed from the sequence and every remaining
    token keeps its original position id. Returns ``[Q, V]`` for the ``Q``
    query positions in row-major order.
    """
    embeds = model.get_input_embeddings()(input_ids)
    is_img = input_ids == model.config.image_token_id
    embeds = embeds.masked_scatter(
        is_img.unsqueeze(-1), image_embeds.to(embeds.dtype).reshape(-1, embeds.shape[-1])
    )
    b, length = input_ids.shape
    positions = torch.arange(length).unsqueeze(0).expand(b, -1)
    real = input_ids != PAD_ID
    if keep is not None:
        rows_e, rows_p, rows_q = [], [], []
        for i in range(b):
            img_pos = is_img[i].nonzero().squeeze(1)
            keep_mask = ~is_img[i] & real[i]
            keep_mask[img_pos[keep[i]]] = True
            rows_e.append(embeds[i, keep_mask])
            rows_p.append(positions[i, keep_mask])
            rows_q.append(query_mask[i, keep_mask])
        new_len = max(r.shape[0] for r in rows_e)
        embeds = embeds.new_zeros(b, new_len, embeds.shape[-1])
        positions = torch.zeros(b, new_len, dtype=torch.long)
        query_mask = torch.zeros(b, new_len, dtype=torch.bool)
        real = torch.zeros(b, new_len, dtype=torch.bool)
        for i in range(b):
            n = rows_e[i].shape[0]
            embeds[i, :n], positions[i, :n], query_mask[i, :n] = rows_e[i], rows_p[i], rows_q[i]
            real[i, :n] = True
    # The explicit mask matters: without one, transformers reads position ids that
    # jump (the dropped tokens' gaps) as boundaries of packed sequences and stops
    # attention at each gap.
    hidden = model.model.language_model(
        inputs_embeds=embeds,
        attention_mask=real.long(),
        position_ids=positions,
        use_cache=False,
    ).last_hidden_state
    # Only the query positions go through the LM head: a few per row, not L.
    return model.lm_head(hidden[query_mask])


def save_testbed(
    model: LlavaForConditionalGeneration, processor: LlavaProcessor, path: str | Path
) -> Path:
    """``save_pretrained`` model and processor to ``path``; reload with ``from_pretrained``."""
    path = Path(path)
    tc = model.config.text_config
    model.generation_config.pad_token_id = tc.pad_token_id
    model.generation_config.bos_token_id = tc.bos_token_id
    model.generation_config.eos_token_id = tc.eos_token_id
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return path


# The trained checkpoint ships inside the package, so nothing is ever downloaded.
BUNDLED = Path(__file__).parent / "weights"


def bundled_path() -> Path:
    """The folder of the shipped test-bed checkpoint (a standard ``save_pretrained`` folder)."""
    if not (BUNDLED / "config.json").is_file():
        raise FileNotFoundError(
            f"the bundled test-bed checkpoint is missing from {BUNDLED}; "
            "reinstall zooprune or rebuild it with `zooprune testbed train`"
        )
    return BUNDLED


def load_testbed(
    path: str | Path | None = None, dtype: torch.dtype = torch.float32
) -> tuple[LlavaForConditionalGeneration, LlavaProcessor]:
    """Plain ``from_pretrained`` of both halves (default: the bundled checkpoint), in eval mode."""
    path = bundled_path() if path is None else path
    model = LlavaForConditionalGeneration.from_pretrained(path, dtype=dtype).eval()
    return model, AutoProcessor.from_pretrained(path)
