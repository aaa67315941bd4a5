"""Accuracy versus visual-token budget, per method and question family.

The harness asks every question once unpruned and once per (method, budget), through
the public path only: ``zooprune.prune(model, ...)`` then ``model.generate`` with greedy
decoding on the processor's own inputs. Every condition's per-question results go to
``results.jsonl`` as soon as they exist, so an interrupted run resumes where it stopped.

Scoring is exact match after :func:`normalize` (lowercase, punctuation and articles
dropped). Intervals are percentile bootstraps over questions; the overall accuracy is the
mean over families, resampled within each family.
"""

from __future__ import annotations

import csv
import hashlib
import json
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import nn

import zooprune
from zooprune.bench.equal_flops import PrefillCost, prompt_sizes
from zooprune.bench.flops import Shapes

__all__ = [
    "DEFAULT_RATIOS",
    "Item",
    "bootstrap_interval",
    "condition_stats",
    "is_correct",
    "jsonl_items",
    "method_label",
    "method_parts",
    "normalize",
    "paired_difference",
    "run_accuracy",
    "summarize",
    "testbed_items",
]

# 33%, 22%, 11% and 5.6% of the tokens: 192/128/64/32 of LLaVA-1.5's 576, as in the paper.
DEFAULT_RATIOS: tuple[float, ...] = (1 / 3, 2 / 9, 1 / 9, 1 / 18)
UNPRUNED = "unpruned"
#: how a method matched at equal LM prefill FLOPs is labelled after its own name
EQUAL_FLOPS = "(equal FLOPs)"


@dataclass(frozen=True)
class Item:
    """One question: ``image`` is a file path or a PIL image; ``family`` groups the scores."""

    image: Any
    question: str
    answer: str
    family: str = "all"

    def pil(self) -> Image.Image:
        if isinstance(self.image, Image.Image):
            return self.image.convert("RGB")
        with Image.open(self.image) as image:
            return image.convert("RGB")


def testbed_items(
    n_per_family: int, split: str = "test", families: Sequence[str] | None = None, start: int = 0
) -> list[Item]:
    """``n_per_family`` test-bed questions per family (fixed seeds, so always the same)."""
    from zooprune.testbed import scenes

    families = scenes.FAMILIES if families is None else tuple(families)
    items = []
    for family in families:
        for index in range(start, start + n_per_family):
            sample = scenes.make_sample(split, index, family)
            items.append(Item(sample.scene.to_pil(), sample.question, sample.answer, family))
    return items


def jsonl_items(path: str | Path) -> list[Item]:
    """Questions from a JSON-lines file: ``{"image", "question", "answer"[, "family"]}``.

    A relative image path is read relative to the file's folder.
    """
    path = Path(path)
    items = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as error:
            raise ValueError(f"{path}:{number}: not JSON ({error.msg})") from None
        missing = [key for key in ("image", "question", "answer") if key not in row]
        if missing:
            raise ValueError(f"{path}:{number}: missing {', '.join(missing)}")
        image = Path(row["image"])
        image = image if image.is_absolute() else path.parent / image
        if not image.is_file():
            raise ValueError(f"{path}:{number}: no image file {image}")
        items.append(
            Item(str(image), row["question"], str(row["answer"]), row.get("family", "all"))
        )
    if not items:
        raise ValueError(f"{path} holds no questions")
    return items


_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = re.compile(r"[^\w\s]")


def normalize(text: str) -> str:
    """Lowercase, punctuation and English articles removed, whitespace collapsed."""
    text = _PUNCTUATION.sub(" ", text.lower())
    return " ".join(_ARTICLES.sub(" ", text).split())


def is_correct(prediction: str, answer: str) -> bool:
    """Exact match after :func:`normalize`, or the prediction starts with the answer's words.

    The prefix rule lets ``"yes, there is"`` count for ``"yes"`` while ``"yesterday"`` does
    not.
    """
    pred, gold = normalize(prediction).split(), normalize(answer).split()
    return bool(gold) and pred[: len(gold)] == gold


