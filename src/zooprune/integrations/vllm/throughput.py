"""Serving throughput on vLLM: R concurrent requests with images, unpruned and per budget.

Each condition gets its own engine (the budget is part of the model's config). A wave puts
R requests, each with an image of its own (vLLM's encoder cache must not serve one), into
the engine at once and steps it until all are answered: requests/s and output tokens/s
come from the wave's wall time, time to first token and latency from the step in which
each request got its first and last token. Medians over the timed waves; the warm-up wave
also reads the KV-cache blocks in use (its peak), outside the timing.

The engines run in this process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``), so the selection's
own time, split into the methods' stages, can be read from
:data:`zooprune.integrations.vllm.selection.TALLY`. The method at the reference's budget
and the reference itself are served by two engines at once, wave for wave in turn, and
again started in the other order.
"""

from __future__ import annotations

import dataclasses
import gc
import os
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from zooprune.bench import flops
from zooprune.bench.accuracy import prompt_for
from zooprune.bench.speed import (
    DEFAULT_DESCRIPTION,
    DTYPES,
    VOCAB,
    default_model,
    default_prompt_words,
)
from zooprune.bench.timing import fast_dtype, machine


@dataclass
class ServingConfig:
    model: str | None = None  # None: the LLaVA-1.5-proportioned default, saved under cache
    budgets: tuple[int, ...] = (192, 128, 64)
    method: str = "zoo"
    options: dict[str, Any] = field(default_factory=dict)
    # A method whose selection is nearly free, served at the smallest budget too: the
    # requests/s a pre-LLM pruner can reach at that K (None: no such row).
    reference: str | None = "grid"
    dtype: str = "auto"  # bfloat16 where the hardware has it, else float32
    concurrency: int = 8
    new_tokens: int = 32
    text_tokens: int = 40
    repeats: int = 3
    warmup: int = 1
    image_size: int = 336
    kv_cache_gib: float = 2.0  # the CPU engine's KV-cache space
    device: str = "cpu"
    seed: int = 0
    cache: str = ".cache/speed-model"


def save_default_model(path: str | Path, dtype: str, seed: int = 0) -> Path:
    """The default model (``zooprune speed``'s) and its processor, saved in the layout of
    the LLaVA-1.5 checkpoints on the hub, which vLLM's stock LLaVA (the unpruned baseline)
    loads. Written once per dtype and seed; later calls find it."""
    from zooprune.integrations.vllm.checkpoint import to_hub_layout
    from zooprune.tiny import word_level_llava_processor

    path = Path(path)
    if (path / "config.json").is_file():
        return path
    model = default_model(DTYPES[dtype], seed)
    model.generation_config.pad_token_id = 0
    model.save_pretrained(path)
    word_level_llava_processor(VOCAB, 336, 14).save_pretrained(path)
    return to_hub_layout(path)


def percentile(values: list[float], q: float) -> float:
    """The ``q`` quantile, linearly interpolated (numpy's default)."""
    return float(np.percentile(np.asarray(values, dtype=float), q * 100))


def _images(config: ServingConfig, wave: int) -> list[Image.Image]:
    rng = np.random.default_rng([config.seed, wave])
    side = config.image_size
    return [
        Image.fromarray(rng.integers(0, 256, (side, side, 3), dtype=np.uint8))
        for _ in range(config.concurrency)
    ]


def _kv_blocks_in_use(engine: Any, total: int) -> int:
    """The KV blocks in use now: read off the scheduler of an engine in this process (the
    source of vLLM's usage gauge, which engines sharing a process overwrite), else the
    gauge."""
    core = getattr(getattr(engine, "engine_core", None), "engine_core", None)
    if core is not None:
        return round(core.scheduler.kv_cache_manager.usage * total)
    for metric in engine.get_metrics():
        if metric.name == "vllm:kv_cache_usage_perc":
            return round(metric.value * total)
    return 0


