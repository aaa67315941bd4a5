"""The ``zooprune`` command: one module per command group, shared options in ``common``."""

from __future__ import annotations

import argparse

from zooprune.cli import bench, demo, methods, report, run, speed, testbed


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="zooprune", description="Training-free visual-token pruning for VLMs."
    )
    commands = parser.add_subparsers(dest="command", required=True)
    for group in (run, methods, speed, testbed, bench, demo, report):
        group.register(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.handler(args)
