import json

import numpy as np
import pytest
import torch
from PIL import Image

from zooprune.bench import accuracy
from zooprune.bench.accuracy import (
    Item,
    bootstrap_interval,
    is_correct,
    jsonl_items,
    normalize,
    paired_difference,
    run_accuracy,
    summarize,
)


def test_normalize_and_match():
    assert normalize("  The Red, circle! ") == "red circle"
    assert is_correct("Yes, there is.", "yes")
    assert is_correct("two", "Two")
    assert not is_correct("yesterday", "yes")
    assert not is_correct("no", "yes")
    assert not is_correct("", "yes")
    assert is_correct("top left corner", "top left")


def test_bootstrap_matches_the_normal_approximation():
    # 400 fair coin flips: the 95% interval is about mean +- 1.96 * sqrt(p(1-p)/n).
    correct = np.arange(400) % 2 == 0
    low, high = bootstrap_interval({"f": correct}, reps=4000, seed=1)
    half = 1.96 * np.sqrt(0.25 / 400)
    assert low == pytest.approx(0.5 - half, abs=0.008)
    assert high == pytest.approx(0.5 + half, abs=0.008)
    assert bootstrap_interval({"f": np.ones(50, bool)}) == (1.0, 1.0)


def test_bootstrap_overall_is_the_mean_over_families():
    # One family always right, one always wrong: the macro mean is exactly 0.5 every time.
    low, high = bootstrap_interval({"a": np.ones(30, bool), "b": np.zeros(10, bool)})
    assert low == high == 0.5


def test_paired_difference_sees_only_disagreements():
    rng = np.random.default_rng(0)
    base = rng.random(200) < 0.6
    same = paired_difference({"f": base}, {"f": base.copy()})
    assert same == {"difference": 0.0, "low": 0.0, "high": 0.0}
    better = base.copy()
    better[np.flatnonzero(~base)[:20]] = True  # 20 more right answers out of 200
    diff = paired_difference({"f": better}, {"f": base}, reps=4000)
    assert diff["difference"] == pytest.approx(0.1)
    # Only 20 discordant questions, all in one direction: the interval stays above zero.
    assert 0 < diff["low"] < 0.1 < diff["high"]


def test_summarize_relative_and_comparisons():
    families = ["a"] * 4 + ["b"] * 4
    rows = [
        {"method": "unpruned", "ratio": None, "correct": [1, 1, 1, 1, 1, 1, 0, 0]},
        {"method": "zoo", "ratio": 0.5, "correct": [1, 1, 1, 0, 1, 0, 0, 0]},
        {"method": "divprune", "ratio": 0.5, "correct": [1, 0, 0, 0, 1, 0, 0, 0]},
        {"method": "dart", "ratio": 0.5, "correct": [0, 0, 0, 0, 1, 1, 1, 1]},
    ]
    summary = summarize(rows, families, reps=200)
    base, zoo, div, _ = summary["conditions"]
    assert base["overall"]["accuracy"] == pytest.approx(0.75)
    assert zoo["families"]["a"]["accuracy"] == 0.75
    assert zoo["families"]["a"]["relative"] == pytest.approx(0.75)
    assert zoo["families"]["b"]["relative"] == pytest.approx(0.25 / 0.5)
    assert zoo["overall"]["relative"] == pytest.approx(0.5 / 0.75)
    # zoo against each other method, then divprune against those not yet compared.
    pairs = [(c["a"], c["b"]) for c in summary["comparisons"]]
    assert pairs == [("zoo", "divprune"), ("zoo", "dart"), ("divprune", "dart")]
    differences = [c["difference"] for c in summary["comparisons"]]
    # family a / b: zoo 0.75 / 0.25, divprune 0.25 / 0.25, dart 0 / 1 (mean over families)
    assert differences == pytest.approx([0.25, 0.0, -0.25])
    with pytest.raises(ValueError, match="unpruned"):
        summarize(rows[1:], families)


def test_jsonl_items_resolve_paths_and_report_errors(tmp_path):
    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    good = tmp_path / "data.jsonl"
    good.write_text(
        json.dumps({"image": "a.png", "question": "q ?", "answer": "yes", "family": "f"})
        + "\n\n"
        + json.dumps({"image": str(tmp_path / "a.png"), "question": "r ?", "answer": 2})
        + "\n"
    )
    first, second = jsonl_items(good)
    assert first.image == str(tmp_path / "a.png") and first.family == "f"
    assert second.answer == "2" and second.family == "all"
    assert first.pil().size == (8, 8)
    for text, message in [
        ('{"image": "a.png", "question": "q"}', "missing answer"),
        ('{"image": "b.png", "question": "q", "answer": "x"}', "no image file"),
        ("not json", "not JSON"),
        ("", "no questions"),
    ]:
        bad = tmp_path / "bad.jsonl"
        bad.write_text(text)
        with pytest.raises(ValueError, match=message):
            jsonl_items(bad)


