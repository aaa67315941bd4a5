import argparse
import importlib.util
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from zooprune import METHODS
from zooprune.cli import main
from zooprune.cli.common import FAMILIES, fraction, fractions, method_specs


def refused(argv, capsys) -> str:
    """What argparse says when it refuses ``argv`` (exit status 2)."""
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 2
    return capsys.readouterr().err


def test_version_is_the_packages(capsys):
    import importlib.metadata

    import zooprune

    with pytest.raises(SystemExit) as done:
        main(["--version"])
    assert done.value.code == 0
    assert capsys.readouterr().out == f"zooprune {zooprune.__version__}\n"
    # the installed distribution's version is read from the same place
    assert importlib.metadata.version("zooprune") == zooprune.__version__


def test_methods_lists_every_method(capsys):
    from zooprune import METHODS

    assert main(["methods"]) == 0
    out = capsys.readouterr().out
    assert all(name in out for name in METHODS)


def test_run_answers_on_a_tiny_model_saved_to_disk(tmp_path, capsys):
    assert main(["tiny", str(tmp_path / "model")]) == 0
    image = tmp_path / "scene.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (50, 70, 3), dtype=np.uint8)).save(
        image
    )
    code = main(
        [
            "run",
            "--model",
            str(tmp_path / "model"),
            "--image",
            str(image),
            "--prompt",
            "what is in the image ?",
            "--method",
            "divprune",
            "--keep",
            "9",
            "--max-new-tokens",
            "3",
            "--show",
            str(tmp_path / "kept.png"),
        ]
    )
    out = capsys.readouterr().out
    assert code == 0
    assert "answer:" in out and "9 / 64" in out
    for column in ("vision encode", "selection", "prefill", "decode"):
        assert column in out
    assert (tmp_path / "kept.png").read_bytes()[:4] == b"\x89PNG"


def test_run_reports_bad_input(tmp_path, capsys):
    main(["tiny", str(tmp_path / "model")])
    image = tmp_path / "scene.png"
    Image.new("RGB", (40, 40)).save(image)
    base = ["run", "--model", str(tmp_path / "model"), "--image", str(image), "--prompt", "hi"]
    # written out: registering or dropping a method by accident shows here
    known = (
        "known methods: cdpruner, dart, divprune, fastv, grid, holitom, mmtok, pdrop, pool, "
        "random, sensitivity, sparsevlm, visionzip, vispruner, zoo, zoo-sum\n"
    )
    assert known in refused([*base, "--method", "nope"], capsys)
    assert main([*base[:4], str(tmp_path / "missing.png"), *base[5:]]) == 2
    assert "no such image" in capsys.readouterr().out


def test_run_with_an_in_lm_method(tmp_path, capsys):
    main(["tiny", str(tmp_path / "model")])
    image = tmp_path / "scene.png"
    Image.new("RGB", (40, 40), "red").save(image)
    base = ["run", "--model", str(tmp_path / "model"), "--image", str(image), "--prompt", "hi"]
    capsys.readouterr()
    assert main([*base, "--method", "fastv", "--keep", "9", "--max-new-tokens", "2"]) == 0
    out = capsys.readouterr().out
    # fastv ranks during the prefill: its selection time is reported as part of it
    assert "9 / 64" in out and "ms (in prefill)" in out
    assert main([*base, "--method", "fastv", "--positions", "compact"]) == 2
    assert "positions='compact' does not apply" in capsys.readouterr().out


def save_tiny_llava_on_mistral(path) -> str:
    """The tiny LLaVA with a Mistral language model: its 4096-token sliding window is
    longer than any prompt here, so every method runs, but fastv (no sliding layers)."""
    from transformers import LlavaForConditionalGeneration, MistralConfig

    from zooprune.tiny import tiny_llava_config, tiny_llava_processor

    processor = tiny_llava_processor()
    config = tiny_llava_config(vocab_size=len(processor.tokenizer))
    llama = config.text_config
    fields = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers")
    fields += ("num_attention_heads", "num_key_value_heads", "pad_token_id", "bos_token_id")
    config.text_config = MistralConfig(
        **{name: getattr(llama, name) for name in (*fields, "eos_token_id")}, sliding_window=4096
    )
    model = LlavaForConditionalGeneration(config).eval()
    model.generation_config.pad_token_id = 0
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return str(path)


