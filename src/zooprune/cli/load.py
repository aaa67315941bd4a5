"""``zooprune load``: a load-and-fault run against ``zooprune serve``
(:mod:`zooprune.integrations.vllm.load`), its counts as tables; exit status 1 when a check
fails."""

from __future__ import annotations

import argparse
from pathlib import Path

from zooprune.cli.common import console, fail, positive_int, vllm_missing


def register(commands: argparse._SubParsersAction) -> None:
    load = commands.add_parser(
        "load",
        help="send a load-and-fault mix to zooprune serve and check it (needs vLLM)",
        description="Start zooprune serve on MODEL (default: a tiny Qwen3-VL, random "
        "weights), send REQUESTS requests from CONCURRENCY threads, ROUNDS times (images of "
        "odd sizes and modes, several images, videos, requests' own settings, bad settings, "
        "malformed requests), watch /health and the server's resident memory, then answer a sample "
        "of the accepted requests again with the offline engine. Exit status 1 when a "
        "request is lost or misanswered, health fails, the engine changes, or a sampled "
        "answer differs.",
    )
    load.add_argument("--model", help="a local model folder a pruned variant serves")
    load.add_argument("--requests", type=positive_int, default=500)
    load.add_argument(
        "--rounds", type=positive_int, default=3, help="times the same mix is sent (default 3)"
    )
    load.add_argument("--concurrency", type=positive_int, default=32)
    load.add_argument(
        "--sample", type=positive_int, default=40, help="accepted answers checked offline"
    )
    load.add_argument("--seed", type=int, default=0)
    load.add_argument("--out", default="load-run", help="folder for load.json and the log")
    load.set_defaults(handler=_load)


def _load(args: argparse.Namespace) -> int:
    from zooprune.errors import PruneError
    from zooprune.integrations.vllm import served_architecture

    if args.model is not None:
        if not (Path(args.model) / "config.json").is_file():
            return fail(f"--model {args.model}: no config.json there (a local model folder)")
        try:
            served_architecture(args.model)
        except PruneError as error:
            return fail(str(error))
    if (status := vllm_missing("zooprune load")) is not None:
        return status
    from zooprune.integrations.vllm.load import LoadConfig, run_load

    config = LoadConfig(
        model=args.model,
        requests=args.requests,
        rounds=args.rounds,
        concurrency=args.concurrency,
        sample=args.sample,
        seed=args.seed,
    )
    result = run_load(config, args.out, echo=console.print)
    print_result(result)
    return 0 if result["passed"] else 1


def print_result(result: dict) -> None:
    from rich.table import Table

    title = (
        f"{result['requests']} requests ({result['rounds']} rounds) in {result['seconds']:.1f} s"
    )
    kinds = Table(title=title)
    kinds.add_column("kind -> HTTP status")
    kinds.add_column("requests", justify="right")
    for name, count in result["by kind and status"].items():
        kinds.add_row(name, str(count))
    console.print(kinds)
    checks = Table(title="checks")
    checks.add_column("check")
    checks.add_column("result", justify="right")
    for name, indices in result["wrong"].items():
        checks.add_row(name, str(len(indices)))
    checks.add_row("health checks (status: count)", str(result["health"]))
    checks.add_row("server alive at the end", str(result["server alive at the end"]))
    checks.add_row("engine processes unchanged", str(result["engine processes unchanged"]))
    memory = result["resident MiB"]
    checks.add_row(
        "server's resident MiB after each round (max)",
        f"{' / '.join(f'{mib:.0f}' for mib in memory['after each round'])} ({memory['max']:.0f})",
    )
    differing = result["sampled answers differing from the offline engine"]
    checks.add_row(
        "sampled answers differing from the offline engine",
        f"{len(differing)} of {result['sampled']}",
    )
    latency = result["latency s"]
    checks.add_row(
        "answered requests' latency s (median, p95)",
        f"{latency['median']:.2f}, {latency['p95']:.2f}",
    )
    console.print(checks)
    console.print("[green]passed[/green]" if result["passed"] else "[red]failed[/red]")
