"""zooprune in lmms-eval 0.7.3, offline, on the bundled test bed exported as an lmms-eval task:
the plugin resolves through its entry point, answers exactly as ``zooprune bench`` does,
records what it kept, and fails the run loudly on a bad option."""

import json
import os
import shutil
import subprocess
import sys
from importlib.metadata import entry_points

import pytest

from zooprune.bench.accuracy import jsonl_items, run_accuracy
from zooprune.integrations.lmms_eval.model import (
    EvaluationAborted,
    ZoopruneModel,
    create_pruned,
    settings_from_model_args,
)
from zooprune.integrations.lmms_eval.task import TASK, write_testbed_task
from zooprune.testbed.model import bundled_path, load_testbed

OFFLINE = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
BASE = f"pretrained={bundled_path()},device=cpu,device_map=cpu"
# Two budgets as fractions lmms-eval parses to the same floats bench gets: 56 and 14 of 256.
RATIOS = {"0.2222222222": 2 / 9, "0.0555555556": 1 / 18}


# The task's default families: all seven test-bed families, as `zooprune bench` scores.
N_PER_FAMILY = 4
QUESTIONS = N_PER_FAMILY * 7


@pytest.fixture(scope="module", autouse=True)
def offline():
    saved = {key: os.environ.get(key) for key in OFFLINE}
    os.environ.update(OFFLINE)
    yield
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    folder = tmp_path_factory.mktemp("task")
    write_testbed_task(folder, n_per_family=N_PER_FAMILY)
    return folder


def evaluate(task, model, model_args):
    from lmms_eval.evaluator import simple_evaluate
    from lmms_eval.tasks import TaskManager

    manager = TaskManager("WARNING", include_path=str(task), include_defaults=False)
    return simple_evaluate(
        model=model,
        model_args=model_args,
        tasks=[TASK],
        batch_size=1,
        log_samples=True,
        task_manager=manager,
        verbosity="WARNING",
    )


def test_the_plugin_resolves_through_its_entry_point():
    from lmms_eval.models import get_model

    points = {point.name: point.value for point in entry_points(group="lmms_eval.models")}
    assert points["zooprune"] == "zooprune.integrations.lmms_eval:manifests"
    assert get_model("zooprune") is ZoopruneModel


def test_lmms_eval_answers_every_question_as_zooprune_bench_does(task, tmp_path):
    runs = {"unpruned": evaluate(task, "llava_hf", BASE)}
    for method in ("zoo", "divprune"):
        for text in RATIOS:
            args = f"base=llava_hf,{BASE},method={method},ratio={text}"
            runs[(method, text)] = evaluate(task, "zooprune", args)
    model, processor = load_testbed()
    summary_rows = run_accuracy(
        model,
        processor,
        jsonl_items(task / "test.jsonl"),
        tmp_path / "bench",
        ["zoo", "divprune"],
        list(RATIOS.values()),
        batch_size=1,
        max_new_tokens=1,
    )
    assert summary_rows["questions"] == QUESTIONS
    rows = {
        (row["method"], row["ratio"]): row
        for row in map(json.loads, (tmp_path / "bench" / "results.jsonl").read_text().splitlines())
    }
    for key, results in runs.items():
        row = rows[("unpruned", None)] if key == "unpruned" else rows[(key[0], RATIOS[key[1]])]
        samples = sorted(results["samples"][TASK], key=lambda sample: sample["doc_id"])
        answers = [sample["filtered_resps"][0] for sample in samples]  # one answer each
        assert [a.strip() for a in answers] == [p.strip() for p in row["predictions"]], key
        assert [sample["accuracy"] for sample in samples] == [float(c) for c in row["correct"]]
        accuracy = results["results"][TASK]["accuracy,none"]
        assert accuracy == pytest.approx(sum(row["correct"]) / QUESTIONS)
        if key != "unpruned":
            # What was kept, recorded next to lmms-eval's own figures.
            throughput = results["throughput"]
            images = throughput["avg_zooprune_images"]
            assert images == QUESTIONS
            assert throughput["avg_zooprune_kept_tokens"] / images == row["kept_mean"]
            assert throughput["avg_zooprune_visual_tokens"] / images == 256
            assert throughput["avg_zooprune_select_seconds"] > 0
    # Pruning shows: at 14 of 256 tokens the test bed answers worse than unpruned.
    score = {key: results["results"][TASK]["accuracy,none"] for key, results in runs.items()}
    assert score[("zoo", "0.0555555556")] < score["unpruned"]