def bootstrap_interval(
    correct_by_family: dict[str, np.ndarray], reps: int = 2000, seed: int = 0
) -> tuple[float, float]:
    """95% percentile interval of the mean over families of per-family accuracy.

    Args:
        correct_by_family: per family, bool ``[n_f]``; each family is resampled on its own.
    """
    rng = np.random.default_rng(seed)
    means = np.zeros(reps)
    for correct in correct_by_family.values():
        picks = rng.integers(0, len(correct), size=(reps, len(correct)))
        means += correct[picks].mean(axis=1)
    means /= len(correct_by_family)
    low, high = np.percentile(means, [2.5, 97.5])
    return float(low), float(high)


#: the methods every other one is compared with, question by question (ZOO-Prune, and the
#: strongest baseline it was published against)
REFERENCES = ("zoo", "divprune")


def paired_difference(
    a: dict[str, np.ndarray], b: dict[str, np.ndarray], reps: int = 2000, seed: int = 0
) -> dict[str, float]:
    """Accuracy of ``a`` minus ``b`` on the same questions, with a paired 95% interval.

    Both map family to bool ``[n_f]`` over the same questions in the same order; one
    resample draws the same questions for both, so the interval reflects only where the
    two conditions disagree.
    """
    rng = np.random.default_rng(seed)
    diffs = np.zeros(reps)
    for family, first in a.items():
        delta = first.astype(float) - b[family].astype(float)
        picks = rng.integers(0, len(delta), size=(reps, len(delta)))
        diffs += delta[picks].mean(axis=1)
    diffs /= len(a)
    observed = float(np.mean([a[f].mean() - b[f].mean() for f in a]))
    low, high = np.percentile(diffs, [2.5, 97.5])
    return {"difference": observed, "low": float(low), "high": float(high)}


def prompt_for(processor: Any, question: str, template: str | None = None) -> str:
    """The prompt text for one question about one image: ``template`` (``{image}`` and
    ``{question}`` filled), else the processor's chat template, else the image token."""
    token = getattr(processor, "image_token", "<image>")
    if template is not None:
        return template.replace("{image}", token).replace("{question}", question)
    if getattr(processor, "chat_template", None):
        messages = [
            {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}
        ]
        return processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return f"{token}\n{question}"


def _answer(
    model: nn.Module,
    processor: Any,
    items: Sequence[Item],
    prompt_template: str | None,
    max_new_tokens: int,
) -> list[str]:
    images = [item.pil() for item in items]
    texts = [prompt_for(processor, item.question, prompt_template) for item in items]
    inputs = processor(images=images, text=texts, padding=True, return_tensors="pt")
    dtype = next(model.parameters()).dtype
    inputs["pixel_values"] = inputs["pixel_values"].to(dtype)
    with torch.no_grad():
        output = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    new = output[:, inputs["input_ids"].shape[1] :]
    return processor.batch_decode(new, skip_special_tokens=True)


def prefill_cost(
    config: Any, processor: Any, items: Sequence[Item], template: str | None = None
) -> PrefillCost:
    """The LM prefill cost model of ``items`` as ``processor`` expands their prompts, for
    the model of ``config`` (its language model's shapes, its image token)."""
    image_token = getattr(config, "image_token_id", None)
    if image_token is None:
        image_token = getattr(config, "image_token_index", None)
    if image_token is None:
        raise ValueError(f"{type(config).__name__} names no image token id")
    prompts = [prompt_for(processor, item.question, template) for item in items]
    sizes = prompt_sizes(processor, prompts, [item.pil() for item in items], image_token)
    return PrefillCost(Shapes.of_text(config), sizes)


#: ``answer(items, method, ratio, options) -> (predictions, visual tokens kept per image)``;
#: ``method`` and ``ratio`` are None for the unpruned model (and the kept list empty)
Answerer = Callable[
    [Sequence[Item], str | None, float | None, dict[str, Any]], tuple[list[str], list[int]]
]


def hf_answerer(
    model: nn.Module, processor: Any, prompt_template: str | None, max_new_tokens: int
) -> Answerer:
    """Answers with ``generate`` on the Hugging Face model, pruned by a handle per batch."""

    def answer(
        items: Sequence[Item], method: str | None, ratio: float | None, options: dict[str, Any]
    ) -> tuple[list[str], list[int]]:
        if method is None:
            return _answer(model, processor, items, prompt_template, max_new_tokens), []
        with zooprune.prune(model, method, ratio=ratio, **options) as handle:
            predictions = _answer(model, processor, items, prompt_template, max_new_tokens)
        return predictions, [image.kept for image in handle.selection.images]

    return answer


