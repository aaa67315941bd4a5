"""End-to-end efficiency of a pruned model: where the time goes, per token budget.

By default on a model with random weights, laid out like LLaVA-1.5 (a CLIP tower at 336 px,
576 visual tokens, the 2-layer projector, a Llama) and proportioned like LLaVA-1.5-7B, sized
for a CPU: its vision tower is ~4% of the unpruned prefill's FLOPs, as in the 7B model, so
pruning can save what it saves there. (A tower as big as the language model would cap every
end-to-end ratio: pruning does not shorten the tower's work.) The speed of a model does not
depend on what its weights say.
"""

from __future__ import annotations

import contextlib
import resource
import statistics
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field, replace
from functools import partial
from typing import Any

import torch
from transformers import LlavaConfig, LlavaForConditionalGeneration, LogitsProcessorList

import zooprune
from zooprune.adapters import adapter_for
from zooprune.bench import flops
from zooprune.bench.timing import StepClock, fast_dtype, machine, median_seconds, timed
from zooprune.select import TokenSet, get_method
from zooprune.select.methods import sensitivity_scores
from zooprune.tiny import SPECIAL, WORDS, llava_layout_config

DEFAULT_DESCRIPTION = (
    "LLaVA-1.5-proportioned, random weights (ViT 256 x 6 at 336 px + Llama 1024 x 12)"
)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class SpeedConfig:
    model: str | None = None
    budgets: tuple[int, ...] = (192, 128, 64)
    method: str = "zoo"
    dtype: str = "auto"  # bfloat16 where the hardware has it, else float32
    new_tokens: int = 20
    text_tokens: int = 40
    repeats: int = 3
    warmup: int = 1
    device: str = "cpu"
    seed: int = 0
    #: the method's options (the CLI passes them for in-LM methods only)
    options: dict[str, Any] = field(default_factory=dict)


#: the default model's words (a word-level tokenizer: any id is one word)
VOCAB = SPECIAL + WORDS


def llava15_proportioned_config(vocab_size: int = 32064) -> LlavaConfig:
    """LLaVA-1.5's layout (336 px, 14 px patches: 576 visual tokens) at CPU size, with the
    7B model's vision share of the prefill: a 256-wide, 6-layer tower and a 1024-wide,
    12-layer Llama (head_dim 64)."""
    return llava_layout_config(
        image_size=336,
        patch_size=14,
        vision=(256, 6, 4, 1024),
        text=(1024, 12, 16, 16, 2816),
        vocab_size=vocab_size,
        image_token_id=VOCAB.index("<image>"),
        projection_dim=256,
    )


def default_model(dtype: torch.dtype, seed: int = 0) -> LlavaForConditionalGeneration:
    """The default benchmark model, initialised in ``dtype`` (half the memory and time)."""
    torch.manual_seed(seed)
    with _default_dtype(dtype):
        return LlavaForConditionalGeneration(llava15_proportioned_config()).eval()


def default_prompt_words(count: int, seed: int) -> list[str]:
    """``count`` words of the default model's vocabulary, drawn with ``seed``."""
    g = torch.Generator().manual_seed(seed)
    return [WORDS[int(i)] for i in torch.randint(0, len(WORDS), (count,), generator=g)]


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype) -> Iterator[None]:
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def load(config: SpeedConfig) -> tuple[LlavaForConditionalGeneration, dict[str, torch.Tensor], str]:
    """The model and one image-and-prompt input for it, and a one-line description."""
    dtype = DTYPES[config.dtype]
    torch.manual_seed(config.seed)
    if config.model is None:
        model = default_model(dtype, config.seed).to(config.device)
        text = model.config.text_config
        vision = model.config.vision_config
        n = (vision.image_size // vision.patch_size) ** 2
        g = torch.Generator().manual_seed(config.seed)
        words = torch.randint(len(SPECIAL), text.vocab_size, (config.text_tokens,), generator=g)
        half = config.text_tokens // 2
        ids = torch.cat(
            [
                torch.tensor([1]),
                words[:half],
                torch.full((n,), model.config.image_token_id),
                words[half:],
            ]
        )[None]
        pixels = torch.randn(1, 3, vision.image_size, vision.image_size, generator=g)
        inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "pixel_values": pixels}
        description = DEFAULT_DESCRIPTION
    else:
        from transformers import AutoModelForImageTextToText, AutoProcessor

        from zooprune.testbed.scenes import make_scene

        processor = AutoProcessor.from_pretrained(config.model)
        model = AutoModelForImageTextToText.from_pretrained(config.model, dtype=dtype)
        model = model.to(config.device).eval()
        token = getattr(processor, "image_token", "<image>")
        inputs = dict(
            processor(
                images=[make_scene(config.seed).to_pil()],
                text=[f"{token} describe the image"],
                return_tensors="pt",
            )
        )
        description = config.model
    inputs = {k: v.to(config.device) for k, v in inputs.items()}
    inputs["pixel_values"] = inputs["pixel_values"].to(dtype)
    params = sum(p.numel() for p in model.parameters())
    lm = sum(p.numel() for p in model.model.language_model.parameters())
    return model, inputs, f"{description}; {params / 1e6:.0f}M parameters, LM {lm / 1e6:.0f}M"


