"""The ``zooprune`` command: one module per command group, shared options in ``common``."""

from __future__ import annotations

import argparse
import sys

from zooprune import __version__
from zooprune.cli import bench, demo, load, methods, report, run, serve, speed, testbed


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="zooprune", description="Training-free visual-token pruning for VLMs."
    )
    parser.add_argument("--version", action="version", version=f"zooprune {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    for group in (run, methods, serve, load, speed, testbed, bench, demo, report):
        group.register(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    # `zooprune serve MODEL ... -- VLLM ARGS`: what follows `--` goes to the engine unchanged
    passthrough: list[str] = []
    if "--" in argv:
        cut = argv.index("--")
        argv, passthrough = argv[:cut], argv[cut + 1 :]
    parser = build_parser()
    args = parser.parse_args(argv)
    if passthrough and not hasattr(args, "passthrough"):
        parser.error(f"`zooprune {args.command}` takes no arguments after --")
    if passthrough:
        args.passthrough = passthrough
    return args.handler(args)