#: a method to bench: a registered name, or ``(name, options)`` for a variant such as
#: ``("zoo", {"estimator": "zo", "num_directions": 16})``
MethodSpec = str | tuple[str, dict[str, Any]]


def method_parts(spec: MethodSpec) -> tuple[str, dict[str, Any]]:
    """``spec`` as ``(name, options)``: a plain name has no options."""
    return (spec, {}) if isinstance(spec, str) else (spec[0], dict(spec[1]))


def method_label(name: str, options: dict[str, Any] | None = None) -> str:
    """How a method run with ``options`` is named in results and tables:
    ``zoo[estimator=zo,num_directions=16]``, or just ``zoo`` with no options."""
    if not options:
        return name
    return f"{name}[{','.join(f'{key}={value}' for key, value in options.items())}]"


def _condition_key(method: str, ratio: float | None) -> str:
    return UNPRUNED if ratio is None else f"{method}@{ratio:.6f}"


def _fingerprint(
    items: Sequence[Item], model: nn.Module | Path, model_name: str, settings: dict[str, Any]
) -> str:
    digest = hashlib.sha256(model_name.encode())
    digest.update(json.dumps(settings, sort_keys=True).encode())
    # Retrained weights under the same name must not reuse old results.
    if isinstance(model, Path):  # a folder another engine loads: its weight files
        for file in sorted(model.glob("*.safetensors")):
            stat = file.stat()
            digest.update(f"{file.name}{stat.st_size}{stat.st_mtime_ns}".encode())
    else:
        with torch.no_grad():
            for name, param in model.named_parameters():
                line = f"{name}{tuple(param.shape)}{float(param.double().sum()):.10e}"
                digest.update(line.encode())
    for item in items:
        image = item.image if isinstance(item.image, str) else item.pil().tobytes()
        digest.update(image if isinstance(image, bytes) else image.encode())
        digest.update(f"\0{item.question}\0{item.answer}\0{item.family}".encode())
    return digest.hexdigest()[:16]


