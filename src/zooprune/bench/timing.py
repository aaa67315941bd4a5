"""Timing helpers shared by the benchmarks: warm-up, repeats, medians, machine facts."""

from __future__ import annotations

import os
import platform
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch


def synchronize(device: torch.device | str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], Any], device: torch.device | str = "cpu") -> tuple[float, Any]:
    """Seconds one call takes, with the device drained before and after, and its result."""
    synchronize(device)
    start = time.perf_counter()
    result = fn()
    synchronize(device)
    return time.perf_counter() - start, result


def median_seconds(
    fn: Callable[[], Any], *, repeats: int, warmup: int, device: torch.device | str = "cpu"
) -> float:
    """Median wall time of ``repeats`` calls after ``warmup`` untimed ones."""
    for _ in range(warmup):
        fn()
    return statistics.median(timed(fn, device)[0] for _ in range(max(1, repeats)))


class StepClock:
    """A logits processor that timestamps every decoding step and leaves scores alone.

    The first stamp comes right after prefill; the gaps after it are cached decode steps.
    """

    def __init__(self) -> None:
        self.stamps: list[float] = []

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        self.stamps.append(time.perf_counter())
        return scores

    def per_step(self) -> float | None:
        """Mean seconds per decode step (None with fewer than two steps)."""
        if len(self.stamps) < 2:
            return None
        return (self.stamps[-1] - self.stamps[0]) / (len(self.stamps) - 1)


def machine() -> dict[str, Any]:
    """What the numbers were measured on."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as info:
            names = [
                line.split(":", 1)[1].strip() for line in info if line.startswith("model name")
            ]
        cpu = names[0] if names else cpu
    except OSError:
        pass
    facts = {
        "cpu": cpu,
        "cpu_cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
    }
    if torch.cuda.is_available():
        facts["gpu"] = torch.cuda.get_device_name()
    return facts


def fast_dtype(device: torch.device | str) -> str:
    """``bfloat16`` where the hardware computes it natively (CUDA, or a CPU with
    avx512_bf16 / AMX), else ``float32``: emulated bf16 on a CPU is slower than fp32."""
    if torch.device(device).type == "cuda":
        return "bfloat16"
    try:
        with open("/proc/cpuinfo") as info:
            flags = set(info.read().split())
    except OSError:
        return "float32"
    return "bfloat16" if {"avx512_bf16", "amx_bf16"} & flags else "float32"


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    """Spearman rank correlation of two score vectors (ties broken by position)."""
    ranks = [x.double().argsort().argsort().double() for x in (a, b)]
    ra, rb = (r - r.mean() for r in ranks)
    return float((ra * rb).sum() / (ra.norm() * rb.norm()))


def topk_overlap(a: torch.Tensor, b: torch.Tensor, k: int) -> float:
    """Fraction of the k highest-scoring tokens two score vectors share."""
    top_a = set(a.topk(k).indices.tolist())
    return len(top_a & set(b.topk(k).indices.tolist())) / k