def test_bench_runs_by_default_the_methods_the_model_can(tmp_path, capsys):
    import json

    model = save_tiny_llava_on_mistral(tmp_path / "model")
    Image.new("RGB", (48, 48), "red").save(tmp_path / "0.png")
    (tmp_path / "data.jsonl").write_text(
        json.dumps({"image": "0.png", "question": "what ?", "answer": "red"})
    )
    args = ["bench", "--model", model, "--data", str(tmp_path / "data.jsonl")]
    out_dir = tmp_path / "bench"
    assert main([*args, "--ratios", "1/4", "--out", str(out_dir)]) == 0
    skipped = "skipped fastv, holitom, pdrop, sparsevlm: this model cannot run them"
    assert skipped in capsys.readouterr().out
    summary = json.loads((out_dir / "accuracy.json").read_text())
    ran = [c["method"] for c in summary["conditions"]]
    skips = {"fastv", "holitom", "pdrop", "sparsevlm"}
    assert ran == ["unpruned", *sorted(set(METHODS) - skips)]
    # asked for by name, it is refused with the reason
    assert main([*args, "--methods", "fastv", "--out", str(tmp_path / "other")]) == 2
    assert "its language model has sliding_attention layers" in capsys.readouterr().out
    assert main([*args, "--methods", "holitom", "--out", str(tmp_path / "other")]) == 2
    assert "prunes videos only; the bench's questions are images" in capsys.readouterr().out


def test_cli_families_match_the_generator():
    from zooprune.testbed import scenes

    assert scenes.FAMILIES == FAMILIES


def test_fraction_arguments():
    assert fractions("1/3, 22%,0.11") == (1 / 3, 0.22, 0.11)
    with pytest.raises(argparse.ArgumentTypeError, match="not a fraction"):
        fraction("1/0")
    with pytest.raises(argparse.ArgumentTypeError, match=r"must lie in \(0, 1\)"):
        fraction("1.5")


def test_method_variant_arguments():
    assert method_specs("zoo,zoo[estimator=zo,num_directions=16,step=1e-4],divprune") == [
        "zoo",
        ("zoo", {"estimator": "zo", "num_directions": 16, "step": 1e-4}),
        "divprune",
    ]
    for text, message in [
        ("zoo[estimator=zo", "unbalanced"),
        ("zoo]", "unbalanced"),
        ("zoo[[a=1]]", "unbalanced"),
        ("zoo[]", "NAME\\[OPTION=VALUE"),
        ("zoo[estimator]", "NAME=VALUE"),
        ("nope[step=1]", "unknown method 'nope'"),
        # the bench sets the method, the budget and the positions itself
        ("zoo[ratio=0.5]", "'ratio' is not an option of a method variant"),
        ("zoo[keep=4]", "'keep' is not an option of a method variant"),
        ("zoo[method=grid]", "'method' is not an option of a method variant"),
        ("divprune[positions=compact]", "'positions' is not an option of a method variant"),
        (",", "no method named in ','"),
        ("", "no method named in ''"),
    ]:
        with pytest.raises(argparse.ArgumentTypeError, match=message):
            method_specs(text)


def test_shared_options_are_declared_once_and_alike():
    from zooprune.cli import build_parser

    parser = build_parser()
    commands = parser._subparsers._group_actions[0].choices
    dtypes = {
        name: action.choices
        for name, command in commands.items()
        for action in command._actions
        if action.dest == "dtype"
    }
    assert set(dtypes) == {"run", "bench", "speed"}
    assert len({tuple(choices) for choices in dtypes.values()}) == 1
    threads = [n for n, c in commands.items() if any(a.dest == "threads" for a in c._actions)]
    assert set(threads) == {"run", "speed", "speed-kernels", "bench", "demo"}


def test_tables_keep_their_width_when_piped():
    # Piped, rich would squeeze a table into 80 columns and cut its cells ("scori…").
    out = subprocess.run(
        [sys.executable, "-m", "zooprune.cli", "methods"], capture_output=True, text=True
    ).stdout
    from zooprune import METHODS

    assert "…" not in out
    for name, spec in METHODS.items():
        options = ", ".join(f"{k}={v!r}" for k, v in spec.options.items())
        assert spec.summary in out and options in out, name


