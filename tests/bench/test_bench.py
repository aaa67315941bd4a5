"""The benchmarks run end to end on tiny shapes, with consistent numbers (no timing asserts)."""

import json

import pytest
from transformers import AutoConfig

from zooprune.bench import flops
from zooprune.bench.kernels import KernelBenchConfig, naive_reslice_select, run_kernel_benchmark
from zooprune.bench.speed import SpeedConfig, run_speed_benchmark
from zooprune.cli import main


def test_naive_reference_matches_the_kernel():
    import torch

    from zooprune.select.greedy import maxmin_select

    g = torch.Generator().manual_seed(0)
    z, w = torch.randn(50, 16, generator=g), torch.rand(50, generator=g)
    for k in (1, 7, 50):
        assert (
            naive_reslice_select(z, k, w) == maxmin_select(z[None], k, weights=w[None])[0].tolist()
        )


def test_kernel_benchmark_on_small_shapes():
    config = KernelBenchConfig(
        tokens=48,
        vision_dim=16,
        hidden_dim=32,
        text_dim=24,
        budgets=(4, 12),
        images=2,
        num_directions=32,
        rank=8,
        greedy_repeats=1,
    )
    result = run_kernel_benchmark(config)
    rows = {row["estimator"]: row for row in result["estimators"]}
    assert set(rows) == {"zo", "exact", "jvp", "lowrank", "zo-reseeded"}
    assert rows["zo-reseeded"]["spearman_vs_zo"] < 1  # another bank: sampling noise shows
    assert (
        rows["zo"]["spearman_vs_zo"] == pytest.approx(1.0) and rows["zo"]["top4_overlap_vs_zo"] == 1
    )
    assert rows["jvp"]["spearman_vs_zo"] > 0.99  # same directions, no step: nearly identical
    assert rows["exact"]["spearman_vs_zo"] > 0.8
    assert all(row["same_selection"] for row in result["greedy"])
    for row in result["greedy"]:
        assert 0 < row["ours_loop_s"] and 0 < row["naive_loop_s"] and row["distance_matrix_s"] > 0
    assert result["setup"]["exact_gram_kernel_s"] > 0 and result["setup"]["lowrank_svd_s"] > 0
    assert [row["k"] for row in result["greedy"]] == [4, 12]


@pytest.fixture(scope="module")
def speed_result(tiny_llava_dir):
    config = SpeedConfig(
        model=str(tiny_llava_dir),
        budgets=(16, 4),
        dtype="float32",
        new_tokens=3,
        repeats=1,
        warmup=0,
    )
    return run_speed_benchmark(config)


def test_speed_rows_are_consistent(speed_result):
    rows = speed_result["rows"]
    assert [r["keep"] for r in rows] == [64, 16, 4]
    base = rows[0]["sequence_length"]
    assert [r["sequence_length"] for r in rows] == [base, base - 48, base - 60]
    # KV cache bytes grow exactly with the prompt length: layers x 2 x kv width x bytes each.
    per_token = {r["kv_cache_bytes"] / r["sequence_length"] for r in rows}
    assert len(per_token) == 1 and per_token.pop() == 2 * 2 * 2 * 12 * 4
    lm = [r["flops"]["lm_prefill"] for r in rows]
    assert lm[0] > lm[1] > lm[2] > 0
    assert rows[0]["select_s"] == 0 and all(r["select_s"] > 0 for r in rows[1:])
    assert rows[1]["estimator"] == "exact"
    assert all(r["greedy_s"] > 0 and r["scoring_s"] > 0 for r in rows[1:])
    assert all(r["decode_per_token_s"] > 0 for r in rows)  # timed inside generate
    assert set(rows[0]["peak_memory_bytes"]) == {"prefill", "generate", "end_to_end", "first_token"}
    assert rows[0]["prefill_speedup"] == 1.0


def test_speed_command_writes_json_and_png(tiny_llava_dir, tmp_path, capsys):
    code = main(
        [
            "speed",
            "--model",
            str(tiny_llava_dir),
            "--budgets",
            "8",
            "--new-tokens",
            "2",
            "--repeats",
            "1",
            "--warmup",
            "0",
            "--out",
            str(tmp_path),
        ]
    )
    assert code == 0
    out = capsys.readouterr().out
    assert "8/64" in out and "speed-up" in out
    result = json.loads((tmp_path / "speed.json").read_text())
    assert result["visual_tokens"] == 64 and len(result["rows"]) == 2
    assert result["dtype"] in ("float32", "bfloat16")  # "auto" resolved to a real dtype
    assert (tmp_path / "speed.png").read_bytes()[:4] == b"\x89PNG"


def test_an_in_lm_method_is_timed_through_its_handle(tiny_llava_dir):
    # FastV after layer 0 of the tiny model's 2: layer 0 holds all 64 tokens, layer 1 the 8.
    config = SpeedConfig(
        model=str(tiny_llava_dir),
        budgets=(8,),
        method="fastv",
        dtype="float32",
        new_tokens=3,
        repeats=1,
        warmup=0,
        options={"layer": 1},
    )
    result = run_speed_benchmark(config)
    base, fastv = result["rows"]
    assert result["in_lm"] and fastv["keep"] == 8
    # the prompt enters whole; the FLOPs count 64 tokens in layer 0 and 8 in layer 1
    assert fastv["sequence_length"] == base["sequence_length"]
    shapes = flops.Shapes.of_llava(AutoConfig.from_pretrained(tiny_llava_dir))
    text = base["sequence_length"] - 64
    assert fastv["flops"]["lm_prefill"] == flops.lm_prefill(shapes, text, [64, 8])
    assert base["flops"]["lm_prefill"] == flops.prefill(shapes, text + 64)
    # the cache: layer 0 holds the whole prompt, layer 1 the kept tokens
    per_layer_token = base["kv_cache_bytes"] / (2 * base["sequence_length"])
    assert fastv["kv_cache_bytes"] == per_layer_token * (2 * base["sequence_length"] - 56)
    assert fastv["scoring_s"] > 0 and fastv["select_s"] == 0  # the ranking, inside the LM
    assert fastv["prefill_s"] > 0 and fastv["decode_per_token_s"] > 0


def test_an_in_lm_calls_own_encoder_time_comes_off_that_call(monkeypatch):
    # Each call through the handle records its own encoder time: the median is taken over
    # the calls' differences, so noise in a separately timed encoder cannot make it negative.
    from types import SimpleNamespace

    from zooprune.bench import speed

    handle = SimpleNamespace(selection=SimpleNamespace(encode_seconds=0.0))
    encoder = iter([0.9, 0.3, 0.5, 0.2])  # the warm-up call's, then three timed calls'
    elapsed = iter([1.0, 1.0, 0.6])

    def call():
        handle.selection.encode_seconds = next(encoder)

    monkeypatch.setattr(speed, "timed", lambda fn, device: (fn(), next(elapsed))[1:] + (None,))
    config = SpeedConfig(repeats=3, warmup=1)
    # timed calls: 1.0 - 0.3, 1.0 - 0.5, 0.6 - 0.2 -> median of 0.7, 0.5, 0.4
    assert speed._median_less_encoder(handle, config, call) == pytest.approx(0.5)