def serve_wave(
    engine: Any,
    requests: list[dict],
    params: Any,
    name: str,
    blocks: int | None,
    count: int | None = None,
) -> dict[str, Any]:
    """Submit every request at once and step the engine until all are done. With
    ``blocks`` (the engine's total), the peak of KV blocks in use is read at every step;
    with ``count`` (a token id), ``counted`` is how often it is in the first answered
    request's prompt."""
    start = time.perf_counter()
    counted = None
    for i, request in enumerate(requests):
        engine.add_request(f"{name}-{i}", request, params)
    first: dict[str, float] = {}
    last: dict[str, float] = {}
    prompt_tokens: dict[str, int] = {}
    output_tokens: dict[str, int] = {}
    peak = 0
    while engine.has_unfinished_requests():
        outputs = engine.step()
        now = time.perf_counter()
        for out in outputs:
            if out.outputs and out.outputs[0].token_ids:
                first.setdefault(out.request_id, now)
            if out.finished:
                last[out.request_id] = now
                prompt_tokens[out.request_id] = len(out.prompt_token_ids)
                if count is not None and counted is None:
                    counted = sum(token == count for token in out.prompt_token_ids)
                output_tokens[out.request_id] = len(out.outputs[0].token_ids)
        if blocks is not None:  # the warm-up wave only: reading metrics costs time
            peak = max(peak, _kv_blocks_in_use(engine, blocks))
    wall = max(last.values()) - start
    return {
        "wall_s": wall,
        "ttft_s": [first[r] - start for r in sorted(first)],
        "latency_s": [last[r] - start for r in sorted(last)],
        "prompt_tokens": statistics.median(prompt_tokens.values()),
        "output_tokens": sum(output_tokens.values()),
        "kv_blocks_peak": peak,
        "counted": counted,
    }


def _conditions(
    config: ServingConfig,
    path: Path,
    prompt: str,
    runs: list[tuple[int | None, str]],
    progress: Callable[[str], None],
) -> list[dict[str, Any]]:
    """A row per ``(keep, method)`` of ``runs`` (keep None: unpruned), each on its own
    engine. Two runs are compared: their engines serve the same waves in turn, so that a
    drift of the machine over the run weighs on both alike, and twice, the second time
    started in the other order (an engine started first in a process was measured to
    decode more slowly there), their timed waves pooled."""
    orders = [runs] if len(runs) == 1 else [runs, runs[::-1]]
    pooled: dict[tuple[int | None, str], list[Any]] = {}
    for order in orders:
        for run, (waves, kv_peak, tally, cache) in zip(
            order, _served(config, path, prompt, order, progress), strict=True
        ):
            if run not in pooled:
                pooled[run] = [waves, kv_peak, tally, cache]
            else:
                mine = pooled[run]
                mine[0] = mine[0] + waves
                mine[1] = max(mine[1], kv_peak)
                mine[2] = mine[2].plus(tally)
    rows = []
    for keep, method in runs:
        waves, kv_peak, tally, cache = pooled[keep, method]
        selection = tally.per_image()
        rows.append(
            {
                "keep": keep,
                "pruned": keep is not None,
                "method": None if keep is None else method,
                **summary(waves, config.concurrency),
                "kv_blocks_peak": kv_peak,
                **cache,
                "selection_s_per_image": None if selection is None else selection["selection"],
                "selection": selection,
            }
        )
    return rows


