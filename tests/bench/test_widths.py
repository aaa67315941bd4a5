"""``zooprune speed-kernels --widths``: the estimators at a projector's width beside its
LM's pruned prefill, on a tiny shape a test can afford."""

import pytest
from rich.console import Console

from zooprune.bench.widths import SHAPES, WidthBenchConfig, WidthShape, run_width_benchmark
from zooprune.cli import main
from zooprune.cli.speed import auto_lines, width_table

TINY = WidthShape("tiny", 6, 40, 24, lm_layers=3, lm_ffn=48, lm_heads=4, lm_kv_heads=2)


@pytest.fixture(scope="module")
def result():
    config = WidthBenchConfig(
        tokens=50, keep=8, text_tokens=5, images=2, num_directions=32, repeats=1, shapes=(TINY,)
    )
    return run_width_benchmark(config)


def test_every_estimator_is_timed_and_ranked_against_exact(result):
    rows = result["rows"]
    assert [row["estimator"] for row in rows] == ["exact", "lowrank", "jvp", "zo"]
    assert {row["shape"] for row in rows} == {"tiny"}
    assert result["shapes"] == [
        {
            "name": "tiny",
            "vision_dim": 6,
            "hidden": 40,
            "text_dim": 24,
            "lm_layers": 3,
            "lm_ffn": 48,
            "lm_heads": 4,
            "lm_kv_heads": 2,
        }
    ]
    by = {row["estimator"]: row for row in rows}
    assert by["exact"]["spearman_vs_exact"] == pytest.approx(1.0)
    assert by["exact"]["top8_overlap_vs_exact"] == 1.0
    # jvp and zo estimate what exact computes: they rank the tokens nearly alike
    assert by["jvp"]["spearman_vs_exact"] > 0.9 and by["zo"]["spearman_vs_exact"] > 0.9
    prefill = rows[0]["prefill_s"]
    for row in rows:
        assert row["prefill_s"] == prefill > 0
        assert row["scoring_s_per_image"] > 0 and row["greedy_s_per_image"] > 0
        assert row["selection_s_per_image"] == pytest.approx(
            row["scoring_s_per_image"] + row["greedy_s_per_image"]
        )
        assert row["share_of_prefill"] == pytest.approx(row["selection_s_per_image"] / prefill)


def test_the_table_and_what_auto_takes(result):
    console = Console(width=300, record=True)
    console.print(width_table(result))
    text = console.export_text()
    assert "6->40->24" in text and "top-8 overlap" in text
    for estimator in ("exact", "lowrank", "jvp", "zo"):
        assert f" {estimator} " in text
    (line,) = auto_lines(result)
    assert line.startswith("tiny: auto takes exact for this MLP")
    assert "zo/jvp time" in line


def test_the_shapes_of_real_models_and_an_unknown_one_refused(capsys):
    names = [shape.name for shape in SHAPES]
    assert names == [
        "zooprune speed default",
        "LLaVA-1.5-7B",
        "LLaVA-1.5-13B",
        "Qwen2.5-VL-7B merger",
    ]
    seven_b = SHAPES[1]
    assert (seven_b.vision_dim, seven_b.hidden, seven_b.text_dim) == (1024, 4096, 4096)
    assert (seven_b.lm_layers, seven_b.lm_ffn) == (32, 11008)
    with pytest.raises(SystemExit) as exit_:
        main(["speed-kernels", "--widths", "--shapes", "LLaVA-1.5-7B,GPT-5"])
    assert exit_.value.code == 2
    assert "unknown shape 'GPT-5'" in capsys.readouterr().err