def _cache_bytes(cache: Any) -> int:
    return sum(
        t.numel() * t.element_size()
        for layer in getattr(cache, "layers", [])
        for t in (getattr(layer, "keys", None), getattr(layer, "values", None))
        if isinstance(t, torch.Tensor)
    )


def _peak_memory(device: str) -> int | None:
    if torch.device(device).type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return None


def _reset_peak(device: str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def _phase(peaks: dict[str, int | None], device: str, name: str, run: Callable[[], Any]) -> Any:
    """``run()``, recording the peak device memory it reached under ``name`` (CUDA only)."""
    _reset_peak(device)
    result = run()
    peaks[name] = _peak_memory(device)
    return result


def _median_less_encoder(
    handle: zooprune.PruneHandle, config: SpeedConfig, fn: Callable[[], Any]
) -> float:
    """Median wall time of ``fn`` (a call through ``handle``) less the vision encoder's time
    in that same call, as the handle recorded it: never below zero, whatever the noise."""
    for _ in range(config.warmup):
        fn()
    times = []
    for _ in range(max(1, config.repeats)):
        elapsed = timed(fn, config.device)[0]
        times.append(elapsed - handle.selection.encode_seconds)
    return statistics.median(times)


def self_timed_generate(
    model: Any,
    prepared: dict[str, Any],
    options: dict[str, Any],
    config: SpeedConfig,
    measure: Callable[[Callable[[], Any]], float],
) -> tuple[float, float]:
    """Median LM generation time, and median decode step timed inside the same calls."""
    steps: list[float] = []

    def run() -> None:
        clock = StepClock()
        model.generate(**prepared, **options, logits_processor=LogitsProcessorList([clock]))
        if clock.per_step() is not None:
            steps.append(clock.per_step())

    seconds = measure(run)
    timed_steps = steps[config.warmup :] or steps
    return seconds, statistics.median(timed_steps) if timed_steps else float("nan")


def run_speed_benchmark(
    config: SpeedConfig, progress: Callable[[str], None] = lambda _: None
) -> dict[str, Any]:
    """Measure unpruned and every budget; returns a JSON-ready dict."""
    if config.dtype == "auto":
        config = replace(config, dtype=fast_dtype(config.device))
    progress("loading the model")
    model, inputs, description = load(config)
    adapter = adapter_for(model)
    shapes = flops.Shapes.of_llava(model.config)
    method = get_method(config.method)

    def measure(fn: Callable[[], Any]) -> float:
        return median_seconds(
            fn, repeats=config.repeats, warmup=config.warmup, device=config.device
        )

    generate_options = dict(
        max_new_tokens=config.new_tokens, min_new_tokens=config.new_tokens, do_sample=False
    )
    image_inputs = {"pixel_values": inputs["pixel_values"]}
    rows = []
    with torch.no_grad():
        progress("warm-up")
        # One whole call first: the first calls of a fresh process run slower (kernel
        # selection, allocation), and every phase below is timed against the others.
        model.generate(**inputs, **generate_options)
        progress("vision encoder")
        encode = partial(adapter.encode, model, image_inputs, method.needs)
        encode_s = measure(encode)
        encoded = adapter.encode(model, image_inputs, method.needs)
        n = encoded.features[0].shape[0]
        text_length = inputs["input_ids"].shape[1] - n
        for keep in (None, *config.budgets):
            label = "unpruned" if keep is None else f"keep {keep}"
            progress(label)
            handle = (
                None
                if keep is None
                else zooprune.prune(model, config.method, keep=keep, **config.options)
            )
            try:
                row: dict[str, Any] = {
                    "keep": keep if keep is not None else n,
                    "pruned": keep is not None,
                }
                scoring_s = select_s = greedy_s = 0.0
                estimator = None
                if handle is not None and method.in_lm:
                    # The whole prompt goes in (the image encoded by the handle): the stage
                    # ranks and drops inside the language model.
                    prepared = dict(inputs)
                elif handle is None:
                    prepared = {
                        "input_ids": inputs["input_ids"],
                        "attention_mask": inputs["attention_mask"],
                        "mm_encoder_outputs": {"image": encoded.encoder_output},
                    }
                else:
                    tokens = TokenSet(
                        features=encoded.features[0][None],
                        projected=encoded.projected[0][None],
                        projector=adapter.projector(model),
                        grid=encoded.grids[0],
                        cls_attention=None
                        if encoded.cls_attention is None
                        else encoded.cls_attention[0][None],
                        keys=None if encoded.keys is None else encoded.keys[0][None],
                    )
                    select_s = measure(partial(method, tokens, keep))
                    choose = getattr(method.fn, "choose", None)
                    if choose is not None:  # a sensitivity-scored method: time both stages
                        scoring_s = measure(partial(sensitivity_scores, tokens))
                        scores, estimator = sensitivity_scores(tokens)
                        greedy_s = measure(partial(choose, tokens, keep, scores))
                    prepared = handle.prepare(dict(inputs))
                length = prepared["input_ids"].shape[1]
                peaks: dict[str, int | None] = {}
                phase = partial(_phase, peaks, config.device)
                # An in-LM method's calls run the encoder inside: each call's own encoder
                # time (the handle records it) comes off that call; the ranking stays (part
                # of the in-LM prefill; scoring shows it alone).
                timing = (
                    partial(_median_less_encoder, handle, config)
                    if handle is not None and method.in_lm
                    else measure
                )
                prefill = partial(model, **prepared, logits_to_keep=1, use_cache=True)
                prefill_s = phase("prefill", partial(timing, prefill))
                cache = prefill().past_key_values
                generate_s, decode_s = phase(
                    "generate",
                    partial(self_timed_generate, model, prepared, generate_options, config, timing),
                )
                lm_tokens = [length - text_length] * shapes.text_layers
                row_encode_s = encode_s
                if handle is not None and method.in_lm:
                    row_encode_s = measure(encode)
                    scoring_s = handle.selection.select_seconds
                    lm_tokens = method.layer_tokens(config.options, n, keep, shapes.text_layers)
                end_to_end_s = phase(
                    "end_to_end",
                    partial(measure, partial(model.generate, **inputs, **generate_options)),
                )
                first_token_s = phase(
                    "first_token",
                    partial(
                        measure,
                        partial(model.generate, **inputs, max_new_tokens=1, do_sample=False),
                    ),
                )
                row.update(
                    sequence_length=length,
                    encode_s=row_encode_s,
                    select_s=select_s,
                    scoring_s=scoring_s,
                    greedy_s=greedy_s,
                    estimator=estimator,
                    prefill_s=prefill_s,
                    decode_per_token_s=decode_s,
                    generate_s=generate_s,
                    end_to_end_s=end_to_end_s,
                    time_to_first_token_s=first_token_s,
                    kv_cache_bytes=_cache_bytes(cache),
                    peak_memory_bytes=peaks,
                    flops={
                        "vision": flops.vision(shapes),
                        "projector": flops.projector(shapes, n),
                        "scoring": 0.0
                        if estimator is None
                        else flops.scoring(shapes, n, estimator),
                        "greedy": 0.0 if keep is None else flops.greedy(shapes, n, keep),
                        "lm_prefill": flops.lm_prefill(shapes, text_length, lm_tokens),
                        "decode_per_token": flops.decode_token(
                            shapes, length + config.new_tokens // 2
                        ),
                    },
                )
                rows.append(row)
            finally:
                if handle is not None:
                    handle.remove()
    base = rows[0]
    for row in rows:
        row["prefill_speedup"] = base["prefill_s"] / row["prefill_s"]
        # The LM's work for the answer, with what selection costs added on the pruned side.
        row["generate_speedup_with_selection"] = base["generate_s"] / (
            row["generate_s"] + row["select_s"]
        )
        row["end_to_end_speedup"] = base["end_to_end_s"] / row["end_to_end_s"]
    seven_b = flops.prefill(flops.LLAVA15_7B, 576 + text_length)
    overhead_7b = {
        keep: (
            flops.scoring(flops.LLAVA15_7B, 576, "exact")
            + flops.greedy(flops.LLAVA15_7B, 576, keep)
        )
        / seven_b
        for keep in config.budgets
    }
    return {
        "config": asdict(config),
        "model": description,
        "method": config.method,
        "in_lm": method.in_lm,
        "dtype": config.dtype,
        "machine": machine()
        | {"peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024},
        "visual_tokens": n,
        "vision_share_of_prefill_flops": flops.vision_share(shapes, text_length),
        "rows": rows,
        "selection_share_of_unpruned_prefill": {
            row["keep"]: row["select_s"] / base["prefill_s"] for row in rows if row["pruned"]
        },
        "analytic_7b": {
            "llava15_7b_prefill_flops": seven_b,
            "exact_scoring_plus_greedy_share": overhead_7b,
        },
        "median_of": config.repeats,
    }
