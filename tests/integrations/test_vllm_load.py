"""``zooprune load``'s short slice, as CI runs it: a mix of every kind of request against
``zooprune serve`` on the tiny Qwen3-VL loses nothing, refuses exactly the bad requests
(zooprune's with its message), keeps the server healthy and its engine the same, and
answers a sample as the offline engine does."""

from zooprune.cli import main
from zooprune.integrations.vllm.load import KINDS, LoadConfig, run_load


def test_a_short_load_and_fault_run_passes_every_check(tmp_path):
    config = LoadConfig(
        requests=64, rounds=2, concurrency=16, sample=8, cache=str(tmp_path / "model")
    )
    result = run_load(config, tmp_path / "run", echo=lambda _: None)
    assert result["wrong"] == {name: [] for name in result["wrong"]}
    assert result["health"].keys() == {"200"}
    assert result["server alive at the end"] and result["engine processes unchanged"]
    assert result["sampled"] == 8
    assert result["sampled answers differing from the offline engine"] == []
    assert result["passed"]
    # every kind was sent, and every request answered or refused
    counts = result["by kind and status"]
    assert {name.split(" -> ")[0].split(":")[0] for name in counts} == set(KINDS)
    assert sum(counts.values()) == 128
    assert {name.split(" -> ")[1] for name in counts} == {"200", "400"}
    assert (tmp_path / "run" / "load.json").is_file()


def test_the_command_refuses_a_model_folder_without_a_config(tmp_path, capsys):
    assert main(["load", "--model", str(tmp_path), "--out", str(tmp_path / "run")]) == 2
    assert "config.json" in capsys.readouterr().out