def test_bench_on_a_jsonl_file_with_any_model(tmp_path, capsys):
    import json

    assert main(["tiny", str(tmp_path / "model")]) == 0
    rng = np.random.default_rng(0)
    lines = []
    for i in range(3):
        Image.fromarray(rng.integers(0, 255, (48, 48, 3), dtype=np.uint8)).save(
            tmp_path / f"{i}.png"
        )
        lines.append(json.dumps({"image": f"{i}.png", "question": "what ?", "answer": "red"}))
    (tmp_path / "data.jsonl").write_text("\n".join(lines))
    args = ["bench", "--model", str(tmp_path / "model"), "--data", str(tmp_path / "data.jsonl")]
    out_dir = tmp_path / "bench"
    code = main([*args, "--methods", "zoo,grid", "--ratios", "1/4", "--out", str(out_dir)])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "all (n=3)" in out and "zoo" in out and "grid" in out and "25.0% (16)" in out
    summary = json.loads((out_dir / "accuracy.json").read_text())
    assert [c["method"] for c in summary["conditions"]] == ["unpruned", "zoo", "grid"]
    assert (out_dir / "accuracy.png").read_bytes()[:4] == b"\x89PNG"
    # Bad requests fail with a message, not a traceback.
    assert "unknown method 'nope'" in refused([*args, "--methods", "zoo,nope"], capsys)
    assert main(["bench", "--data", str(tmp_path / "data.jsonl")]) == 2
    assert "--data needs --model" in capsys.readouterr().out
    assert "(0, 1)" in refused([*args, "--ratios", "1.5"], capsys)


def test_bench_match_flops_runs_fastv_at_the_pre_llm_compute(tmp_path, capsys):
    import json

    assert main(["tiny", str(tmp_path / "model")]) == 0
    Image.new("RGB", (48, 48), "red").save(tmp_path / "0.png")
    (tmp_path / "data.jsonl").write_text(
        json.dumps({"image": "0.png", "question": "what ?", "answer": "red"})
    )
    out_dir = tmp_path / "bench"
    args = ["bench", "--model", str(tmp_path / "model"), "--data", str(tmp_path / "data.jsonl")]
    code = main(
        [*args, "--methods", "fastv[layer=1],grid", "--ratios", "3/4,1/64", "--match", "flops"]
        + ["--out", str(out_dir)]
    )
    out = capsys.readouterr().out
    assert code == 0, out
    assert "LM prefill FLOPs, % of unpruned" in out
    # 1 of 64 tokens: layer 0 of 2 on all 64 already costs more than the pre-LLM prefill
    assert "fastv[layer=1] (equal FLOPs) at 1.6%: no budget matches" in out
    conditions = json.loads((out_dir / "accuracy.json").read_text())["conditions"]
    matched = next(c for c in conditions if c["method"] == "fastv[layer=1] (equal FLOPs)")
    grid = next(c for c in conditions if c["method"] == "grid" and c["ratio"] == 0.75)
    assert matched["kept_mean"] < grid["kept_mean"] and matched["lm_flops"] <= grid["lm_flops"]


def test_testbed_train_command_runs_and_resumes(tmp_path, capsys, monkeypatch):
    import functools

    from tests.testbed.test_model import TINY_TRAIN
    from zooprune.testbed import train

    tiny = functools.partial(
        train.TrainConfig,
        **{f: getattr(TINY_TRAIN, f) for f in ("scene", "families", "model", "batch", "warmup")},
        vision_steps=2,
        vision_batch=2,
        joint_steps=3,
        eval_every=2,
        eval_n_per_family=1,
        checkpoint_every=1,
    )
    monkeypatch.setattr(train, "TrainConfig", tiny)
    out = tmp_path / "run"
    assert main(["testbed", "train", "--out", str(out), "--threads", "1"]) == 0
    text = capsys.readouterr().out
    assert "validation" in text and "curve.png" in text
    assert "share of their mean" in text and "projector moved" in text
    assert (out / "model" / "config.json").is_file() and (out / "curve.png").is_file()
    # A second call resumes at the end and only saves again.
    assert main(["testbed", "train", "--out", str(out), "--threads", "1"]) == 0
    assert "saved" in capsys.readouterr().out