def _served(
    config: ServingConfig,
    path: Path,
    prompt: str,
    runs: list[tuple[int | None, str]],
    progress: Callable[[str], None],
) -> list[tuple[list[dict[str, Any]], int, Any, dict[str, int]]]:
    """Every run's engine started, in order, then their waves in turn
    (:func:`serve_interleaved`): per run its timed waves, KV peak, selection tally and
    KV cache's size (``kv_blocks_total``, ``kv_block_size``)."""
    import zooprune.integrations.vllm as zv
    from zooprune.integrations.vllm.selection import TALLY

    TALLY.synchronize = True
    engines, labels, params = [], [], None
    for keep, method in runs:
        label = "unpruned" if keep is None else f"{method} keep {keep}"
        progress(f"{label}: starting the engine")
        options = config.options if method == config.method else {}
        pruning = {} if keep is None else zv.engine_args(path, method, keep=keep, **options)
        llm, params = start_engine(path, config, 2048, config.concurrency, {"image": 1}, pruning)
        engines.append(llm)
        labels.append(label)
    served = serve_interleaved(
        [llm.llm_engine for llm in engines],
        lambda wave: [
            {"prompt": prompt, "multi_modal_data": {"image": image}}
            for image in _images(config, wave)
        ],
        params,
        labels,
        config,
        progress,
    )
    caches = [
        {
            "kv_blocks_total": llm.llm_engine.vllm_config.cache_config.num_gpu_blocks,
            "kv_block_size": llm.llm_engine.vllm_config.cache_config.block_size,
        }
        for llm in engines
    ]
    del engines, llm
    gc.collect()
    return [(*one, cache) for one, cache in zip(served, caches, strict=True)]


def start_engine(
    path: Path,
    config: Any,
    max_model_len: int,
    max_num_seqs: int,
    limit_mm_per_prompt: dict[str, int],
    engine_args: dict[str, Any],
) -> tuple[Any, Any]:
    """A benchmark's engine for one condition (``engine_args``: its pruning), in this
    process, and the sampling every request gets: ``config.new_tokens`` greedy tokens,
    EOS ignored, not detokenized."""
    from vllm import LLM, SamplingParams

    llm = LLM(
        model=str(path),
        dtype=config.dtype,
        max_model_len=max_model_len,
        max_num_seqs=max(max_num_seqs, 1),
        limit_mm_per_prompt=limit_mm_per_prompt,
        enforce_eager=config.device == "cpu",  # no graph capture or compilation on a CPU
        disable_log_stats=False,  # the KV-cache usage gauge
        seed=config.seed,
        **engine_args,
    )
    params = SamplingParams(
        max_tokens=config.new_tokens, temperature=0, ignore_eos=True, detokenize=False
    )
    return llm, params


def serve_interleaved(
    engines: list[Any],
    requests: Callable[[int], list[dict]],
    params: Any,
    labels: list[str],
    config: Any,
    progress: Callable[[str], None],
    count: int | None = None,
) -> list[tuple[list[dict[str, Any]], int, Any]]:
    """``config.warmup`` waves, then ``config.repeats`` timed ones, each wave served by
    every engine in turn (:func:`serve_wave`, ``requests(wave)``). Per engine: its timed
    waves, the KV blocks in use at its warm-up's peak, and the
    :class:`~zooprune.integrations.vllm.selection.Tally` of its selections in them."""
    from zooprune.integrations.vllm.selection import TALLY, Tally

    waves: list[list[dict[str, Any]]] = [[] for _ in engines]
    peaks = [0] * len(engines)
    tallies = [Tally() for _ in engines]
    total = config.warmup + config.repeats
    for wave in range(total):
        timed = wave >= config.warmup
        for i, (engine, label) in enumerate(zip(engines, labels, strict=True)):
            progress(f"{label}: wave {wave + 1} of {total}")
            blocks = None if timed else engine.vllm_config.cache_config.num_gpu_blocks
            before = dataclasses.replace(TALLY)
            result = serve_wave(engine, requests(wave), params, f"{label}-{wave}", blocks, count)
            if timed:
                waves[i].append(result)
                tallies[i] = tallies[i].plus(TALLY.plus(before, sign=-1))
            else:
                peaks[i] = result["kv_blocks_peak"]
    return list(zip(waves, peaks, tallies, strict=True))


def ratios(row: dict[str, Any], unpruned: dict[str, Any]) -> dict[str, float]:
    """A condition's requests/s, median TTFT and median latency over the unpruned row's."""
    return {
        "throughput_x": row["requests_per_s"] / unpruned["requests_per_s"],
        "ttft_ratio": row["ttft_median_s"] / unpruned["ttft_median_s"],
        "latency_ratio": row["latency_median_s"] / unpruned["latency_median_s"],
    }


