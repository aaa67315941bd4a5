"""``zooprune report`` on lmms-eval result files written by hand: the numbers it prints are
the ones computed here by hand. Needs no lmms-eval."""

import json

import pytest

from zooprune.cli import main
from zooprune.integrations.lmms_eval.results import compare, read_run, result_files

ARGS = "pretrained=llava-hf/llava-1.5-7b-hf,device=cpu"


def results_file(folder, model, model_args, pope, mme, kept=None):
    """A results file as lmms-eval 0.7.3 writes it (the parts the report reads)."""
    data = {
        "results": {
            "pope": {
                "alias": "pope",
                "pope_accuracy,none": pope,
                "pope_accuracy_stderr,none": 0.01,
            },
            "mme": {
                "alias": "mme",
                "mme_cognition_score,none": mme / 4,
                "mme_perception_score,none": mme,
            },
        },
        "config": {"model": model, "model_args": model_args},
        "throughput": {"total_gen_tokens": 10, "avg_speed": 3.0},
    }
    if kept is not None:  # what the plugin logs: sums per task, averaged over 2 tasks
        images = 1000
        data["throughput"] |= {
            "avg_zooprune_images": images,
            "avg_zooprune_kept_tokens": kept * images,
            "avg_zooprune_visual_tokens": 576 * images,
            "avg_zooprune_select_seconds": 0.004 * images,
        }
    folder.mkdir(parents=True)
    path = folder / "20261130_120000_results.json"
    path.write_text(json.dumps(data))
    return path


@pytest.fixture
def runs(tmp_path):
    results_file(tmp_path / "base", "llava_hf", ARGS, pope=0.86, mme=1500.0)
    results_file(
        tmp_path / "zoo",
        "zooprune",
        f"base=llava_hf,{ARGS},method=zoo,keep=64",
        pope=0.84,
        mme=1425.0,
        kept=64,
    )
    results_file(
        tmp_path / "div",
        "zooprune",
        f"base=llava_hf,{ARGS},method=divprune,keep=64",
        pope=0.80,
        mme=1380.0,
        kept=64,
    )
    return tmp_path


def test_relative_accuracy_is_the_mean_over_tasks_of_score_over_unpruned(runs):
    ordered = compare([read_run(path) for path in result_files([runs])])
    assert [run.label for run in ordered] == ["unpruned", "divprune keep=64", "zoo keep=64"]
    zoo = ordered[2]
    # By hand: pope 0.84 / 0.86; mme by its first metric, cognition: (1425 / 4) / (1500 / 4).
    assert zoo.metrics == {"pope": "pope_accuracy", "mme": "mme_cognition_score"}
    assert zoo.relative["pope"] == pytest.approx(0.84 / 0.86)
    assert zoo.average_relative == pytest.approx((0.84 / 0.86 + 0.95) / 2)
    assert zoo.kept_tokens == 64 and zoo.kept_fraction == pytest.approx(64 / 576)
    assert zoo.select_ms == pytest.approx(4.0)
    chosen = compare([read_run(p, {"mme": "mme_perception_score"}) for p in result_files([runs])])
    assert chosen[1].relative["mme"] == pytest.approx(1380 / 1500)


def test_report_prints_and_writes_the_table(runs, tmp_path, capsys):
    out = tmp_path / "report"
    assert main(["report", str(runs), "--out", str(out)]) == 0
    text = capsys.readouterr().out
    # zoo: pope 97.7%, mme 95.0%, average 96.3% (by hand above)
    assert "0.84 (97.7%)" in text and "1425 (95.0%)" not in text  # mme's first metric: cognition
    assert "96.3%" in text and "64.0 / 576" in text and "4.00" in text
    markdown = (out / "report.md").read_text().splitlines()
    assert markdown[0].startswith("| condition | visual tokens kept |")
    assert any(line.startswith("| zoo keep=64 |") and "96.3%" in line for line in markdown)
    saved = json.loads((out / "report.json").read_text())
    assert [run["method"] for run in saved["runs"]] == ["unpruned", "divprune", "zoo"]
    assert (out / "report.png").read_bytes()[:4] == b"\x89PNG"


def test_report_refuses_what_it_cannot_compare(runs, tmp_path, capsys):
    assert main(["report", str(runs / "zoo")]) == 2
    assert "exactly one unpruned run" in capsys.readouterr().out
    assert main(["report", str(tmp_path / "nothing")]) == 2
    assert main(["report", str(runs), "--metric", "pope=no_such"]) == 2
    assert "no metric 'no_such'" in capsys.readouterr().out


def test_the_entry_point_module_is_light():
    # lmms-eval drops every plugin when one entry point fails to load: the module it names
    # adds neither torch nor transformers nor lmms-eval to what the interpreter had loaded
    # (until lmms-eval asks for the manifest).
    import subprocess
    import sys

    heavy = "{'torch', 'transformers', 'lmms_eval'}"
    code = f"import sys; before = {heavy} & set(sys.modules); "
    code += "import zooprune.integrations.lmms_eval as m; "
    code += f"print(sorted({heavy} & set(sys.modules) - before), m.MODEL_CLASS)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split("]")[0] == "["
    assert out.stdout.strip().endswith("zooprune.integrations.lmms_eval.model.ZoopruneModel")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[1, 2]", "is a JSON list, not an lmms-eval results object"),
        ('{"config": null, "results": {}}', "'config' is None, not an object"),
        ('{"config": {"model": "x"}, "results": {"pope": 3}}', "task 'pope': its results are 3"),
        ('{"config": {"model": "x"}, "results": {"po', "is not JSON"),
        ('{"conditions": [], "comparisons": []}', "no 'results' and 'config': not an lmms-eval"),
    ],
    ids=["list", "null config", "number result", "truncated", "bench's own file"],
)
def test_report_refuses_a_malformed_file_naming_it(tmp_path, capsys, text, message):
    path = tmp_path / "broken_results.json"
    path.write_text(text)
    with pytest.raises(ValueError, match=message) as error:
        read_run(path)
    assert str(error.value).startswith(f"{path}: ")
    assert main(["report", str(path)]) == 2
    assert str(path) in capsys.readouterr().out


def test_runs_over_other_tasks_are_averaged_over_the_tasks_they_share(runs, capsys):
    # a pruned run that scored pope only, and one without the plugin's record
    path = results_file(
        runs / "grid", "zooprune", f"base=llava_hf,{ARGS},method=grid,keep=64", pope=0.7, mme=1
    )
    data = json.loads(path.read_text())
    del data["results"]["mme"]
    path.write_text(json.dumps(data))
    ordered = compare([read_run(p) for p in result_files([runs])])
    for run in ordered:
        assert run.averaged_over == ["pope"]
        assert run.average_relative == pytest.approx(run.scores["pope"] / 0.86)
    assert main(["report", str(runs), "--out", str(runs / "out")]) == 0
    out = capsys.readouterr().out
    assert "avg relative over the 1 task every run has (pope); left out: mme" in out
    grid = next(line for line in out.splitlines() if "grid keep=64" in line)
    assert "no record" in grid and "all" not in grid


def test_a_metric_for_a_task_no_run_has_is_refused(runs, capsys):
    assert main(["report", str(runs), "--metric", "gqa=exact_match"]) == 2
    assert "--metric gqa: no run has task 'gqa'; they have mme, pope" in capsys.readouterr().out
