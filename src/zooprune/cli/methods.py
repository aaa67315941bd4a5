"""``zooprune methods``: the registry, and the support matrix generated from it."""

from __future__ import annotations

import argparse

from rich.table import Table

from zooprune.cli.common import console


def register(commands: argparse._SubParsersAction) -> None:
    methods = commands.add_parser("methods", help="list the pruning methods")
    methods.add_argument(
        "--matrix", action="store_true", help="print the model x method support table (Markdown)"
    )
    methods.add_argument(
        "--vllm",
        action="store_true",
        help="print the table of the architectures vLLM serves pruned (Markdown)",
    )
    methods.set_defaults(handler=_methods)


def _methods(args: argparse.Namespace) -> int:
    from zooprune.select import METHODS

    if args.matrix:
        from zooprune.support import support_matrix

        print(support_matrix(), end="")
        return 0
    if args.vllm:
        from zooprune.integrations.vllm import served_table

        print(served_table(), end="")
        return 0
    table = Table(title="zooprune methods")
    table.add_column("method", style="bold")
    table.add_column("what it keeps")
    table.add_column("options (defaults)")
    for name, spec in sorted(METHODS.items()):
        options = ", ".join(f"{k}={v!r}" for k, v in spec.options.items()) or "-"
        table.add_row(name, spec.summary, options)
    console.print(table)
    return 0
