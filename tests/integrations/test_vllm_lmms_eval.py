"""lmms-eval at serving speed: ``--model zooprune`` with ``base=vllm`` evaluates the
exported test-bed task through lmms-eval's own vLLM wrapper, its engine serving the model
with zooprune's plugin, and answers every question as ``zooprune bench`` (the Hugging Face
handle) does; bad settings stop the run before an engine starts."""

import json
import os

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

import pytest  # noqa: E402

# offline and task: lmms-eval's suite's fixtures (hub access off, the exported task)
from tests.integrations.test_lmms_eval import (  # noqa: E402, F401
    QUESTIONS,
    evaluate,
    offline,
    task,
)
from zooprune.bench.accuracy import jsonl_items, run_accuracy  # noqa: E402
from zooprune.integrations.lmms_eval.model import EvaluationAborted, create_pruned  # noqa: E402
from zooprune.integrations.lmms_eval.task import TASK  # noqa: E402
from zooprune.testbed.model import bundled_path, load_testbed  # noqa: E402

# 56 of 256 tokens, as a fraction lmms-eval parses to the float bench gets
RATIO_TEXT, RATIO = "0.2222222222", 2 / 9
#: what lmms-eval's vLLM wrapper passes on to vllm.LLM (one answer token, as bench)
ENGINE = "max_new_tokens=1,dtype=float32,enforce_eager=True,max_model_len=1024,seed=0"


def test_the_vllm_base_answers_every_question_as_zooprune_bench_does(task, tmp_path):  # noqa: F811
    args = f"base=vllm,model={bundled_path()},method=zoo,ratio={RATIO_TEXT},{ENGINE}"
    results = evaluate(task, "zooprune", args)
    model, processor = load_testbed()
    run_accuracy(
        model,
        processor,
        jsonl_items(task / "test.jsonl"),
        tmp_path / "bench",
        ["zoo"],
        [RATIO],
        batch_size=1,
        max_new_tokens=1,
    )
    rows = {
        (row["method"], row["ratio"]): row
        for row in map(json.loads, (tmp_path / "bench" / "results.jsonl").read_text().splitlines())
    }
    row = rows[("zoo", RATIO)]
    samples = sorted(results["samples"][TASK], key=lambda sample: sample["doc_id"])
    assert len(samples) == QUESTIONS
    assert [s["filtered_resps"][0].strip() for s in samples] == [
        p.strip() for p in row["predictions"]
    ]
    assert [s["accuracy"] for s in samples] == [float(c) for c in row["correct"]]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ("method=zoo,keep=0", "keep"),
        ("method=nope", "unknown method"),
        ('method=zoo,keep=8,hf_overrides={"a": 1}', "zooprune writes the engine's hf_overrides"),
    ],
)
def test_bad_settings_stop_the_run_before_an_engine_starts(args, message):
    from lmms_eval import utils

    parsed = utils.simple_parse_args_string(f"base=vllm,model={bundled_path()},{args}")
    with pytest.raises(EvaluationAborted, match=message):
        create_pruned(parsed)