def test_demo_answers_and_draws(tmp_path, capsys):
    out = tmp_path / "demo.png"
    assert main(["demo", "--out", str(out), "--threads", "1"]) == 0
    text = capsys.readouterr().out
    assert "question:" in text and "unpruned" in text and "zoo" in text and "divprune" in text
    assert "28 / 256" in text and "256 / 256" in text
    assert out.read_bytes()[:4] == b"\x89PNG"
    assert "known methods" in refused(["demo", "--method", "nope"], capsys)
    assert "(0, 1)" in refused(["demo", "--ratio", "2"], capsys)


def test_bench_quick_on_the_bundled_test_bed(tmp_path, capsys):
    import json

    # Five methods, not every one: each method is a third of a minute of CI here, and the
    # default set (every method the model runs) is test_bench_runs_by_default_...'s.
    runs = {"zoo", "divprune", "cdpruner", "dart", "fastv"}
    out_dir = tmp_path / "bench"
    methods = ",".join(sorted(runs))
    args = ["bench", "--quick", "--methods", methods, "--ratios", "1/3,1/18"]
    assert main([*args, "--out", str(out_dir)]) == 0
    text = capsys.readouterr().out
    assert f"overall (n={12 * len(FAMILIES)})" in text
    for family in FAMILIES:
        assert f"{family} (n=12)" in text
    assert "paired differences on the same questions" in text
    for pair in ("zoo - divprune", "zoo - fastv", "divprune - cdpruner", "divprune - dart"):
        assert pair in text
    summary = json.loads((out_dir / "accuracy.json").read_text())
    pairs = {(c["a"], c["b"]) for c in summary["comparisons"]}
    others = runs - {"zoo", "divprune"}
    assert pairs == {("zoo", "divprune")} | {(a, b) for a in ("zoo", "divprune") for b in others}
    methods = {c["method"] for c in summary["conditions"]}
    assert methods == {"unpruned", *runs}
    assert len(summary["conditions"]) == 1 + 2 * len(runs)
    assert {c["kept_mean"] for c in summary["conditions"][1:]} == {85, 14}


def test_bench_families_option(tmp_path, capsys):
    args = ["bench", "--methods", "random", "--ratios", "1/9", "--n-per-family", "3"]
    assert main([*args, "--families", "glyph,count", "--out", str(tmp_path / "b")]) == 0
    text = capsys.readouterr().out
    assert "glyph (n=3)" in text and "count (n=3)" in text and "color (n=" not in text
    assert "unknown families ['colour']" in refused(
        [*args, "--families", "colour", "--out", str(tmp_path / "c")], capsys
    )


def test_bench_method_variants(tmp_path, capsys):
    import json

    args = ["bench", "--ratios", "1/9", "--n-per-family", "2", "--families", "color"]
    variants = "zoo,zoo[estimator=zo,num_directions=8]"
    assert main([*args, "--methods", variants, "--out", str(tmp_path / "b")]) == 0
    text = capsys.readouterr().out
    assert "zoo[estimator=zo,num_directions=8]" in text
    assert "zoo - zoo[estimator=zo,num_directions=8]" in text
    summary = json.loads((tmp_path / "b" / "accuracy.json").read_text())
    assert [c["method"] for c in summary["conditions"]] == [
        "unpruned",
        "zoo",
        "zoo[estimator=zo,num_directions=8]",
    ]
    # A variant the method cannot take is refused by name, before anything runs.
    bad = [*args, "--methods", "zoo[num_directions=0]", "--out", str(tmp_path / "c")]
    assert main(bad) == 2
    message = capsys.readouterr().out
    assert "num_directions" in message and not (tmp_path / "c").exists()