def summary(waves: list[dict[str, Any]], concurrency: int) -> dict[str, Any]:
    """The timed waves' medians: requests/s and output tokens/s per wave, TTFT and latency
    (median, p95) over every request in them."""
    walls = [w["wall_s"] for w in waves]
    ttft = [t for w in waves for t in w["ttft_s"]]
    latency = [t for w in waves for t in w["latency_s"]]
    return {
        "prompt_tokens": waves[0]["prompt_tokens"],
        "requests_per_s": statistics.median(concurrency / w for w in walls),
        "output_tokens_per_s": statistics.median(w["output_tokens"] / w["wall_s"] for w in waves),
        "ttft_median_s": statistics.median(ttft),
        "ttft_p95_s": percentile(ttft, 0.95),
        "latency_median_s": statistics.median(latency),
        "latency_p95_s": percentile(latency, 0.95),
        "wave_s": walls,
    }


def run_serving_benchmark(
    config: ServingConfig, progress: Callable[[str], None] = lambda _: None
) -> dict[str, Any]:
    """Measure unpruned and every budget on vLLM; returns a JSON-ready dict."""
    # Before vLLM reads them: the engine in this process (the selection tally) and the
    # CPU engine's KV-cache space.
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", f"{config.kv_cache_gib:g}")
    if config.dtype == "auto":
        config = replace(config, dtype=fast_dtype(config.device))
    default = config.model is None
    if default:
        progress("saving the default model")
        path = save_default_model(
            Path(config.cache) / f"{config.dtype}-{config.seed}", config.dtype, config.seed
        )
    else:
        path = Path(config.model)
    from transformers import AutoConfig

    hf_config = AutoConfig.from_pretrained(path)
    words = default_prompt_words(config.text_tokens, config.seed)
    if default:
        prompt = "<s> user <image> " + " ".join(words)
    else:
        from transformers import AutoProcessor

        prompt = prompt_for(AutoProcessor.from_pretrained(path), " ".join(words))
    share = None
    if hf_config.model_type == "llava":
        share = flops.vision_share(flops.Shapes.of_llava(hf_config), config.text_tokens)
    with_reference = config.reference not in (None, config.method) and bool(config.budgets)
    # The method at the reference's K and the reference: a pair of engines, their waves in
    # turn (their ratio is the figure read); every other condition alone.
    alone = [(None, config.method), *((keep, config.method) for keep in config.budgets)]
    if with_reference:
        paired = [(min(config.budgets), config.method), (min(config.budgets), config.reference)]
        alone.remove(paired[0])
    rows = [row for run in alone for row in _conditions(config, path, prompt, [run], progress)]
    if with_reference:
        pair = _conditions(config, path, prompt, paired, progress)
        at = 1 + config.budgets.index(paired[0][0])
        rows = [*rows[:at], pair[0], *rows[at:], pair[1]]
    base = rows[0]
    for row in rows:
        row |= ratios(row, base)
    reference = None
    if with_reference:
        limit = rows[-1]
        measured = next(row for row in rows[1:-1] if row["keep"] == limit["keep"])
        reference = {
            "method": config.reference,
            "keep": limit["keep"],
            "share_of_requests_per_s": measured["requests_per_s"] / limit["requests_per_s"],
            "ttft_ratio": measured["ttft_median_s"] / limit["ttft_median_s"],
        }
    import vllm

    return {
        "engine": f"vllm {vllm.__version__}",
        "config": asdict(config),
        "model": DEFAULT_DESCRIPTION if default else str(config.model),
        "method": config.method,
        "dtype": config.dtype,
        "vision_share_of_prefill_flops": share,
        # the unpruned prompt's length less a pruned one's text
        "visual_tokens": round(base["prompt_tokens"] - rows[1]["prompt_tokens"] + rows[1]["keep"])
        if len(rows) > 1
        else None,
        "machine": machine(),
        "rows": rows,
        # the method's requests/s at the reference's K, as a share of the reference's
        "reference": reference,
        "median_of": config.repeats,
    }
