"""Analytic FLOP counts (a multiply-add is 2 FLOPs) for LLaVA-style models.

Formulas count the matrix products; norms, activations and softmax are left out.
Attention over a causal prompt of L tokens counts L^2 * d multiply-adds per layer
(QK^T and AV, each half of the full square).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Shapes:
    """The sizes the counts depend on."""

    vision_dim: int
    vision_layers: int
    vision_ffn: int
    vision_tokens: int  # patches + CLS, as the tower runs them
    patch_inputs: int  # values per patch: channels * patch * patch
    projector_hidden: int
    text_dim: int
    text_layers: int
    text_ffn: int
    kv_dim: int  # key/value width (heads_kv * head_dim)
    vocab: int

    @classmethod
    def of_llava(cls, config) -> Shapes:  # noqa: ANN001 (a transformers LlavaConfig)
        vision, text = config.vision_config, config.text_config
        patches = (vision.image_size // vision.patch_size) ** 2
        head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
        return cls(
            vision_dim=vision.hidden_size,
            vision_layers=vision.num_hidden_layers,
            vision_ffn=vision.intermediate_size,
            vision_tokens=patches + 1,
            patch_inputs=vision.num_channels * vision.patch_size**2,
            projector_hidden=text.hidden_size,
            text_dim=text.hidden_size,
            text_layers=text.num_hidden_layers,
            text_ffn=text.intermediate_size,
            kv_dim=text.num_key_value_heads * head_dim,
            vocab=text.vocab_size,
        )

    @classmethod
    def of_text(cls, config) -> Shapes:  # noqa: ANN001 (any VLM config with a text model)
        """The language model's shapes (vision fields 0): what LM prefill counts need."""
        text = getattr(config, "text_config", None) or config
        heads = text.num_attention_heads
        head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
        kv_heads = getattr(text, "num_key_value_heads", None) or heads
        return language_model(
            text.hidden_size,
            text.num_hidden_layers,
            text.intermediate_size,
            kv_heads * head_dim,
            text.vocab_size,
        )


#: LLaVA-1.5-7B: CLIP ViT-L/14-336 and Vicuna-7B (Llama-2 shapes).
LLAVA15_7B = Shapes(
    vision_dim=1024,
    vision_layers=24,
    vision_ffn=4096,
    vision_tokens=577,
    patch_inputs=3 * 14 * 14,
    projector_hidden=4096,
    text_dim=4096,
    text_layers=32,
    text_ffn=11008,
    kv_dim=4096,
    vocab=32000,
)


def vision_matmuls(s: Shapes) -> float:
    """Patch embedding, attention projections and MLPs of every tower layer."""
    t, d = s.vision_tokens, s.vision_dim
    embedding = 2.0 * (t - 1) * s.patch_inputs * d
    return embedding + 2.0 * s.vision_layers * (4 * t * d * d + 2 * t * d * s.vision_ffn)


def vision(s: Shapes) -> float:
    """The whole tower (it runs every layer, whichever one the features come from)."""
    t, d = s.vision_tokens, s.vision_dim
    return vision_matmuls(s) + 2.0 * s.vision_layers * 2 * t * t * d  # bidirectional QK^T, AV


def projector(s: Shapes, tokens: int) -> float:
    return 2.0 * tokens * (s.vision_dim * s.projector_hidden + s.projector_hidden * s.text_dim)