def test_a_refused_call_fails_the_run_with_its_message(task):
    # The stock wrapper catches exceptions from generate() and would score "" instead.
    args = f"base=llava_hf,{BASE},method=zoo,keep=9999"
    command = [sys.executable, "-m", "lmms_eval", "eval", "--model", "zooprune"]
    command += ["--model_args", args, "--tasks", TASK, "--include_path", str(task)]
    done = subprocess.run(command, capture_output=True, text=True, env=os.environ | OFFLINE)
    assert done.returncode != 0
    assert "zooprune: keep=9999 exceeds image 0's 256 visual tokens" in done.stdout + done.stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ({}, "name the lmms-eval wrapper to prune"),
        ({"base": "no_such_wrapper"}, "base='no_such_wrapper'"),
        (
            {"base": "llava_hf", "method": "nope"},
            "unknown method 'nope'; known methods: cdpruner, dart, divprune",
        ),
        ({"base": "llava_hf", "keep": 4, "ratio": 0.5}, "exactly one of keep"),
        ({"base": "llava_hf", "keep": 4, "step": float("inf")}, "step must be finite"),
        ({"base": "llava_hf", "keep": 4, "crop_budget": "rows"}, "crop_budget must be one of"),
        (
            {"base": "llava_hf", "keep": 4, "estimater": "zo"},
            "unknown model_args estimater; zooprune takes base, method, keep, ratio, "
            "positions, estimator, num_directions",
        ),
    ],
)
def test_bad_model_args_are_refused_before_the_model_loads(args, message):
    with pytest.raises(EvaluationAborted, match=message) as error:
        create_pruned({"pretrained": "/no/model/here", **args})
    assert error.value.code.startswith("zooprune: ")


def test_model_args_are_read_as_lmms_eval_parses_them():
    # lmms-eval hands "None" over as a string and "-5" as the float -5.0.
    from lmms_eval.utils import simple_parse_args_string

    parsed = simple_parse_args_string("base=llava_hf,method=cdpruner,keep=-5,theta=None")
    with pytest.raises(EvaluationAborted, match=r"keep must be positive, got -5$"):
        create_pruned({"pretrained": "/no/model/here", **parsed})
    parsed = simple_parse_args_string("method=cdpruner,keep=4,theta=None,ratio=1.0")
    assert settings_from_model_args(parsed, "cdpruner") == {
        "method": "cdpruner",
        "keep": 4,
        "theta": None,
        "ratio": 1,
    }


@pytest.mark.parametrize(
    ("setting", "message"),
    [
        (
            {"crop_budget": "global"},
            "crop_budget is a layout option this model's family does not take",
        ),
        ({"positions": "sideways"}, "positions must be 'compact' or 'original'"),
        ({"method": "fastv", "layer": 9}, "layer=9 is past the 4 decoder layers"),
    ],
)
def test_what_the_family_refuses_is_refused_before_the_weights_load(tmp_path, setting, message):
    # Only the test bed's config is there: no weights a load could read.
    shutil.copy(bundled_path() / "config.json", tmp_path / "config.json")
    with pytest.raises(EvaluationAborted, match=message):
        create_pruned(
            {"base": "llava_hf", "pretrained": str(tmp_path), "device": "cpu", "keep": 4} | setting
        )
