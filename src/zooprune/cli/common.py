"""What the command groups share: the console, the options declared once, argument types
checked through the registries, progress, and JSON output."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rich.console import Console

if TYPE_CHECKING:
    from zooprune.settings import Settings

# Kept in step with zooprune.testbed.scenes.FAMILIES (a test checks), so that
# `zooprune --help` does not import numpy and the scene generator.
FAMILIES = ("color", "shape", "count", "exists", "spatial", "location", "glyph")
DTYPES = ("auto", "float32", "bfloat16", "float16")

# Piped or logged, a table keeps its natural width: rich would squeeze it into 80
# columns and cut its cells ("scori…").
console = Console(width=None if sys.stdout.isatty() else 1000)


def fail(message: str) -> int:
    """Print an error the user can act on; the exit status of a refused request."""
    from rich.markup import escape

    # escaped: messages quote user input, e.g. a method variant's brackets
    console.print(f"[red]{escape(message)}[/red]")
    return 2


# -- shared options ------------------------------------------------------------------------


def add_threads(parser: argparse.ArgumentParser, default_note: str = "torch's") -> None:
    parser.add_argument(
        "--threads", type=int, default=0, help=f"torch CPU threads (default: {default_note})"
    )


def vllm_missing(what: str) -> int | None:
    """:func:`fail`'s status, saying how to get vLLM, when ``what`` needs it and this
    environment lacks it; else None."""
    import importlib.util

    if importlib.util.find_spec("vllm") is not None:
        return None
    return fail(
        f"{what} needs vLLM, which this environment lacks: `pip install 'zooprune[vllm]'` on "
        "a GPU machine, `make vllm-install` (.venv-vllm, the CPU build this repository tests "
        "against) on a CPU"
    )


def add_method_and_budget(parser: argparse.ArgumentParser) -> None:
    """``--method``, ``--keep`` or ``--ratio``, and ``--option NAME=VALUE``: one pruning."""
    parser.add_argument(
        "--method", type=method_name, default="zoo", help="a method from `zooprune methods`"
    )
    budget = parser.add_mutually_exclusive_group()
    budget.add_argument("--keep", type=int, help="visual tokens kept per image (default 64)")
    budget.add_argument("--ratio", type=float, help="fraction of visual tokens kept per image")
    parser.add_argument(
        "--option", action="append", default=[], metavar="NAME=VALUE", help="a method option"
    )


def settings_from(args: argparse.Namespace, default_keep: int | None = None) -> Settings:
    """The pruning settings of ``--method``, ``--keep`` / ``--ratio``, ``--positions``
    (where the command has it) and ``--option`` (checked where they are used)."""
    from zooprune.settings import Settings  # torch: only once a command runs (fast --help)

    keep = args.keep
    if keep is None and args.ratio is None:
        keep = default_keep
    return Settings(
        args.method,
        keep,
        args.ratio,
        getattr(args, "positions", None),
        dict(parse_option(o) for o in args.option),
    )


def add_dtype(parser: argparse.ArgumentParser, default: str) -> None:
    parser.add_argument(
        "--dtype",
        choices=DTYPES,
        default=default,
        help=f"model dtype; auto: bfloat16 where the hardware computes it natively, else "
        f"float32 (default {default})",
    )


def add_out(parser: argparse.ArgumentParser, default: str, what: str) -> None:
    parser.add_argument("--out", default=default, help=f"{what} (default {default})")


def set_threads(threads: int) -> None:
    if threads:
        import torch

        torch.set_num_threads(threads)


def resolve_dtype(dtype: str, device: str = "cpu") -> str:
    """``auto`` made concrete for ``device``."""
    if dtype != "auto":
        return dtype
    from zooprune.bench.timing import fast_dtype

    return fast_dtype(device)


# -- argument types ------------------------------------------------------------------------


def method_name(text: str) -> str:
    """A registered method name; the error lists the known ones."""
    from zooprune.select import METHODS

    if text not in METHODS:
        raise argparse.ArgumentTypeError(
            f"unknown method {text!r}; known methods: {', '.join(sorted(METHODS))}"
        )
    return text


def method_specs(text: str) -> list[str | tuple[str, dict[str, object]]]:
    """``zoo,zoo[estimator=zo,num_directions=16],divprune`` -> registered method names, and
    ``(name, options)`` for a bracketed variant (values spelled as for ``--option``)."""
    from zooprune.settings import GENERAL  # here, as method_name's registry: --help stays light

    parts, depth, start = [], 0, 0
    for at, char in enumerate(text + ","):
        depth += {"[": 1, "]": -1}.get(char, 0)
        if depth < 0 or depth > 1:
            raise argparse.ArgumentTypeError(f"unbalanced brackets in {text!r}")
        if char == "," and depth == 0:
            parts.append(text[start:at])
            start = at + 1
    if depth:
        raise argparse.ArgumentTypeError(f"unbalanced brackets in {text!r}")
    specs: list[str | tuple[str, dict[str, object]]] = []
    for part in filter(None, parts):
        name, bracket, rest = part.partition("[")
        if not bracket:
            specs.append(method_name(name))
            continue
        if not rest.endswith("]") or not rest[:-1]:
            raise argparse.ArgumentTypeError(
                f"a method variant is NAME[OPTION=VALUE,...], got {part!r}"
            )
        pairs = [item.split("=", 1) for item in rest[:-1].split(",")]
        if any(len(pair) != 2 or not pair[0] for pair in pairs):
            raise argparse.ArgumentTypeError(f"options in {part!r} take NAME=VALUE")
        general = [key for key, _ in pairs if key in GENERAL]
        if general:
            raise argparse.ArgumentTypeError(
                f"{part}: {general[0]!r} is not an option of a method variant (the bench sets "
                "the method, the budgets and the positions; a variant changes its method's "
                "options)"
            )
        specs.append((method_name(name), dict(parse_option("=".join(p)) for p in pairs)))
    if not specs:
        raise argparse.ArgumentTypeError(f"no method named in {text!r}")
    return specs


def parse_option(text: str) -> tuple[str, object]:
    """``--option NAME=VALUE``: booleans, integers and floats by their spelling."""
    if "=" not in text:
        raise SystemExit(f"--option takes NAME=VALUE, got {text!r}")
    name, value = text.split("=", 1)
    if value in ("True", "False"):
        return name, value == "True"
    for convert in (int, float):
        try:
            return name, convert(value)
        except ValueError:
            pass
    return name, value


def names(text: str) -> list[str]:
    """``a,b,c`` -> ``["a", "b", "c"]`` (empty parts dropped)."""
    return [part for part in text.split(",") if part]


def families(text: str) -> list[str]:
    """Test-bed question families, comma-separated."""
    chosen = names(text)
    unknown = [f for f in chosen if f not in FAMILIES]
    if unknown:
        raise argparse.ArgumentTypeError(
            f"unknown families {unknown}; the test bed has {', '.join(FAMILIES)}"
        )
    twice = [f for i, f in enumerate(chosen) if f in chosen[:i]]
    if twice:
        raise argparse.ArgumentTypeError(f"{twice[0]!r} named twice in {text!r}")
    return chosen


def fraction(text: str) -> float:
    """``0.25``, ``25%`` or ``1/9``, in (0, 1)."""
    text = text.strip()
    try:
        if text.endswith("%"):
            value = float(text[:-1]) / 100
        elif "/" in text:
            numerator, denominator = text.split("/", 1)
            value = float(numerator) / float(denominator)
        else:
            value = float(text)
    except (ValueError, ZeroDivisionError):
        raise argparse.ArgumentTypeError(
            f"not a fraction: {text!r} (try 0.11, 11% or 1/9)"
        ) from None
    if not 0 < value < 1:
        raise argparse.ArgumentTypeError(f"a fraction kept must lie in (0, 1), got {text}")
    return value


def fractions(text: str) -> tuple[float, ...]:
    return tuple(fraction(part) for part in text.split(",") if part.strip())


def positive_int(text: str) -> int:
    """An argparse type: an int of at least 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an int, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected at least 1, got {value}")
    return value


