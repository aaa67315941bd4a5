"""``zooprune bench --engine vllm``: the bundled test bed answers through vLLM exactly what
it answers through ``generate``, question for question, unpruned and pruned."""

import json

import pytest

from zooprune.bench import accuracy
from zooprune.cli import main
from zooprune.testbed.model import bundled_path, load_testbed

METHODS = ["zoo", "divprune", "random"]
RATIOS = [1 / 9]


@pytest.fixture(scope="module")
def items():
    return accuracy.testbed_items(6, "test", ["color", "count", "exists"])


def test_vllm_answers_what_generate_answers(items, tmp_path):
    from zooprune.integrations.vllm.accuracy import VllmAnswerer

    model, processor = load_testbed()
    out = tmp_path / "bench"  # one folder: the engines' results must not mix
    hf = accuracy.run_accuracy(model, processor, items, out, METHODS, RATIOS, batch_size=8, reps=10)
    answerer = VllmAnswerer(bundled_path(), max_new_tokens=1)
    try:
        served = accuracy.run_accuracy(
            bundled_path(),
            answerer.processor,
            items,
            out,
            METHODS,
            RATIOS,
            batch_size=8,
            reps=10,
            engine="vllm",
            answerer=answerer,
        )
    finally:
        answerer.close()
    assert served["fingerprint"] != hf["fingerprint"]
    rows = {}
    for line in (out / "results.jsonl").read_text().splitlines():
        row = json.loads(line)
        rows[(row["fingerprint"], row["key"])] = row
    keys = {key for _, key in rows}
    assert len(rows) == 2 * len(keys) == 2 * (1 + len(METHODS) * len(RATIOS))
    for key in keys:
        ours, theirs = rows[(hf["fingerprint"], key)], rows[(served["fingerprint"], key)]
        assert theirs["predictions"] == ours["predictions"], key
        assert theirs["kept_mean"] == ours["kept_mean"], key


def test_bench_refuses_what_vllm_cannot_serve(capsys):
    assert main(["bench", "--engine", "vllm", "--methods", "visionzip,zoo", "--quick"]) == 2
    out = capsys.readouterr().out
    assert "vLLM cannot serve visionzip" in out and "zoo-sum" in out
