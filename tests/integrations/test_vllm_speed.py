"""``zooprune speed --engine vllm``: the serving benchmark's bookkeeping on the default
LLaVA-1.5-proportioned model, at a size a test can afford (2 requests, 2 output tokens);
and ``--videos``, zooprune beside vLLM's EVS and VidCom2 on the default Qwen3-VL-
proportioned model (4 frames of 64 px)."""

import statistics

import pytest
import torch

from zooprune.integrations.vllm.throughput import ServingConfig, run_serving_benchmark

NEW_TOKENS = 2
CONCURRENCY = 2


PROGRESS: list[str] = []


@pytest.fixture(scope="module")
def result(tmp_path_factory):
    config = ServingConfig(
        budgets=(64,),
        concurrency=CONCURRENCY,
        new_tokens=NEW_TOKENS,
        repeats=2,
        warmup=1,
        cache=str(tmp_path_factory.mktemp("model")),
    )
    return run_serving_benchmark(config, PROGRESS.append)


def test_each_condition_serves_its_prompt_length_and_counts_its_work(result):
    unpruned, pruned, grid = result["rows"]
    assert [row["method"] for row in result["rows"]] == [None, "zoo", "grid"]
    assert result["visual_tokens"] == 576
    # the same text around 576 visual tokens, then around 64 (grid's row: the same K)
    assert unpruned["prompt_tokens"] - pruned["prompt_tokens"] == 576 - 64
    assert grid["prompt_tokens"] == pruned["prompt_tokens"] and grid["keep"] == 64
    assert result["reference"] == {
        "method": "grid",
        "keep": 64,
        "share_of_requests_per_s": pytest.approx(pruned["requests_per_s"] / grid["requests_per_s"]),
        "ttft_ratio": pytest.approx(pruned["ttft_median_s"] / grid["ttft_median_s"]),
    }
    # the method at the reference's K and the reference: both engines up, waves in turn;
    # then again, started in the other order
    waves = [line for line in PROGRESS if "keep 64" in line]
    assert waves == [
        f"{m} keep 64: {what}"
        for order in (("zoo", "grid"), ("grid", "zoo"))
        for what, ms in [
            ("starting the engine", order),
            *((f"wave {w} of 3", order) for w in (1, 2, 3)),
        ]
        for m in ms
    ]
    assert len(unpruned["wave_s"]) == 2
    assert len(pruned["wave_s"]) == len(grid["wave_s"]) == 4  # both orders' timed waves
    for row in result["rows"]:
        # every request of a wave answered with all its tokens within the wave's time
        tokens = CONCURRENCY * NEW_TOKENS
        assert row["output_tokens_per_s"] == pytest.approx(
            statistics.median(tokens / s for s in row["wave_s"])
        )
        assert row["requests_per_s"] == pytest.approx(
            statistics.median(CONCURRENCY / s for s in row["wave_s"])
        )
        assert 0 < row["ttft_median_s"] <= row["latency_median_s"] <= max(row["wave_s"])
        assert row["ttft_median_s"] <= row["ttft_p95_s"]
        assert 0 < row["kv_blocks_peak"] <= row["kv_blocks_total"]
    assert unpruned["selection_s_per_image"] is None and unpruned["selection"] is None
    # the plugin's own tally, in this process, split by the methods' stages: zoo scores
    # and runs its greedy; grid has neither stage, all its time is data movement
    for row in (pruned, grid):
        split = row["selection"]
        assert row["selection_s_per_image"] == split["selection"] > 0
        parts = split["scoring"] + split["greedy"] + split["data_movement"]
        assert parts == pytest.approx(split["selection"])
        assert split["threads"] == torch.get_num_threads()
    assert pruned["selection"]["scoring"] > 0 and pruned["selection"]["greedy"] > 0
    assert grid["selection"]["scoring"] == grid["selection"]["greedy"] == 0
    assert grid["selection"]["data_movement"] > 0
    # KV blocks follow the prompt lengths: ceil(tokens / block) per request
    block = pruned["kv_block_size"]
    for row in result["rows"]:
        per_request = -(-(row["prompt_tokens"] + NEW_TOKENS) // block)
        assert row["kv_blocks_peak"] <= CONCURRENCY * per_request
    assert pruned["kv_blocks_peak"] < unpruned["kv_blocks_peak"]
    assert pruned["throughput_x"] == pytest.approx(
        pruned["requests_per_s"] / unpruned["requests_per_s"]
    )
    assert result["vision_share_of_prefill_flops"] == pytest.approx(0.044, abs=0.002)


def test_the_tables_and_the_picture(result, tmp_path):
    from rich.console import Console

    from zooprune.cli.speed import serving_tables
    from zooprune.viz import plot_serving

    console = Console(width=1000, record=True)
    for table in serving_tables(result):
        console.print(table)
    text = console.export_text()
    assert "576/576" in text and "64/576" in text and "throughput x" in text
    assert "grid" in text
    (zoo_split,) = [line for line in text.splitlines() if "64/576" in line and " zoo " in line][-1:]
    split = result["rows"][1]["selection"]
    for part in ("selection", "scoring", "greedy", "data_movement"):
        assert f"{split[part] * 1e3:.1f}" in zoo_split
    assert plot_serving(result, tmp_path / "serving.png").read_bytes()[:4] == b"\x89PNG"


# -- videos: zooprune beside vLLM's own EVS and VidCom2 ------------------------------------

FRAMES, SIDE, RATE = 4, 64, 0.5  # 2 temporal patches of 2 x 2 merged tokens: N = 8
LEVELS = (1, 2)


@pytest.fixture(scope="module")
def video_result(tmp_path_factory):
    from zooprune.integrations.vllm.video_throughput import (
        VideoServingConfig,
        run_video_serving_benchmark,
    )

    config = VideoServingConfig(
        rate=RATE,
        methods=("grid",),
        concurrency=LEVELS,
        new_tokens=NEW_TOKENS,
        frames=FRAMES,
        frame_size=SIDE,
        repeats=2,
        warmup=1,
        cache=str(tmp_path_factory.mktemp("video-model")),
    )
    return run_video_serving_benchmark(config)


def test_every_pruned_video_row_keeps_evs_s_count_at_each_level(video_result):
    from vllm.multimodal.video_prune.evs import compute_retained_tokens_count

    rows = video_result["rows"]
    conditions = [("unpruned", None), ("zooprune", "grid"), ("vllm", "evs"), ("vllm", "vidcom2")]
    assert [(r["by"] or "unpruned", r["method"]) for r in rows] == [
        c for c in conditions for _ in LEVELS
    ]
    assert [r["concurrency"] for r in rows] == list(LEVELS) * len(conditions)
    n = (FRAMES // 2) * (SIDE // 16 // 2) ** 2
    keep = compute_retained_tokens_count(n // (FRAMES // 2), FRAMES // 2, RATE)
    assert (video_result["video_tokens"], video_result["keep"]) == (n, keep) and keep < n
    base = {r["concurrency"]: r for r in rows if r["by"] is None}
    for row in rows:
        unpruned = base[row["concurrency"]]
        pruned = row["by"] is not None
        assert row["video_tokens"] == (keep if pruned else n)
        # the same text, timestamps and markers around fewer video tokens
        assert unpruned["prompt_tokens"] - row["prompt_tokens"] == (n - keep if pruned else 0)
        assert len(row["wave_s"]) == 2
        assert row["requests_per_s"] == pytest.approx(
            statistics.median(row["concurrency"] / s for s in row["wave_s"])
        )
        assert row["throughput_x"] == pytest.approx(
            row["requests_per_s"] / unpruned["requests_per_s"]
        )
        assert 0 < row["ttft_median_s"] <= row["latency_median_s"] <= max(row["wave_s"])
        assert 0 < row["kv_blocks_peak"] <= unpruned["kv_blocks_peak"]
        # zooprune's own tally; vLLM's pruning and the unpruned rows select nothing of ours
        assert (row["selection_s_per_video"] is not None) == (row["by"] == "zooprune")
    assert video_result["vllm_methods_supported"] == ["evs", "vidcom2"]
    share = video_result["vision_share_of_prefill_flops"]
    assert share == pytest.approx(video_result["vision_share_qwen3_vl_8b"], abs=0.01)


def test_the_video_tables_and_the_picture(video_result, tmp_path):
    from rich.console import Console

    from zooprune.cli.speed import video_serving_tables
    from zooprune.viz import plot_video_serving

    console = Console(width=1000, record=True)
    for table in video_serving_tables(video_result):
        console.print(table)
    text = console.export_text()
    assert "evs" in text and "vidcom2" in text and "grid" in text and "throughput x" in text
    assert plot_video_serving(video_result, tmp_path / "video.png").read_bytes()[:4] == b"\x89PNG"


def test_the_video_command_refuses_bad_values_before_an_engine_starts(capsys):
    from zooprune.cli import main

    for argv, message in (
        (["--rate", "1.5"], "--rate must be in (0, 1)"),
        (["--frames", "1"], "--frames must be at least 2"),
        (["--concurrency", "0", "8"], "must be at least 1"),
    ):
        assert main(["speed", "--engine", "vllm", "--videos", *argv]) == 2
        assert message in capsys.readouterr().out
