import json
import time

import numpy as np
import pytest
import torch
from PIL import Image

from zooprune.bench import accuracy
from zooprune.bench.accuracy import (
    Item,
    bootstrap_interval,
    condition_stats,
    is_correct,
    jsonl_items,
    method_label,
    method_parts,
    normalize,
    paired_difference,
    prompt_for,
    run_accuracy,
    summarize,
)
from zooprune.testbed import scenes


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


def exact_bootstrap(values_by_family: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """The bootstrap distribution of the mean over families of each family's resampled mean,
    computed exactly instead of sampled: a family of n questions whose values are drawn n
    times with replacement has a sum distributed as the n-fold convolution of its values'
    empirical distribution; the families are independent, so their sums convolve too.
    Values are integers here (1/0 per question, or -1/0/+1 for a paired difference).

    Returns the support of the overall mean and its probabilities.
    """
    support, probability = np.zeros(1), np.ones(1)
    for values in values_by_family.values():
        n = len(values)
        low = int(values.min())
        one = np.bincount(values.astype(int) - low) / n  # one draw, shifted to start at 0
        draws = np.ones(1)
        for _ in range(n):
            draws = np.convolve(draws, one)
        means = (np.arange(len(draws)) + low * n) / n  # the family's resampled mean
        support = (support[:, None] + means[None, :]).ravel()
        probability = (probability[:, None] * draws[None, :]).ravel()
        order = np.argsort(support, kind="stable")
        support, probability = support[order], probability[order]
        support, inverse = np.unique(np.round(support, 12), return_inverse=True)
        probability = np.bincount(inverse, weights=probability)
    return support / len(values_by_family), probability


def exact_percentile(support: np.ndarray, probability: np.ndarray, q: float) -> float:
    return float(support[np.searchsorted(np.cumsum(probability), q / 100)])


def seven_families(seed: int) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Two conditions answering seven families of 6 to 12 questions, about 60% right."""
    rng = np.random.default_rng(seed)
    a, b = {}, {}
    for f, n in enumerate([6, 9, 12, 8, 10, 7, 11]):
        b[f"family{f}"] = rng.random(n) < 0.6
        a[f"family{f}"] = np.where(rng.random(n) < 0.25, ~b[f"family{f}"], b[f"family{f}"])
    return a, b


def test_paired_difference_over_families_matches_the_exact_bootstrap():
    a, b = seven_families(3)
    deltas = {f: a[f].astype(int) - b[f].astype(int) for f in a}
    expected = np.mean([a[f].mean() - b[f].mean() for f in a])  # the macro mean difference
    diff = paired_difference(a, b, reps=4000, seed=1)
    assert diff["difference"] == pytest.approx(expected, abs=1e-12)
    support, probability = exact_bootstrap(deltas)
    assert float(support @ probability) == pytest.approx(expected, abs=1e-9)
    spread = float(np.sqrt(((support - expected) ** 2) @ probability))
    assert diff["low"] == pytest.approx(
        exact_percentile(support, probability, 2.5), abs=0.1 * spread
    )
    assert diff["high"] == pytest.approx(
        exact_percentile(support, probability, 97.5), abs=0.1 * spread
    )
    assert diff["low"] < diff["difference"] < diff["high"]


def test_bootstrap_interval_over_families_matches_the_exact_bootstrap():
    _, b = seven_families(4)
    low, high = bootstrap_interval(b, reps=4000, seed=1)
    support, probability = exact_bootstrap({f: v.astype(int) for f, v in b.items()})
    mean = np.mean([v.mean() for v in b.values()])
    spread = float(np.sqrt(((support - mean) ** 2) @ probability))
    assert low == pytest.approx(exact_percentile(support, probability, 2.5), abs=0.1 * spread)
    assert high == pytest.approx(exact_percentile(support, probability, 97.5), abs=0.1 * spread)
    assert low < mean < high


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
    assert [c["ratio"] for c in summary["comparisons"]] == [0.5] * 3
    differences = [c["difference"] for c in summary["comparisons"]]
    # family a / b: zoo 0.75 / 0.25, divprune 0.25 / 0.25, dart 0 / 1 (mean over families)
    assert differences == pytest.approx([0.25, 0.0, -0.25])
    with pytest.raises(ValueError, match="unpruned"):
        summarize(rows[1:], families)


class ChatProcessor:
    """A processor with a chat template: records what it was asked to render."""

    chat_template = "{{ messages }}"
    image_token = "<img>"

    def __init__(self):
        self.calls = []

    def apply_chat_template(self, messages, **options):
        self.calls.append((messages, options))
        return "rendered"


def test_prompt_for_fills_a_template_else_the_chat_template_else_the_image_token():
    chat = ChatProcessor()
    assert prompt_for(chat, "what ?", "A {image} B {question} C") == "A <img> B what ? C"
    assert chat.calls == []
    assert prompt_for(chat, "what ?") == "rendered"
    content = [{"type": "image"}, {"type": "text", "text": "what ?"}]
    assert chat.calls == [
        ([{"role": "user", "content": content}], {"add_generation_prompt": True, "tokenize": False})
    ]
    plain = type("Plain", (), {"image_token": "<img>"})()
    assert prompt_for(plain, "what ?") == "<img>\nwhat ?"
    assert prompt_for(object(), "what ?") == "<image>\nwhat ?"
    assert prompt_for(object(), "what ?", "{image}|{question}") == "<image>|what ?"


def test_method_specs_labels_and_stats():
    assert method_parts("zoo") == ("zoo", {})
    options = {"estimator": "zo", "num_directions": 4}
    name, parsed = method_parts(("zoo", options))
    assert (name, parsed) == ("zoo", options) and parsed is not options
    assert method_label("zoo") == "zoo" and method_label("zoo", {}) == "zoo"
    assert method_label("zoo", options) == "zoo[estimator=zo,num_directions=4]"
    condition = {"overall": {"accuracy": 0.5}, "families": {"color": {"accuracy": 1.0}}}
    assert condition_stats(condition, "overall") == {"accuracy": 0.5}
    assert condition_stats(condition, "color") == {"accuracy": 1.0}


def test_testbed_items_are_the_scene_generators_questions():
    items = accuracy.testbed_items(2, "test", ["color", "count"], start=3)
    assert [it.family for it in items] == ["color", "color", "count", "count"]
    for item, (family, index) in zip(
        items, [("color", 3), ("color", 4), ("count", 3), ("count", 4)], strict=True
    ):
        sample = scenes.make_sample("test", index, family)
        assert (item.question, item.answer) == (sample.question, sample.answer)
        assert item.pil().tobytes() == sample.scene.to_pil().tobytes()
    assert [it.family for it in accuracy.testbed_items(1)] == list(scenes.FAMILIES)
    assert (
        accuracy.testbed_items(1, "validation")[0].question != accuracy.testbed_items(1)[0].question
    )


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
    assert first.question == "q ?" and second.question == "r ?"
    good_line = json.dumps({"image": "a.png", "question": "q", "answer": "x"})
    for text, message in [
        ('{"image": "a.png", "question": "q"}', "missing answer"),
        ('{"image": "b.png", "question": "q", "answer": "x"}', "no image file"),
        ("not json", "not JSON"),
    ]:
        bad = tmp_path / "bad.jsonl"
        bad.write_text(f"{good_line}\n\n{text}\n")  # the third line is the bad one
        with pytest.raises(ValueError, match=f"bad.jsonl:3: {message}"):
            jsonl_items(bad)
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(ValueError, match="no questions"):
        jsonl_items(tmp_path / "empty.jsonl")


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


class ScriptedAnswerer:
    """An engine that answers from a script: per condition, what it says and keeps. It
    records every call (items, method, ratio, options) and the torch seed it saw."""

    def __init__(self, said: dict, kept: dict):
        self.said, self.kept, self.calls = said, kept, []

    def __call__(self, items, method, ratio, options):
        self.calls.append(([it.question for it in items], method, ratio, dict(options)))
        key = method or "unpruned"
        seed_draw = float(torch.rand(1))  # what torch.manual_seed(seed) made of the stream
        self.calls[-1] += (seed_draw,)
        questions = [it.question for it in items]
        # Per image kept: the condition's base plus the question's number (0..4), so that
        # the mean over all batches differs from any one batch's.
        kept = [] if method is None else [self.kept[key] + int(q[1:]) for q in questions]
        return [self.said[key][q] for q in questions], kept


def scripted_items():
    image = Image.new("RGB", (4, 4))
    return [
        Item(image, f"q{i}", "yes" if i % 2 else "no", "even" if i < 3 else "odd") for i in range(5)
    ]


def test_run_accuracy_records_every_condition_as_its_engine_answered(tmp_path):
    items = scripted_items()
    truth = {it.question: it.answer for it in items}
    said = {
        "unpruned": dict(truth),
        "random": {**truth, "q0": "maybe", "q3": "maybe"},
        "zoo": {**truth, "q4": "maybe"},
    }
    answer = ScriptedAnswerer(said, {"random": 3, "zoo": 4})
    progress = []
    out = tmp_path / "nested" / "run"
    summary = run_accuracy(
        tmp_path,
        None,
        items,
        out,
        ["random", ("zoo", {"num_directions": 4, "seed": 3})],
        [0.5],
        model_name="scripted",
        batch_size=2,
        seed=7,
        reps=50,
        engine="scripted",
        answerer=answer,
        on_progress=lambda *update: progress.append(update),
    )
    zoo = "zoo[num_directions=4,seed=3]"
    # Three conditions of three batches (2 + 2 + 1 questions), progress after each batch.
    assert progress == [
        (f"{key}", n, 3)
        for key in ("unpruned", "random@0.500000", f"{zoo}@0.500000")
        for n in (1, 2, 3)
    ]
    methods = [(method, ratio) for _, method, ratio, _, _ in answer.calls]
    assert methods == [(None, None)] * 3 + [("random", 0.5)] * 3 + [("zoo", 0.5)] * 3
    # The bench's seed reaches the seeded methods and torch, condition by condition.
    assert [options for _, method, _, options, _ in answer.calls if method == "random"] == [
        {"seed": 7}
    ] * 3
    assert [options for _, method, _, options, _ in answer.calls if method == "zoo"] == [
        {"seed": 3, "num_directions": 4}
    ] * 3  # a variant's own seed wins
    torch.manual_seed(7)
    first_draw = float(torch.rand(1))
    assert [call[4] for call in answer.calls[::3]] == [first_draw] * 3
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert [row["key"] for row in rows] == ["unpruned", "random@0.500000", f"{zoo}@0.500000"]
    assert [row["kept_mean"] for row in rows] == [None, 3.0 + 2, 4.0 + 2]  # q0..q4: mean 2
    assert rows[1]["predictions"] == [said["random"][it.question] for it in items]
    assert rows[1]["correct"] == [True, True, True, False, True][:0] + [
        False,
        True,
        True,
        False,
        True,
    ]
    assert all(row["seconds"] >= 0 and row["seconds"] == round(row["seconds"], 2) for row in rows)
    assert len({row["fingerprint"] for row in rows}) == 1
    # accuracy.json holds the summary and what produced it.
    saved = json.loads((out / "accuracy.json").read_text())
    assert saved == json.loads(json.dumps(summary))
    assert (saved["model"], saved["questions"], saved["engine"], saved["seed"]) == (
        "scripted",
        5,
        "scripted",
        7,
    )
    assert saved["max_new_tokens"] == 1 and saved["prompt"] is None
    assert saved["fingerprint"] == rows[0]["fingerprint"]
    # random: even 1/3 right (q0 wrong of q0..q2), odd 1/2 (q3 wrong, q4 right).
    random = summary["conditions"][1]
    assert random["families"]["even"]["accuracy"] == pytest.approx(2 / 3)
    assert random["overall"]["accuracy"] == pytest.approx((2 / 3 + 1 / 2) / 2)
    assert random["kept_mean"] == 5.0 and random["seconds"] == rows[1]["seconds"]
    assert summary["comparisons"] == []  # a variant is no reference: zoo itself did not run


def test_accuracy_csv_lists_every_condition_and_family(tmp_path):
    items = scripted_items()
    truth = {it.question: it.answer for it in items}
    answer = ScriptedAnswerer({"unpruned": truth, "grid": {**truth, "q1": "x"}}, {"grid": 2})
    summary = run_accuracy(
        tmp_path, None, items, tmp_path, ["grid"], [0.25], reps=20, answerer=answer
    )
    lines = (tmp_path / "accuracy.csv").read_text().splitlines()
    assert lines[0] == "method,ratio,kept_mean,family,accuracy,low,high,relative,n,lm_flops"
    grid = summary["conditions"][1]
    even = grid["families"]["even"]
    assert lines[1:4] == [
        "unpruned,,,overall,1.0000,1.0000,1.0000,1.0000,5,",
        "unpruned,,,even,1.0000,1.0000,1.0000,1.0000,3,",
        "unpruned,,,odd,1.0000,1.0000,1.0000,1.0000,2,",
    ]
    assert lines[5] == (
        f"grid,0.2500,4.0,even,{even['accuracy']:.4f},{even['low']:.4f},{even['high']:.4f},"
        f"{even['relative']:.4f},3,"  # no cost model given: no FLOPs
    )
    assert len(lines) == 1 + 2 * 3


def test_run_accuracy_refuses_budgets_outside_zero_one(tmp_path):
    items = scripted_items()
    for ratio in (0.0, 1.0, -0.5, 1.5):
        with pytest.raises(ValueError, match="budget ratios must lie in"):
            run_accuracy(
                tmp_path, None, items, tmp_path, ["grid"], [ratio], answerer=lambda *a: None
            )
    assert not (tmp_path / "results.jsonl").exists()


def test_the_fingerprint_follows_every_setting_the_answers_depend_on(model, tmp_path):
    image = Image.new("RGB", (4, 4))
    items = [Item(image, "q", "a", "f")]
    base = accuracy._fingerprint(items, model, "m", {"seed": 0, "prompt": None})
    assert base == accuracy._fingerprint(items, model, "m", {"prompt": None, "seed": 0})
    assert len(base) == 16
    changed = [
        accuracy._fingerprint(items, model, "other", {"seed": 0, "prompt": None}),
        accuracy._fingerprint(items, model, "m", {"seed": 1, "prompt": None}),
        accuracy._fingerprint(
            [Item(image, "r", "a", "f")], model, "m", {"seed": 0, "prompt": None}
        ),
        accuracy._fingerprint(
            [Item(image, "q", "b", "f")], model, "m", {"seed": 0, "prompt": None}
        ),
        accuracy._fingerprint(
            [Item(image, "q", "a", "g")], model, "m", {"seed": 0, "prompt": None}
        ),
        accuracy._fingerprint(
            [Item(Image.new("RGB", (4, 4), "red"), "q", "a", "f")],
            model,
            "m",
            {"seed": 0, "prompt": None},
        ),
    ]
    with torch.no_grad():
        model.lm_head.weight.mul_(2)
    changed.append(accuracy._fingerprint(items, model, "m", {"seed": 0, "prompt": None}))
    assert len({base, *changed}) == 1 + len(changed)
    # A folder another engine serves: its weight files, by name, size and time.
    folder = tmp_path / "served"
    folder.mkdir()
    (folder / "model.safetensors").write_bytes(b"x" * 10)
    (folder / "notes.txt").write_text("ignored")
    served = accuracy._fingerprint(items, folder, "m", {})
    (folder / "notes.txt").write_text("still ignored")
    assert accuracy._fingerprint(items, folder, "m", {}) == served
    (folder / "model.safetensors").write_bytes(b"x" * 11)
    assert accuracy._fingerprint(items, folder, "m", {}) != served
    path_item = [Item(str(tmp_path / "a.png"), "q", "a", "f")]
    assert accuracy._fingerprint(path_item, folder, "m", {}) != accuracy._fingerprint(
        [Item(str(tmp_path / "b.png"), "q", "a", "f")], folder, "m", {}
    )


def test_results_of_another_engine_or_setting_are_not_reused(tmp_path):
    items = scripted_items()
    truth = {it.question: it.answer for it in items}
    answer = ScriptedAnswerer({"unpruned": truth}, {})
    run_accuracy(tmp_path, None, items, tmp_path, [], [0.5], answerer=answer, reps=10)
    calls = len(answer.calls)
    run_accuracy(tmp_path, None, items, tmp_path, [], [0.5], answerer=answer, reps=10)
    assert len(answer.calls) == calls  # the same engine and settings: reused
    for changed in (
        {"engine": "other"},
        {"max_new_tokens": 2},
        {"prompt_template": "{image}{question}"},
        {"seed": 1},
    ):
        before = len(answer.calls)
        run_accuracy(
            tmp_path, None, items, tmp_path, [], [0.5], answerer=answer, reps=10, **changed
        )
        assert len(answer.calls) > before, changed


def test_the_statistics_default_to_2000_resamples_from_seed_0_and_follow_the_seed():
    _, b = seven_families(5)
    a, _ = seven_families(6)
    assert bootstrap_interval(b) == bootstrap_interval(b, reps=2000, seed=0)
    assert paired_difference(a, b) == paired_difference(a, b, reps=2000, seed=0)
    assert bootstrap_interval(b, reps=300, seed=1) == bootstrap_interval(b, reps=300, seed=1)
    assert bootstrap_interval(b, reps=300, seed=1) != bootstrap_interval(b, reps=300, seed=2)
    assert paired_difference(a, b, 300, 1) != paired_difference(a, b, 300, 2)


def test_every_question_can_be_resampled():
    # Only question 0 differs: a resample that never draws it would see no difference.
    base = np.zeros(12, bool)
    better = base.copy()
    better[0] = True
    diff = paired_difference({"f": better}, {"f": base}, reps=500)
    assert diff["high"] > 0 and diff["difference"] == pytest.approx(1 / 12)
    low, high = bootstrap_interval({"f": better}, reps=500)
    assert high > 0


def test_summarize_passes_its_resamples_and_seed_and_has_no_relative_for_a_zero_base():
    families = ["a"] * 5 + ["b"] * 5
    rows = [
        {"method": "unpruned", "ratio": None, "correct": [1, 1, 0, 1, 0, 0, 0, 0, 0, 0]},
        {"method": "zoo", "ratio": 0.5, "correct": [1, 0, 0, 1, 1, 0, 0, 1, 0, 0]},
        {"method": "grid", "ratio": 0.5, "correct": [0, 1, 1, 0, 1, 1, 0, 0, 0, 0]},
    ]
    summary = summarize(rows, families, reps=77, seed=4)
    zoo = summary["conditions"][1]
    split = {"a": np.array([1, 0, 0, 1, 1], bool), "b": np.array([0, 0, 1, 0, 0], bool)}
    assert (zoo["overall"]["low"], zoo["overall"]["high"]) == bootstrap_interval(split, 77, 4)
    assert (zoo["families"]["a"]["low"], zoo["families"]["a"]["high"]) == bootstrap_interval(
        {"a": split["a"]}, 77, 4
    )
    grid = {"a": np.array([0, 1, 1, 0, 1], bool), "b": np.array([1, 0, 0, 0, 0], bool)}
    (comparison,) = summary["comparisons"]
    assert {k: comparison[k] for k in ("difference", "low", "high")} == paired_difference(
        split, grid, 77, 4
    )
    # family b: unpruned answers nothing right, so nothing is relative to it
    assert zoo["families"]["b"]["relative"] is None and zoo["families"]["a"]["relative"] == 1.0
    assert summarize(rows, families) == summarize(rows, families, reps=2000, seed=0)
    # Enough questions that an interval depends on the draw: the seed and the number of
    # resamples reach every interval.
    rng = np.random.default_rng(0)
    many = ["a"] * 40 + ["b"] * 40
    rows = [
        {"method": "unpruned", "ratio": None, "correct": (rng.random(80) < 0.7).tolist()},
        {"method": "zoo", "ratio": 0.5, "correct": (rng.random(80) < 0.5).tolist()},
    ]
    zoo = summarize(rows, many, reps=101, seed=4)["conditions"][1]
    a = np.array(rows[1]["correct"][:40], bool)
    assert (zoo["families"]["a"]["low"], zoo["families"]["a"]["high"]) == bootstrap_interval(
        {"a": a}, 101, 4
    )
    assert summarize(rows, many, reps=101, seed=4) != summarize(rows, many, reps=101, seed=5)
    assert summarize(rows, many, reps=101, seed=4) != summarize(rows, many, reps=102, seed=4)
    assert summarize(rows, many) == summarize(rows, many, reps=2000, seed=0)
    assert summarize(rows, many) != summarize(rows, many, reps=2000, seed=1)


class RecordingProcessor:
    """A processor that records its calls and hands back fixed tensors."""

    image_token = "<img>"

    def __init__(self):
        self.calls = []

    def __call__(self, **kwargs):
        self.calls.append(("process", kwargs))
        return {"input_ids": torch.ones(2, 3, dtype=torch.long), "pixel_values": torch.zeros(2, 1)}

    def batch_decode(self, new, **kwargs):
        self.calls.append(("decode", new.tolist(), kwargs))
        return ["x", "y"]


class RecordingModel(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1, dtype=torch.bfloat16))
        self.calls = []

    def generate(self, **kwargs):
        self.calls.append(kwargs)
        return torch.tensor([[1, 1, 1, 7, 8], [1, 1, 1, 9, 9]])


def test_answer_asks_the_processor_and_generate_as_documented():
    processor, model = RecordingProcessor(), RecordingModel()
    items = [
        Item(Image.new("L", (4, 4)), "q one ?", "a"),
        Item(Image.new("RGB", (4, 4)), "q ?", "b"),
    ]
    said = accuracy._answer(model, processor, items, "T {image} {question}", 2)
    assert said == ["x", "y"]
    (_, asked), (_, new, decoding) = processor.calls
    assert asked["text"] == ["T <img> q one ?", "T <img> q ?"] and asked["padding"] is True
    assert [image.mode for image in asked["images"]] == ["RGB", "RGB"]
    assert asked["return_tensors"] == "pt"
    (generated,) = model.calls
    assert generated["pixel_values"].dtype == torch.bfloat16  # the model's dtype
    assert generated["max_new_tokens"] == 2 and generated["do_sample"] is False
    assert new == [[7, 8], [9, 9]] and decoding == {"skip_special_tokens": True}


def test_the_hf_answerer_prunes_with_the_conditions_method_and_options(monkeypatch):
    seen = []

    class Handle:
        selection = type("S", (), {"images": [type("I", (), {"kept": 3})()]})()

        def __enter__(self):
            return self

        def __exit__(self, *args):
            return False

    def prune(model, method, **kwargs):
        seen.append((method, kwargs))
        return Handle()

    monkeypatch.setattr(accuracy.zooprune, "prune", prune)
    answers = []
    monkeypatch.setattr(accuracy, "_answer", lambda *args: answers.append(args[3:]) or ["p"])
    answer = accuracy.hf_answerer("model", "processor", "{image}{question}", 5)
    assert answer([Item(None, "q", "a")], None, None, {}) == (["p"], [])
    assert answer([Item(None, "q", "a")], "grid", 0.5, {"seed": 2}) == (["p"], [3])
    assert seen == [("grid", {"ratio": 0.5, "seed": 2})]
    assert answers == [("{image}{question}", 5)] * 2


def test_run_accuracy_defaults_timing_and_what_it_writes(tmp_path, monkeypatch):
    items = [Item(Image.new("RGB", (4, 4)), f"q{i}", "yes", "f") for i in range(66)]
    truth = {it.question: it.answer for it in items}

    def slow(batch, method, ratio, options):
        time.sleep(0.0117)
        return [truth[it.question] for it in batch], [] if method is None else [1] * len(batch)

    progress = []
    start = time.perf_counter()
    summary = run_accuracy(
        tmp_path,
        None,
        items,
        tmp_path,
        [],
        [0.5],
        answerer=slow,
        reps=10,
        on_progress=lambda *update: progress.append(update),
    )
    wall = time.perf_counter() - start
    # batches of 32 by default: 32, 32 and 2 of 66
    assert progress == [("unpruned", 1, 3), ("unpruned", 2, 3), ("unpruned", 3, 3)]
    assert summary["model"] == "model" and "engine" not in summary
    text = (tmp_path / "accuracy.json").read_text()
    assert text.startswith('{\n "conditions"')  # one space of indent: a readable log
    (row,) = [json.loads(line) for line in (tmp_path / "results.jsonl").read_text().splitlines()]
    # The condition's own time: three answers of 11.7 ms, within the whole call's.
    assert 0.02 <= row["seconds"] <= round(wall, 2) + 0.01
    assert row["seconds"] == float(f"{row['seconds']:.2f}")
    # A rerun finds the condition done: progress reports it whole, nothing is asked.
    again = []
    run_accuracy(
        tmp_path,
        None,
        items,
        tmp_path,
        [],
        [0.5],
        answerer=None,
        reps=10,
        on_progress=lambda *update: again.append(update),
    )
    assert again == [("unpruned", 3, 3)]


def test_the_harness_passes_its_template_to_the_hf_engine(model, processor, tmp_path, monkeypatch):
    templates = []
    real = accuracy._answer

    def spy(model, processor, items, template, new_tokens):
        templates.append(template)
        return real(model, processor, items, template, new_tokens)

    monkeypatch.setattr(accuracy, "_answer", spy)
    items = [Item(Image.new("RGB", (8, 8)), "what ?", "a")]
    run_accuracy(
        model,
        processor,
        items,
        tmp_path,
        [],
        [0.5],
        prompt_template="<s> <image> {question}",
        reps=5,
    )
    assert templates == ["<s> <image> {question}"]


def test_an_item_reads_any_image_mode_as_rgb(tmp_path):
    Image.new("L", (5, 3), 128).save(tmp_path / "grey.png")
    assert Item(str(tmp_path / "grey.png"), "q", "a").pil().mode == "RGB"
    assert Item(Image.new("RGBA", (2, 2)), "q", "a").pil().mode == "RGB"
    first = accuracy.testbed_items(1, families=["color"])[0]
    assert first.question == scenes.make_sample("test", 0, "color").question


def test_run_accuracy_summarizes_with_its_seed_and_resamples(tmp_path):
    # 200 questions half answered right by "grid": its intervals depend on the resamples'
    # seed and count, so the summary shows which ones run_accuracy used.
    image = Image.new("RGB", (4, 4))
    items = [Item(image, f"q{i}", "yes", "even" if i % 2 else "odd") for i in range(200)]
    truth = {it.question: it.answer for it in items}
    half = {q: ("yes" if int(q[1:]) % 4 < 2 else "no") for q in truth}
    answer = ScriptedAnswerer({"unpruned": truth, "grid": half}, {"grid": 1})
    summary = run_accuracy(
        tmp_path, None, items, tmp_path, ["grid"], [0.5], seed=5, reps=300, answerer=answer
    )
    rows = [json.loads(line) for line in (tmp_path / "results.jsonl").read_text().splitlines()]
    families = [it.family for it in items]

    expected = summarize(rows, families, reps=300, seed=5)["conditions"]
    assert summary["conditions"] == expected
    # Another seed or the default count gives other intervals here.
    assert summarize(rows, families, reps=300, seed=0)["conditions"] != expected
    assert summarize(rows, families, seed=5)["conditions"] != expected


def test_the_csv_leaves_relative_empty_where_the_base_is_zero(tmp_path):
    items = scripted_items()
    truth = {it.question: it.answer for it in items}
    wrong_odd = {q: ("maybe" if int(q[1:]) >= 3 else a) for q, a in truth.items()}
    answer = ScriptedAnswerer({"unpruned": wrong_odd, "grid": truth}, {"grid": 2})
    summary = run_accuracy(
        tmp_path, None, items, tmp_path, ["grid"], [0.25], reps=20, answerer=answer
    )
    assert summary["conditions"][1]["families"]["odd"]["relative"] is None
    lines = (tmp_path / "accuracy.csv").read_text().splitlines()
    assert "grid,0.2500,4.0,odd,1.0000,1.0000,1.0000,,2," in lines
