"""``zooprune speed --engine vllm``: the serving benchmark's bookkeeping on the default
LLaVA-1.5-proportioned model, at a size a test can afford (2 requests, 2 output tokens)."""

import statistics

import pytest

from zooprune.integrations.vllm.throughput import ServingConfig, run_serving_benchmark

NEW_TOKENS = 2
CONCURRENCY = 2


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
    return run_serving_benchmark(config)


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
    }
    for row in result["rows"]:
        assert len(row["wave_s"]) == 2
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
    assert unpruned["selection_s_per_image"] is None
    # the plugin's own tally, in this process
    assert pruned["selection_s_per_image"] > 0 and grid["selection_s_per_image"] > 0
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
    assert plot_serving(result, tmp_path / "serving.png").read_bytes()[:4] == b"\x89PNG"