def budgets(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"budgets are comma-separated ints, got {text!r}"
        ) from None


# -- progress and output -------------------------------------------------------------------


def with_progress(title: str, run: Callable[[Callable[[str], None]], dict]) -> dict:
    """Run ``run(report)`` under a spinner that shows what ``report`` last said."""
    from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    columns = (SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn())
    with Progress(*columns, console=console, transient=True) as progress:
        task = progress.add_task(title)
        return run(lambda text: progress.update(task, description=text))


def write_json(result: dict, out: Path, name: str) -> Path:
    import json

    out.mkdir(parents=True, exist_ok=True)
    path = out / name
    path.write_text(json.dumps(result, indent=2, default=str))
    return path


def machine_line(result: dict) -> str:
    m = result["machine"]
    return f"{m['cpu']}, {m['torch_threads']} threads, torch {m['torch']}" + (
        f", {m['gpu']}" if "gpu" in m else ""
    )


def load_model(name: str, dtype: str) -> tuple[Any, Any]:
    """A VLM and its processor from a folder or hub id, in eval mode, in ``dtype``."""
    import torch
    from transformers import AutoModelForImageTextToText, AutoProcessor

    with console.status(f"loading {name}"):
        processor = AutoProcessor.from_pretrained(name)
        model = AutoModelForImageTextToText.from_pretrained(
            name, dtype=getattr(torch, resolve_dtype(dtype))
        ).eval()
    return model, processor
