"""``zooprune report``: lmms-eval runs, unpruned and pruned, as the papers' comparison table."""

from __future__ import annotations

import argparse
from pathlib import Path

from rich.table import Table

from zooprune.cli.common import add_out, console, fail, write_json
from zooprune.integrations.lmms_eval.results import UNPRUNED  # pure JSON: light


def register(commands: argparse._SubParsersAction) -> None:
    report = commands.add_parser(
        "report",
        help="lmms-eval results of several runs as a table of scores and relative accuracy",
    )
    report.add_argument(
        "results", nargs="+", help="lmms-eval *_results.json files, or folders holding them"
    )
    report.add_argument(
        "--metric",
        action="append",
        default=[],
        metavar="TASK=METRIC",
        help="the metric to score a task by (default: the first lmms-eval reports)",
    )
    add_out(report, "out/report", "folder for report.md, report.json and report.png")
    report.set_defaults(handler=_report)


def _report(args: argparse.Namespace) -> int:
    from zooprune.integrations.lmms_eval.results import (
        compare,
        plot_summary,
        read_run,
        result_files,
    )
    from zooprune.viz import plot_accuracy

    metrics = dict(item.split("=", 1) for item in args.metric if "=" in item)
    if len(metrics) != len(args.metric):
        return fail("--metric takes TASK=METRIC")
    try:
        runs = compare([read_run(path, metrics) for path in result_files(args.results)])
    except (OSError, ValueError) as error:
        return fail(str(error))
    scored = sorted({task for run in runs for task in run.scores})
    for task in metrics:
        if task not in scored:
            return fail(f"--metric {task}: no run has task {task!r}; they have {', '.join(scored)}")
    tasks = list(runs[0].scores)
    header, rows = table_rows(runs, tasks)
    table = Table(title=f"{runs[0].pretrained}: score (relative to unpruned %)")
    for column in header:
        table.add_column(column, justify="left" if column == "condition" else "right")
    for row in rows:
        table.add_row(*row)
    console.print(table)
    console.print(
        "[dim]metrics: "
        + ", ".join(f"{task} {runs[0].metrics[task]}" for task in tasks)
        + "; avg relative: mean over tasks of score / unpruned score[/dim]"
    )
    shared = runs[0].averaged_over or []
    if len(shared) < len(scored):
        left_out = ", ".join(task for task in scored if task not in shared)
        console.print(
            f"avg relative over the {len(shared)} task{'s' * (len(shared) != 1)} every run "
            f"has ({', '.join(shared) or 'none'}); left out: {left_out}"
        )
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    markdown = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    markdown += ["| " + " | ".join(row) + " |" for row in rows]
    (out / "report.md").write_text("\n".join(markdown) + "\n")
    path = write_json(
        {
            "model": runs[0].pretrained,
            "metrics": runs[0].metrics,
            "runs": [
                {
                    "file": str(run.path),
                    "method": run.method,
                    "budget": run.budget,
                    "kept_tokens": run.kept_tokens,
                    "visual_tokens": run.visual_tokens,
                    "select_ms_per_image": run.select_ms,
                    "scores": run.scores,
                    "relative": run.relative,
                    "average_relative": run.average_relative,
                }
                for run in runs
            ],
        },
        out,
        "report.json",
    )
    plot = plot_accuracy(plot_summary(runs), out / "report.png", ylabel="relative accuracy %")
    console.print(f"wrote {out / 'report.md'}, {path} and {plot}")
    return 0


def table_rows(runs: list, tasks: list[str]) -> tuple[list[str], list[list[str]]]:
    """The report's header and rows: each task's score with its relative accuracy."""
    header = ["condition", "visual tokens kept", "selection ms / image", *tasks, "avg relative"]
    rows = []
    for run in runs:
        if run.kept_tokens is not None:
            kept = f"{run.kept_tokens:.1f} / {run.visual_tokens:.0f}"
        else:  # a pruned run without the plugin's record does not say what it kept
            kept = "all" if run.method == UNPRUNED else "no record"
        select = "" if run.select_ms is None else f"{run.select_ms:.2f}"
        cells = []
        for task in tasks:
            score = run.scores.get(task)
            if score is None:
                cells.append("-")
            else:
                relative = run.relative.get(task)
                rel = "" if relative is None else f" ({100 * relative:.1f}%)"
                cells.append(f"{score:.4g}{rel}")
        average = run.average_relative
        rows.append(
            [run.label, kept, select, *cells, "" if average is None else f"{100 * average:.1f}%"]
        )
    return header, rows
