"""``zooprune testbed train``: the bundled test-bed model's recipe, from its seed."""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

from zooprune.cli.common import add_out, add_threads, console, fail, families, positive_int


def register(commands: argparse._SubParsersAction) -> None:
    testbed = commands.add_parser("testbed", help="the bundled test-bed VLM")
    testbed_commands = testbed.add_subparsers(dest="testbed_command", required=True)
    train = testbed_commands.add_parser(
        "train", help="train the test-bed model from a seed (the recipe of the shipped one)"
    )
    add_out(train, "out/testbed", "run folder (resumed if present)")
    train.add_argument("--seed", type=int, default=0)
    add_threads(train, "the recipe's 2")
    train.set_defaults(handler=_testbed_train)

    task = testbed_commands.add_parser(
        "task", help="write test-bed questions as an offline lmms-eval task folder"
    )
    task.add_argument("out", help="the task folder (pass it to lmms-eval's --include_path)")
    task.add_argument("--split", choices=["train", "validation", "test"], default="test")
    task.add_argument(
        "--families",
        type=families,
        default=None,
        help="default: all seven, as `zooprune bench` scores",
    )
    task.add_argument("--n-per-family", type=positive_int, default=100)
    task.add_argument(
        "--max-new-tokens", type=positive_int, default=1, help="answer tokens generated (bench: 1)"
    )
    task.set_defaults(handler=_testbed_task)


def _testbed_train(args: argparse.Namespace) -> int:
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    from zooprune.testbed.train import TrainConfig, train

    config = TrainConfig(seed=args.seed)
    if args.threads:
        config = dataclasses.replace(config, threads=args.threads)
    out = Path(args.out)
    console.print(
        f"training the test-bed VLM into {out} (seed {config.seed}; "
        f"at most {config.vision_steps} vision + {config.joint_steps} joint steps; "
        "resumes from its checkpoint if one is there)"
    )
    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total}"),
        TimeElapsedColumn(),
        TextColumn("{task.fields[status]}"),
    )
    with Progress(*columns, console=console) as progress:
        vision = progress.add_task("vision", total=config.vision_steps, status="")
        joint = progress.add_task("joint", total=config.joint_steps, status="")

        def report(event: dict) -> None:
            kind = event["event"]
            if kind == "step":
                task = vision if event["phase"] == 1 else joint
                status = (
                    f"shape {event['shape_ema']:.3f}"
                    if event["phase"] == 1
                    else f"answer acc {event['answer_acc']:.2f}"
                )
                progress.update(task, completed=event["step"], status=status)
            elif kind == "vision_done":
                progress.update(vision, total=event["step"], completed=event["step"])
            elif kind == "resumed":
                if event["phase"] == 2:
                    progress.update(vision, total=1, completed=1, status="done before")
                task = vision if event["phase"] == 1 else joint
                progress.update(task, completed=event["step"])
            elif kind == "eval":
                families = " ".join(f"{f} {a:.2f}" for f, a in event["families"].items())
                # the collapse shows in the share first, before accuracy notices
                share = event["visual"]["mean_share"]
                drift = event.get("projector_drift") or 0.0
                progress.console.print(
                    f"[dim]{event['minutes']:.1f} min, joint step {event['step']}:[/dim] "
                    f"validation {event['overall']:.3f} ({families}); visual tokens' share "
                    f"of their mean {share:.3f}, projector moved {drift:.3f}"
                )

        path = train(config, out, report)
    console.print(f"saved {path}; learning curve in {out / 'curve.png'}")
    return 0


def _testbed_task(args: argparse.Namespace) -> int:
    from zooprune.integrations.lmms_eval.task import TASK, write_testbed_task

    if Path(args.out).exists() and not Path(args.out).is_dir():
        return fail(f"{args.out} is a file; the task is written into a folder")
    with console.status(f"writing {args.out}"):
        data = write_testbed_task(
            args.out,
            split=args.split,
            families=args.families,
            n_per_family=args.n_per_family,
            max_new_tokens=args.max_new_tokens,
        )
    count = len(data.read_text().splitlines())
    console.print(
        f"wrote {count} questions to {data.parent}: lmms-eval --include_path {data.parent} "
        f"--tasks {TASK}; the same questions for zooprune bench --data {data}"
    )
    return 0