def scoring(
    s: Shapes,
    tokens: int,
    estimator: str,
    directions: int = 64,
    rank: int = 128,
    chunk: int = 8,
) -> float:
    """Per image; the exact estimator's one-off H x H kernel (built once per model) is not
    counted here: ``zooprune speed-kernels`` times it separately."""
    if estimator == "exact":
        return 2.0 * tokens * (s.vision_dim * s.projector_hidden + s.projector_hidden**2)
    if estimator == "zo":  # M(x + h u) and M(x - h u) for every direction
        return 2 * directions * projector(s, tokens)
    if estimator == "jvp":  # one tangent pass per direction, two primal passes per chunk
        return (directions + 2 * -(-directions // chunk)) * projector(s, tokens)
    if estimator == "lowrank":
        per_token = rank * (s.vision_dim + 2 * s.projector_hidden + s.text_dim)
        return 2 * directions * 2.0 * tokens * per_token
    return 0.0


def greedy(s: Shapes, tokens: int, keep: int) -> float:
    return 2.0 * tokens * tokens * s.text_dim + 4.0 * keep * tokens


def lm_matmuls(s: Shapes, tokens: int) -> float:
    """Attention projections and MLPs of every LM layer, plus one row of logits."""
    d = s.text_dim
    per_token = d * (2 * d + 2 * s.kv_dim) + 3 * d * s.text_ffn
    return 2.0 * s.text_layers * tokens * per_token + 2.0 * d * s.vocab


def prefill(s: Shapes, length: int) -> float:
    """The LM over a prompt of ``length`` tokens, logits for the last one only."""
    return lm_matmuls(s, length) + 2.0 * s.text_layers * length * length * s.text_dim


def lm_prefill(s: Shapes, text: int, visual: Sequence[int]) -> float:
    """The LM over a prompt of ``text`` tokens and ``visual[i]`` visual tokens at layer
    ``i`` (one entry per layer: a method inside the LM drops tokens between layers), each
    layer's attention causal over the tokens it holds; logits for the last token only."""
    if len(visual) != s.text_layers:
        raise ValueError(f"{len(visual)} layer lengths for a {s.text_layers}-layer LM")
    d = s.text_dim
    per_token = d * (2 * d + 2 * s.kv_dim) + 3 * d * s.text_ffn
    total = 2.0 * d * s.vocab
    for tokens in visual:
        length = text + tokens
        total += 2.0 * length * per_token + 2.0 * length * length * d
    return total


def vision_share(s: Shapes, text_tokens: int) -> float:
    """The tower's and projector's part of an unpruned single-image prefill (the share
    pruning cannot shorten): ~4% for LLaVA-1.5-7B."""
    patches = s.vision_tokens - 1
    encode = vision(s) + projector(s, patches)
    return encode / (encode + prefill(s, patches + text_tokens))


def decode_token(s: Shapes, context: int) -> float:
    """One cached decoding step attending over ``context`` tokens."""
    return lm_matmuls(s, 1) + 4.0 * s.text_layers * context * s.text_dim


@dataclass(frozen=True)
class QwenVideoShapes:
    """What a Qwen3-VL video's prefill FLOPs depend on: the tower (which attends within
    each temporal patch, ``temporal`` frames of ``patch`` px squares), its mergers (the
    main one and one per DeepStack level, each ``u*C -> u*C -> out`` with ``u = merge^2``)
    and the language model (``text``, its vision fields unused)."""

    vision_dim: int
    vision_layers: int
    vision_ffn: int
    patch: int
    temporal: int
    merge: int
    mergers: int
    text: Shapes

    @classmethod
    def of_qwen3_vl(cls, config) -> QwenVideoShapes:  # noqa: ANN001 (a Qwen3VLConfig)
        vision, text = config.vision_config, config.text_config
        head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
        return cls(
            vision_dim=vision.hidden_size,
            vision_layers=vision.depth,
            vision_ffn=vision.intermediate_size,
            patch=vision.patch_size,
            temporal=vision.temporal_patch_size,
            merge=vision.spatial_merge_size,
            mergers=1 + len(getattr(vision, "deepstack_visual_indexes", []) or []),
            text=language_model(
                text.hidden_size,
                text.num_hidden_layers,
                text.intermediate_size,
                text.num_key_value_heads * head_dim,
                text.vocab_size,
            ),
        )


def language_model(dim: int, layers: int, ffn: int, kv_dim: int, vocab: int) -> Shapes:
    """A language model's :class:`Shapes` (its vision fields 0)."""
    return Shapes(0, 0, 0, 0, 0, 0, dim, layers, ffn, kv_dim, vocab)


#: Qwen3-VL-8B-Instruct: a 27-layer 1152-wide tower (16 px patches, 2 frames each, 3
#: DeepStack levels) and a 36-layer 4096-wide language model (8 key/value heads of 128)
QWEN3_VL_8B = QwenVideoShapes(
    vision_dim=1152,
    vision_layers=27,
    vision_ffn=4304,
    patch=16,
    temporal=2,
    merge=2,
    mergers=4,
    text=language_model(4096, 36, 12288, 1024, 151936),
)


def temporal_patches(s: QwenVideoShapes, frames: int) -> int:
    """A video's temporal patches: its processor pads an odd frame count to whole ones."""
    return -(-frames // s.temporal)


def video_tokens(s: QwenVideoShapes, frames: int, side: int) -> int:
    """The merged tokens of a video of ``frames`` square frames of ``side`` px."""
    return temporal_patches(s, frames) * (side // s.patch // s.merge) ** 2


def video_tower(s: QwenVideoShapes, frames: int, side: int) -> float:
    """The tower on a video of ``frames`` square frames of ``side`` px: the patch
    embedding, every layer's projections and MLP, and its attention (within each temporal
    patch: :func:`video_attention`)."""
    patches, d = temporal_patches(s, frames) * (side // s.patch) ** 2, s.vision_dim
    embedding = 2.0 * patches * 3 * s.temporal * s.patch**2 * d
    layers = 2.0 * s.vision_layers * (4 * patches * d * d + 2 * patches * d * s.vision_ffn)
    return embedding + layers + video_attention(s, frames, side)


def video_attention(s: QwenVideoShapes, frames: int, side: int) -> float:
    """The tower's QK^T and AV products: each temporal patch attends within itself."""
    groups, per_group = temporal_patches(s, frames), (side // s.patch) ** 2
    return 2.0 * s.vision_layers * 2 * groups * per_group**2 * s.vision_dim


def video_mergers(s: QwenVideoShapes, frames: int, side: int) -> float:
    """The main merger and the DeepStack ones, each ``u*C -> u*C -> out`` per token."""
    wide = s.merge**2 * s.vision_dim
    return s.mergers * 2.0 * video_tokens(s, frames, side) * (wide * wide + wide * s.text.text_dim)


def video_vision_share(s: QwenVideoShapes, frames: int, side: int, text_tokens: int) -> float:
    """The tower's and mergers' part of an unpruned one-video prefill (the share pruning
    cannot shorten)."""
    encode = video_tower(s, frames, side) + video_mergers(s, frames, side)
    return encode / (encode + prefill(s.text, video_tokens(s, frames, side) + text_tokens))