def test_serve_builds_the_vllm_command_and_refuses_bad_settings_before_it(tmp_path, capsys):
    import json
    import shlex

    main(["tiny", str(tmp_path / "model")])
    capsys.readouterr()
    base = ["serve", str(tmp_path / "model"), "--print-command"]
    assert main([*base, "--method", "divprune", "--keep", "9", "--", "--port", "8001"]) == 0
    command = shlex.split(capsys.readouterr().out.strip())
    assert command[1:3] == ["-m", "vllm.entrypoints.openai.api_server"]
    assert command[-2:] == ["--port", "8001"]  # what follows -- reaches vLLM unchanged
    overrides = json.loads(command[command.index("--hf-overrides") + 1])
    assert overrides["architectures"] == ["ZoopruneLlavaForConditionalGeneration"]
    assert overrides["zooprune"] == {"method": "divprune", "keep": 9, "ratio": None}
    # keep 64 by default; method options reach the settings with their types
    assert main([*base, "--option", "estimator=jvp"]) == 0
    command = shlex.split(capsys.readouterr().out.strip())
    settings = json.loads(command[command.index("--hf-overrides") + 1])["zooprune"]
    assert settings == {"method": "zoo", "keep": 64, "ratio": None, "estimator": "jvp"}
    assert "--trust-request-mm-kwargs" not in command
    # requests' own settings: vLLM takes a request's processor kwargs only with its flag
    assert main([*base, "--per-request-settings"]) == 0
    assert "--trust-request-mm-kwargs" in shlex.split(capsys.readouterr().out.strip())

    assert main([*base, "--keep", "0"]) == 2
    assert "keep" in capsys.readouterr().out
    assert main([*base, "--option", "estimator=nope"]) == 2
    assert "estimator" in capsys.readouterr().out
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "config.json").write_text('{"architectures": ["GPT2LMHeadModel"]}')
    assert main(["serve", str(tmp_path / "other")]) == 2
    assert "LlavaForConditionalGeneration" in capsys.readouterr().out
    # other commands take nothing after --
    assert "takes no arguments after --" in refused(["methods", "--", "--port", "1"], capsys)


@pytest.mark.skipif(importlib.util.find_spec("vllm") is not None, reason="vLLM is installed")
def test_serve_without_vllm_says_how_to_get_it(tmp_path, capsys):
    main(["tiny", str(tmp_path / "model")])
    assert main(["serve", str(tmp_path / "model")]) == 2
    assert "make vllm-install" in capsys.readouterr().out


def test_speed_refuses_what_its_engine_cannot_do(capsys):
    assert main(["speed", "--option", "estimator=jvp"]) == 2
    assert "--option applies to --engine vllm, or to a method inside" in capsys.readouterr().out
    # before any model is built or vLLM is looked for
    assert main(["speed", "--method", "fastv", "--engine", "vllm"]) == 2
    assert "chooses tokens inside the language model" in capsys.readouterr().out
    assert main(["speed", "--method", "pdrop", "--option", "stages=0"]) == 2
    assert "stages must be an int >= 1" in capsys.readouterr().out
    assert main(["speed", "--videos"]) == 2
    assert "--videos applies to --engine vllm" in capsys.readouterr().out
    assert main(["speed", "--concurrency", "8"]) == 2
    assert "--concurrency applies to --engine vllm" in capsys.readouterr().out
    if importlib.util.find_spec("vllm") is None:
        assert main(["speed", "--engine", "vllm"]) == 2
        assert "make vllm-install" in capsys.readouterr().out
        assert main(["speed", "--engine", "vllm", "--videos"]) == 2
        assert "make vllm-install" in capsys.readouterr().out


def test_testbed_task_refuses_what_would_write_a_wrong_task(tmp_path, capsys):
    out = str(tmp_path / "task")
    for flag, value in (
        ("--n-per-family", "0"),
        ("--n-per-family", "-3"),
        ("--max-new-tokens", "0"),
    ):
        assert "expected at least 1" in refused(["testbed", "task", out, flag, value], capsys)
    from zooprune.testbed.scenes import FAMILIES

    twice = f"{FAMILIES[0]},{FAMILIES[1]},{FAMILIES[0]}"
    message = refused(["testbed", "task", out, "--families", twice], capsys)
    assert f"{FAMILIES[0]!r} named twice" in message
    assert not (tmp_path / "task").exists()
    # an OUT that is a file: refused naming it, the file untouched
    (tmp_path / "file").write_text("mine")
    assert main(["testbed", "task", str(tmp_path / "file"), "--n-per-family", "1"]) == 2
    assert "is a file" in capsys.readouterr().out
    assert (tmp_path / "file").read_text() == "mine"
    # and a good one writes what it says it wrote
    assert main(["testbed", "task", out, "--n-per-family", "2", "--families", FAMILIES[0]]) == 0
    assert "wrote 2 questions" in capsys.readouterr().out
