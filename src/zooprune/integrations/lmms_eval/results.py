"""lmms-eval result files of several runs, read into the paper-style comparison.

Pure JSON: reading results needs neither lmms-eval nor a model. A run is one
``*_results.json`` that lmms-eval writes under ``--output_path``. A run of ``--model
zooprune`` is a pruned condition (its method and budget read from ``model_args``); any
other model is the unpruned reference. Every task's score is its primary metric (the first
one lmms-eval reports, unless chosen with ``metrics``); relative accuracy is a score over
the unpruned score of the same task, averaged over tasks as the papers do.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

UNPRUNED = "unpruned"


@dataclass
class Run:
    """One lmms-eval run: its condition, its task scores, what it kept."""

    path: Path
    model: str
    pretrained: str
    method: str
    budget: str  # "keep=64", "ratio=0.1112", or "" unpruned
    scores: dict[str, float]
    metrics: dict[str, str]  # task -> the metric its score is
    kept_tokens: float | None = None  # mean per image
    visual_tokens: float | None = None
    select_ms: float | None = None  # mean per image
    relative: dict[str, float] = field(default_factory=dict)
    #: the tasks its average runs over (every compared run's: see :func:`compare`)
    averaged_over: list[str] | None = None

    @property
    def label(self) -> str:
        return UNPRUNED if self.method == UNPRUNED else f"{self.method} {self.budget}"

    @property
    def kept_fraction(self) -> float | None:
        if self.kept_tokens is None or not self.visual_tokens:
            return None
        return self.kept_tokens / self.visual_tokens

    @property
    def average_relative(self) -> float | None:
        tasks = self.relative if self.averaged_over is None else self.averaged_over
        values = [self.relative[task] for task in tasks]
        return sum(values) / len(values) if values else None


def result_files(paths: list[str | Path]) -> list[Path]:
    """The ``*_results.json`` files named, or found under the folders named."""
    found: list[Path] = []
    for path in map(Path, paths):
        if path.is_dir():
            found += sorted(path.rglob("*_results.json"))
        elif path.is_file():
            found.append(path)
        else:
            raise FileNotFoundError(f"no such results file or folder: {path}")
    if not found:
        raise FileNotFoundError(f"no lmms-eval *_results.json under {', '.join(map(str, paths))}")
    return found


def model_args(text: str) -> dict[str, str]:
    """``a=1,b=x`` -> ``{"a": "1", "b": "x"}`` (values kept as text)."""
    pairs = [part.split("=", 1) for part in text.split(",") if "=" in part]
    return {key.strip(): value.strip() for key, value in pairs}


def read_run(path: str | Path, metrics: dict[str, str] | None = None) -> Run:
    """One results file as a :class:`Run`.

    Args:
        metrics: task -> metric name to score it by (default: its first reported metric).
    """
    path = Path(path)
    data = _results_object(path)
    config = data["config"]
    model = str(config.get("model", "?"))
    args = model_args(str(config.get("model_args") or ""))
    if model == "zooprune":
        method = args.get("method", "zoo")
        budget = next((f"{k}={args[k]}" for k in ("keep", "ratio") if k in args), "")
    else:
        method, budget = UNPRUNED, ""
    scores, chosen = {}, {}
    for task, values in data.get("results", {}).items():
        metric = _primary_metric(values, (metrics or {}).get(task))
        if metric is not None:
            scores[task], chosen[task] = float(values[f"{metric},none"]), metric
    throughput = data.get("throughput") or {}
    images = throughput.get("avg_zooprune_images")

    def per_image(key: str) -> float | None:
        value = throughput.get(key)
        return None if value is None or not images else value / images

    select = per_image("avg_zooprune_select_seconds")
    return Run(
        path=path,
        model=model,
        pretrained=args.get("pretrained", model),
        method=method,
        budget=budget,
        scores=scores,
        metrics=chosen,
        kept_tokens=per_image("avg_zooprune_kept_tokens"),
        visual_tokens=per_image("avg_zooprune_visual_tokens"),
        select_ms=None if select is None else 1e3 * select,
    )


def _results_object(path: Path) -> dict[str, Any]:
    """The file's JSON, checked to have an lmms-eval results file's shape: an object with
    a ``config`` object and ``results``, one object per task.

    Raises:
        ValueError: naming the file and what is wrong with it.
    """
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"{path}: is not JSON ({error})") from None
    if not isinstance(data, dict):
        raise ValueError(
            f"{path}: is a JSON {type(data).__name__}, not an lmms-eval results object"
        )
    if "results" not in data or "config" not in data:
        raise ValueError(
            f"{path}: no 'results' and 'config': not an lmms-eval results file (zooprune "
            "report reads the *_results.json lmms-eval writes under --output_path)"
        )
    if not isinstance(data["config"], dict):
        raise ValueError(f"{path}: 'config' is {data['config']!r}, not an object")
    if not isinstance(data["results"], dict):
        raise ValueError(f"{path}: 'results' is {data['results']!r}, not an object")
    for task, values in data["results"].items():
        if not isinstance(values, dict):
            raise ValueError(f"{path}: task {task!r}: its results are {values!r}, not an object")
    return data


def _primary_metric(values: dict[str, Any], wanted: str | None) -> str | None:
    """The metric a task is scored by: ``wanted``, else the first numeric one reported."""
    names = [
        key.split(",")[0]
        for key, value in values.items()
        if key.endswith(",none")
        and "_stderr" not in key
        and isinstance(value, (int, float))
        and not isinstance(value, bool)
        and math.isfinite(value)
    ]
    if wanted is not None:
        if wanted not in names:
            raise ValueError(f"no metric {wanted!r} in these results; there are {names}")
        return wanted
    return names[0] if names else None


def compare(runs: list[Run]) -> list[Run]:
    """Fill each run's relative accuracy per task against the unpruned run, its average
    over the tasks every run has (``averaged_over``); the unpruned run first, then the
    others by method and kept tokens (most first).

    Raises:
        ValueError: without exactly one unpruned run, or runs of different models.
    """
    models = {run.pretrained for run in runs}
    if len(models) > 1:
        raise ValueError(f"runs of different models: {', '.join(sorted(models))}; report each")
    bases = [run for run in runs if run.method == UNPRUNED]
    if len(bases) != 1:
        raise ValueError(
            f"need exactly one unpruned run (a model other than zooprune), got {len(bases)}"
        )
    base = bases[0]
    for run in runs:
        run.relative = {
            task: score / base.scores[task]
            for task, score in run.scores.items()
            if base.scores.get(task)
        }
    # Averages over the same tasks only: a run missing one would be compared on others.
    shared = sorted(set.intersection(*(set(run.relative) for run in runs)))
    for run in runs:
        run.averaged_over = shared
    pruned = sorted(
        (run for run in runs if run is not base),
        key=lambda run: (run.method, -(run.kept_tokens or 0.0), run.budget),
    )
    return [base, *pruned]


def plot_summary(runs: list[Run]) -> dict[str, Any]:
    """The runs in the form :func:`zooprune.viz.plot_accuracy` draws: relative accuracy
    (unpruned = 1) per task and averaged, against the share of visual tokens kept."""

    def stats(value: float) -> dict[str, float]:
        return {"accuracy": value, "low": value, "high": value}

    shared = set.intersection(*(set(run.relative) for run in runs))
    conditions = []
    for run in runs:
        if run.kept_fraction is None and run.method != UNPRUNED:
            continue  # a pruned run without zooprune's record has no place on the x axis
        conditions.append(
            {
                "method": run.method,
                "ratio": run.kept_fraction,
                "overall": stats(run.average_relative or 0.0),
                "families": {
                    task: stats(value) for task, value in run.relative.items() if task in shared
                },
            }
        )
    # A folder's last part names the model well enough in a title; a hub id keeps its name.
    return {"model": Path(runs[0].pretrained).name, "conditions": conditions}