@pytest.fixture
def items(images):
    return [
        Item(image, f"what is {word} ?", word, family)
        for image, word, family in zip(
            images, ["a", "b", "c", "d"], ["x", "x", "y", "y"], strict=True
        )
    ]


def test_run_accuracy_scores_what_generate_says_and_resumes(
    model, processor, items, tmp_path, monkeypatch
):
    # Reference: plain greedy generate on each question alone, no harness.
    expected = []
    for item in items:
        inputs = processor(
            images=[item.pil()], text=[f"<s> <image> {item.question}"], return_tensors="pt"
        )
        with torch.no_grad():
            out = model.generate(**inputs, max_new_tokens=2, do_sample=False)
        new = out[:, inputs["input_ids"].shape[1] :]
        expected.append(processor.batch_decode(new, skip_special_tokens=True)[0])
    # Answers equal to what the model says: every unpruned answer with words is correct.
    items = [
        Item(it.image, it.question, e, it.family) for it, e in zip(items, expected, strict=True)
    ]
    settings = dict(batch_size=3, max_new_tokens=2, reps=100)
    summary = run_accuracy(model, processor, items, tmp_path, ["random", "zoo"], [0.25], **settings)
    rows = [json.loads(line) for line in (tmp_path / "results.jsonl").read_text().splitlines()]
    assert [r["key"] for r in rows] == ["unpruned", "random@0.250000", "zoo@0.250000"]
    assert rows[0]["predictions"] == expected
    assert rows[0]["correct"] == [bool(normalize(e)) for e in expected]
    assert rows[1]["kept_mean"] == int(0.25 * 64)
    assert (tmp_path / "accuracy.csv").read_text().startswith("method,ratio")

    # A second run finds every condition done and generates nothing.
    calls = []
    real = accuracy._answer

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(accuracy, "_answer", counting)
    again = run_accuracy(model, processor, items, tmp_path, ["random", "zoo"], [0.25], **settings)
    assert calls == []
    assert again["conditions"] == summary["conditions"]
    # A new budget runs only the new conditions (2 methods x 2 batches).
    run_accuracy(model, processor, items, tmp_path, ["random", "zoo"], [0.25, 0.5], **settings)
    assert len(calls) == 4


def test_run_accuracy_benches_method_variants_side_by_side(model, processor, items, tmp_path):

    variant = ("zoo", {"estimator": "zo", "num_directions": 4, "step": 1.0})
    summary = run_accuracy(
        model, processor, items, tmp_path, ["zoo", variant], [0.25], batch_size=4, reps=50
    )
    labels = [c["method"] for c in summary["conditions"]]
    assert labels == ["unpruned", "zoo", "zoo[estimator=zo,num_directions=4,step=1.0]"]
    # The variant is compared with plain zoo, question by question.
    assert [(c["a"], c["b"]) for c in summary["comparisons"]] == [(labels[1], labels[2])]
    # Each condition hands its own options (and the bench seed) to the engine.
    asked = []
    answer = accuracy.hf_answerer(model, processor, None, 1)

    def recording(batch, method, ratio, options):
        asked.append((method, options))
        return answer(batch, method, ratio, options)

    run_accuracy(
        model, processor, items, tmp_path / "again", ["zoo", variant], [0.25], answerer=recording
    )
    assert asked == [
        (None, {}),
        ("zoo", {"seed": 0}),
        ("zoo", {"seed": 0, "estimator": "zo", "num_directions": 4, "step": 1.0}),
    ]


def test_run_accuracy_rejects_bad_requests(model, processor, items, tmp_path):
    import zooprune

    with pytest.raises(zooprune.UnknownMethodError, match="known"):
        run_accuracy(model, processor, items, tmp_path, ["nope"], [0.5])
    with pytest.raises(ValueError, match=r"\(0, 1\)"):
        run_accuracy(model, processor, items, tmp_path, ["zoo"], [1.5])
    # A bad variant fails before the unpruned pass runs (nothing written).
    with pytest.raises(zooprune.PruneError, match="num_directions"):
        run_accuracy(model, processor, items, tmp_path / "v", [("zoo", {"num_directions": 0})])
    with pytest.raises(zooprune.PruneError, match="no option 'nope'"):
        run_accuracy(model, processor, items, tmp_path / "v", [("zoo", {"nope": 1})])
    assert not (tmp_path / "v" / "results.jsonl").exists()


def test_plot_accuracy_writes_a_png(tmp_path):
    families = ["a", "a", "b", "b"]
    rows = [{"method": "unpruned", "ratio": None, "correct": [1, 1, 1, 0]}] + [
        {"method": m, "ratio": r, "correct": [1, 0, 1, 0]}
        for m in ("zoo", "random")
        for r in (0.25, 0.5)
    ]
    summary = summarize(rows, families, reps=50)
    from zooprune.viz import plot_accuracy

    path = plot_accuracy(summary, tmp_path / "acc.png")
    assert path.read_bytes()[:4] == b"\x89PNG"
