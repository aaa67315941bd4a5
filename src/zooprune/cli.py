"""The ``zooprune`` command."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

console = Console()


def _methods(args: argparse.Namespace) -> int:
    from zooprune.select import METHODS

    table = Table(title="zooprune methods")
    table.add_column("method", style="bold")
    table.add_column("what it keeps")
    table.add_column("options (defaults)")
    for name, spec in sorted(METHODS.items()):
        options = ", ".join(f"{k}={v!r}" for k, v in spec.options.items()) or "-"
        table.add_row(name, spec.summary, options)
    console.print(table)
    return 0


class _Clock:
    """A logits processor that timestamps every decoding step without changing scores."""

    def __init__(self) -> None:
        self.stamps: list[float] = []

    def __call__(self, input_ids, scores):  # noqa: ANN001 (transformers' protocol)
        self.stamps.append(time.perf_counter())
        return scores


def _run(args: argparse.Namespace) -> int:
    import torch
    from PIL import Image
    from transformers import AutoModelForImageTextToText, AutoProcessor, LogitsProcessorList

    import zooprune

    if (args.keep is None) == (args.ratio is None):
        args.keep = 64 if args.ratio is None else None
    image_path = Path(args.image)
    if not image_path.is_file():
        console.print(f"[red]no such image file: {image_path}[/red]")
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[
        args.dtype
    ]
    with console.status(f"loading {args.model}"):
        processor = AutoProcessor.from_pretrained(args.model)
        model = AutoModelForImageTextToText.from_pretrained(args.model, dtype=dtype).eval()
    image = Image.open(image_path).convert("RGB")
    prompt = args.prompt
    token = getattr(processor, "image_token", "<image>")
    if token not in prompt:
        prompt = f"{token} {prompt}"
    inputs = processor(images=[image], text=[prompt], return_tensors="pt")
    inputs["pixel_values"] = inputs["pixel_values"].to(dtype)
    options = dict(_parse_option(o) for o in args.option)
    try:
        handle = zooprune.prune(
            model,
            args.method,
            keep=args.keep,
            ratio=args.ratio,
            positions=args.positions,
            **options,
        )
    except zooprune.PruneError as error:
        console.print(f"[red]{error}[/red]")
        return 2
    clock = _Clock()
    try:
        with console.status(f"generating with {args.method}"), torch.no_grad():
            start = time.perf_counter()
            output = model.generate(
                **inputs,
                max_new_tokens=args.max_new_tokens,
                do_sample=False,
                logits_processor=LogitsProcessorList([clock]),
            )
            end = time.perf_counter()
    except zooprune.PruneError as error:
        console.print(f"[red]{error}[/red]")
        return 2
    finally:
        handle.remove()
    prompt_length = inputs["input_ids"].shape[1]
    answer = processor.batch_decode(output[:, prompt_length:], skip_special_tokens=True)[0]
    selection = handle.selection
    new_tokens = output.shape[1] - prompt_length
    prefill = clock.stamps[0] - start - selection.encode_seconds - selection.select_seconds
    # Steps after the first each cost one cached forward; with one token there is none.
    decode = (end - clock.stamps[0]) / (new_tokens - 1) if new_tokens > 1 else None
    answer = answer.strip() or f"[dim](no text: the model ended after {new_tokens} token(s))[/dim]"
    console.print(f"[bold]answer:[/bold] {answer}")
    table = Table(show_header=True)
    for column in (
        "method",
        "visual tokens kept",
        "vision encode",
        "selection",
        "prefill",
        "decode / token",
    ):
        table.add_column(column)
    table.add_row(
        args.method,
        f"{selection.kept} / {selection.total}",
        f"{selection.encode_seconds * 1e3:.1f} ms",
        f"{selection.select_seconds * 1e3:.1f} ms",
        f"{prefill * 1e3:.1f} ms",
        "-" if decode is None else f"{decode * 1e3:.1f} ms",
    )
    console.print(table)
    console.print(
        f"[dim]{new_tokens} new tokens, {args.dtype}, {torch.get_num_threads()} threads[/dim]"
    )
    return 0


def _parse_option(text: str) -> tuple[str, object]:
    if "=" not in text:
        raise SystemExit(f"--option takes NAME=VALUE, got {text!r}")
    name, value = text.split("=", 1)
    for convert in (int, float):
        try:
            return name, convert(value)
        except ValueError:
            pass
    return name, value


def _tiny(args: argparse.Namespace) -> int:
    from zooprune.tiny import save_tiny_llava

    path = save_tiny_llava(args.path, seed=args.seed)
    console.print(f"saved a tiny random LLaVA and its processor to {path}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="zooprune", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    run = commands.add_parser(
        "run", help="answer a prompt about an image with pruned visual tokens"
    )
    run.add_argument("--model", required=True, help="a local folder or hub id of a supported VLM")
    run.add_argument("--image", required=True, help="an image file")
    run.add_argument("--prompt", required=True, help="the question; <image> is prepended if absent")
    run.add_argument(
        "--method", default="zoo", help="a method from `zooprune methods` (default zoo)"
    )
    budget = run.add_mutually_exclusive_group()
    budget.add_argument("--keep", type=int, help="visual tokens kept per image (default 64)")
    budget.add_argument("--ratio", type=float, help="fraction of visual tokens kept per image")
    run.add_argument("--positions", choices=["compact", "original"], default="compact")
    run.add_argument("--max-new-tokens", type=int, default=32)
    run.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32")
    run.add_argument("--threads", type=int, default=0, help="torch CPU threads (default: torch's)")
    run.add_argument(
        "--option", action="append", default=[], metavar="NAME=VALUE", help="a method option"
    )
    run.set_defaults(handler=_run)

    methods = commands.add_parser("methods", help="list the pruning methods")
    methods.set_defaults(handler=_methods)

    tiny = commands.add_parser("tiny", help="save a tiny random LLaVA to try the commands on")
    tiny.add_argument("path")
    tiny.add_argument("--seed", type=int, default=0)
    tiny.set_defaults(handler=_tiny)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.handler(args)


if __name__ == "__main__":
    sys.exit(main())