def run_accuracy(
    model: nn.Module | Path,
    processor: Any,
    items: Sequence[Item],
    out_dir: str | Path,
    methods: Sequence[MethodSpec],
    ratios: Sequence[float] = DEFAULT_RATIOS,
    *,
    model_name: str = "model",
    batch_size: int = 32,
    max_new_tokens: int = 1,
    prompt_template: str | None = None,
    seed: int = 0,
    reps: int = 2000,
    on_progress: Callable[[str, int, int], None] | None = None,
    engine: str = "hf",
    answerer: Answerer | None = None,
    cost: PrefillCost | None = None,
    match_flops: bool = False,
) -> dict[str, Any]:
    """Score every (method, ratio) and the unpruned model on ``items``; resumable.

    ``model`` answers through ``generate`` (:func:`hf_answerer`) unless ``answerer`` is
    given: another engine, named by ``engine`` (results are kept apart per engine), serving
    ``model``, then its folder (whose weight files fingerprint the results). A method is a
    registered name or ``(name, options)``: a variant, named by :func:`method_label` (e.g.
    ``zoo[estimator=zo]``), so that variants of one method are benched side by side.

    Writes ``results.jsonl`` (one line per finished condition, with every prediction),
    then ``accuracy.json`` and ``accuracy.csv`` from :func:`summarize`. A condition already
    in ``results.jsonl`` with the same fingerprint (model name, questions, settings) is not
    run again. ``on_progress(condition, done, total)`` is called after every batch.

    ``cost`` (the questions' prompt sizes and the LM's shapes) adds each condition's LM
    prefill FLOPs relative to unpruned (``lm_flops``). With ``match_flops``, every method
    that drops tokens inside the LM also runs as ``NAME (equal FLOPs)`` at each ratio: at
    the budget where its prefill costs what a method before the LM spends at that ratio
    (:meth:`PrefillCost.matching_ratio`; ``run_ratio`` in its record). Where no budget
    does, the condition is listed under ``unmatched`` with the reason.
    """
    if match_flops and cost is None:
        raise ValueError("match_flops needs cost (the prompts' sizes and the LM's shapes)")
    variants: dict[str, tuple[str, dict[str, Any]]] = {}
    for spec in methods:
        name, options = method_parts(spec)
        if name not in zooprune.METHODS:
            raise zooprune.UnknownMethodError(
                f"unknown method {name!r}; known: {', '.join(sorted(zooprune.METHODS))}"
            )
        # Checked before the first condition runs: a bad option would otherwise surface
        # only after the unpruned pass.
        variants[method_label(name, options)] = (
            name,
            zooprune.METHODS[name].resolve_options(options),
        )
    for ratio in ratios:
        if not 0 < ratio < 1:
            raise ValueError(f"budget ratios must lie in (0, 1), got {ratio}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    settings = {"max_new_tokens": max_new_tokens, "prompt": prompt_template, "seed": seed}
    if engine != "hf":  # the HF results' fingerprints stay what they were
        settings["engine"] = engine
    answer = answerer or hf_answerer(model, processor, prompt_template, max_new_tokens)
    fingerprint = _fingerprint(items, model, model_name, settings)
    results_path = out / "results.jsonl"
    done: dict[str, dict[str, Any]] = {}
    if results_path.exists():
        for line in results_path.read_text().splitlines():
            row = json.loads(line)
            if row.get("fingerprint") == fingerprint:
                done[row["key"]] = row
    # (label, column ratio, the ratio it runs at)
    conditions: list[tuple[str, float | None, float | None]] = [(UNPRUNED, None, None)]
    unmatched: list[dict[str, Any]] = []
    for method, (name, options) in list(variants.items()):
        conditions += [(method, r, r) for r in ratios]
        spec = zooprune.METHODS[name]
        if not (match_flops and spec.in_lm):
            continue
        matched = f"{method} {EQUAL_FLOPS}"
        variants[matched] = (name, options)
        for r in ratios:
            run_ratio = cost.matching_ratio(spec, options, r)
            if run_ratio is None:
                share = cost.relative_before_lm(r)
                unmatched.append(
                    {
                        "method": matched,
                        "ratio": r,
                        "reason": f"its unpruned layers alone cost more than {100 * share:.1f}% "
                        "of the unpruned prefill, even keeping one token per image",
                    }
                )
            else:
                conditions.append((matched, r, run_ratio))
    batches = [items[i : i + batch_size] for i in range(0, len(items), batch_size)]
    for method, ratio, run_ratio in conditions:
        key = _condition_key(method, ratio)
        if key in done:
            if on_progress:
                on_progress(key, len(batches), len(batches))
            continue
        torch.manual_seed(seed)
        predictions: list[str] = []
        kept: list[int] = []
        start = time.perf_counter()
        name, options = variants.get(method, (method, {}))
        if ratio is not None and "seed" in zooprune.METHODS[name].options:
            options = {"seed": seed, **options}
        for number, batch in enumerate(batches, 1):
            said, counted = answer(batch, None if ratio is None else name, run_ratio, options)
            predictions += said
            kept += counted
            if on_progress:
                on_progress(key, number, len(batches))
        row = {
            "fingerprint": fingerprint,
            "key": key,
            "method": method,
            "ratio": ratio,
            "run_ratio": run_ratio,
            "kept_mean": float(np.mean(kept)) if kept else None,
            "lm_flops": _lm_flops(cost, None if ratio is None else name, options, kept, items),
            "seconds": round(time.perf_counter() - start, 2),
            "predictions": predictions,
            "correct": [is_correct(p, it.answer) for p, it in zip(predictions, items, strict=True)],
        }
        with results_path.open("a") as file:
            file.write(json.dumps(row) + "\n")
        done[key] = row
    rows = [done[_condition_key(m, r)] for m, r, _ in conditions]
    summary = summarize(rows, [it.family for it in items], reps=reps, seed=seed)
    summary.update(model=model_name, questions=len(items), fingerprint=fingerprint, **settings)
    if match_flops:
        summary["unmatched"] = unmatched
    (out / "accuracy.json").write_text(json.dumps(summary, indent=1))
    _write_csv(summary, out / "accuracy.csv")
    return summary


def _lm_flops(
    cost: PrefillCost | None,
    method: str | None,
    options: dict[str, Any],
    kept: Sequence[int],
    items: Sequence[Item],
) -> float | None:
    """The condition's LM prefill relative to unpruned, from the tokens each image kept;
    None without ``cost`` or where the kept counts are not one per question."""
    if cost is None:
        return None
    if method is None:
        return 1.0
    if len(kept) != len(items):
        return None
    return cost.relative(zooprune.METHODS[method], options, kept)


def _split(correct: Sequence[bool], families: Sequence[str]) -> dict[str, np.ndarray]:
    by_family: dict[str, list[bool]] = {}
    for ok, family in zip(correct, families, strict=True):
        by_family.setdefault(family, []).append(bool(ok))
    return {family: np.array(values) for family, values in by_family.items()}


def summarize(
    rows: Sequence[dict[str, Any]], families: Sequence[str], reps: int = 2000, seed: int = 0
) -> dict[str, Any]:
    """Accuracy, 95% interval and accuracy relative to unpruned, per condition and family.

    Args:
        rows: condition records (``method``, ``ratio``, ``correct`` per question); the first
            must be the unpruned one.
        families: the family of each question, in the order of ``correct``.

    Returns:
        ``{"conditions": [...], "comparisons": [...]}``; every condition has ``overall`` and
        ``families``, each ``{"accuracy", "low", "high", "relative", "n"}``. Comparisons are
        paired differences of each reference method (:data:`REFERENCES`: ``zoo``, then
        ``divprune``) against every other method at each ratio, each pair once.
    """
    if rows[0]["method"] != UNPRUNED:
        raise ValueError("the first condition must be the unpruned one")
    base = _split(rows[0]["correct"], families)
    base_overall = float(np.mean([v.mean() for v in base.values()]))
    conditions = []
    by_key: dict[tuple[str, float | None], dict[str, np.ndarray]] = {}
    for row in rows:
        split = _split(row["correct"], families)
        by_key[(row["method"], row["ratio"])] = split
        fams = {}
        for family, correct in split.items():
            low, high = bootstrap_interval({family: correct}, reps, seed)
            accuracy = float(correct.mean())
            fams[family] = {
                "accuracy": accuracy,
                "low": low,
                "high": high,
                "relative": accuracy / base[family].mean() if base[family].mean() else None,
                "n": len(correct),
            }
        overall = float(np.mean([v.mean() for v in split.values()]))
        low, high = bootstrap_interval(split, reps, seed)
        conditions.append(
            {
                "method": row["method"],
                "ratio": row["ratio"],
                "kept_mean": row.get("kept_mean"),
                "run_ratio": row.get("run_ratio", row["ratio"]),
                "lm_flops": row.get("lm_flops"),
                "seconds": row.get("seconds"),
                "overall": {
                    "accuracy": overall,
                    "low": low,
                    "high": high,
                    "relative": overall / base_overall if base_overall else None,
                    "n": len(row["correct"]),
                },
                "families": fams,
            }
        )
    comparisons = []
    for reference in REFERENCES:
        for (method, ratio), split in by_key.items():
            # Each pair once: a method the earlier references were measured against is done.
            done = REFERENCES[: REFERENCES.index(reference) + 1]
            if method == UNPRUNED or method in done or (reference, ratio) not in by_key:
                continue
            diff = paired_difference(by_key[(reference, ratio)], split, reps, seed)
            comparisons.append({"a": reference, "b": method, "ratio": ratio, **diff})
    return {"conditions": conditions, "comparisons": comparisons}


def _write_csv(summary: dict[str, Any], path: Path) -> None:
    with path.open("w", newline="") as file:
        writer = csv.writer(file)
        writer.writerow(
            [
                "method",
                "ratio",
                "kept_mean",
                "family",
                "accuracy",
                "low",
                "high",
                "relative",
                "n",
                "lm_flops",
            ]
        )
        for cond in summary["conditions"]:
            for family, stats in [("overall", cond["overall"]), *cond["families"].items()]:
                writer.writerow(
                    [
                        cond["method"],
                        "" if cond["ratio"] is None else f"{cond['ratio']:.4f}",
                        "" if cond["kept_mean"] is None else f"{cond['kept_mean']:.1f}",
                        family,
                        f"{stats['accuracy']:.4f}",
                        f"{stats['low']:.4f}",
                        f"{stats['high']:.4f}",
                        "" if stats["relative"] is None else f"{stats['relative']:.4f}",
                        stats["n"],
                        "" if cond.get("lm_flops") is None else f"{cond['lm_flops']:.4f}",
                    ]
                )


def condition_stats(condition: dict[str, Any], family: str) -> dict[str, Any]:
    """A condition's statistics for one family, or for ``"overall"``."""
    return condition["overall"] if family == "overall" else condition["families"][family]
