"""The ``zooprune`` command."""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path

from rich.console import Console
from rich.table import Table

console = Console()


def _methods(args: argparse.Namespace) -> int:
    from zooprune.select import METHODS

    if args.matrix:
        from zooprune.adapters import support_matrix

        print(support_matrix(), end="")
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
    _set_threads(args.threads)
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
    from zooprune.bench.timing import StepClock

    clock = StepClock()
    try:
        with console.status(f"generating with {args.method}"), torch.no_grad():
            start = time.perf_counter()
            output = model.generate(
                **inputs,
                max_new_tokens=args.max_new_tokens,
                do_sample=False,
                logits_processor=LogitsProcessorList([clock]),
            )
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
    decode = clock.per_step()
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
    if args.show:
        from zooprune.viz import plot_selection, processed_image

        images = processor.image_processor
        picture = processed_image(inputs["pixel_values"][0], images.image_mean, images.image_std)
        path = plot_selection(picture, [(args.method, selection.images[0])], args.show)
        console.print(f"wrote {path}")
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


def _budgets(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"budgets are comma-separated ints, got {text!r}"
        ) from None


def _write_json(result: dict, out: Path, name: str) -> Path:
    import json

    out.mkdir(parents=True, exist_ok=True)
    path = out / name
    path.write_text(json.dumps(result, indent=2, default=str))
    return path


def _machine_line(result: dict) -> str:
    m = result["machine"]
    return f"{m['cpu']}, {m['torch_threads']} threads, torch {m['torch']}" + (
        f", {m['gpu']}" if "gpu" in m else ""
    )


def _with_progress(title: str, run: Callable[[Callable[[str], None]], dict]) -> dict:
    """Run ``run(report)`` under a spinner that shows what ``report`` last said."""
    from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    columns = (SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn())
    with Progress(*columns, console=console, transient=True) as progress:
        task = progress.add_task(title)
        return run(lambda text: progress.update(task, description=text))


def _set_threads(threads: int) -> None:
    if threads:
        import torch

        torch.set_num_threads(threads)


def _speed(args: argparse.Namespace) -> int:
    from zooprune.bench.speed import SpeedConfig, run_speed_benchmark
    from zooprune.viz import plot_speed

    config = SpeedConfig(
        model=args.model,
        budgets=args.budgets,
        method=args.method,
        dtype=args.dtype,
        new_tokens=args.new_tokens,
        repeats=args.repeats,
        warmup=args.warmup,
        device=args.device,
    )
    _set_threads(args.threads)
    result = _with_progress("speed benchmark", lambda report: run_speed_benchmark(config, report))
    ms = lambda seconds: f"{seconds * 1e3:.1f}"  # noqa: E731
    times = Table(title=f"zooprune speed: {result['model']} (ms)")
    ratios = Table(title="speed-up over unpruned, and sizes")
    for column in (
        "kept",
        "vision",
        "scoring",
        "greedy",
        "prefill",
        "decode/tok",
        f"LM gen {config.new_tokens}",
        "end-to-end",
        "first token",
    ):
        times.add_column(column, justify="right")
    for column in (
        "kept",
        "prefill x",
        "LM gen + selection x",
        "end-to-end x",
        "KV cache MB",
        "prompt length",
        "LM prefill GFLOP",
    ):
        ratios.add_column(column, justify="right")
    for row in result["rows"]:
        kept = f"{row['keep']}/{result['visual_tokens']}"
        times.add_row(
            kept,
            *[
                ms(row[key])
                for key in (
                    "encode_s",
                    "scoring_s",
                    "greedy_s",
                    "prefill_s",
                    "decode_per_token_s",
                    "generate_s",
                    "end_to_end_s",
                    "time_to_first_token_s",
                )
            ],
        )
        ratios.add_row(
            kept,
            f"{row['prefill_speedup']:.2f}",
            f"{row['generate_speedup_with_selection']:.2f}",
            f"{row['end_to_end_speedup']:.2f}",
            f"{row['kv_cache_bytes'] / 2**20:.1f}",
            str(row["sequence_length"]),
            f"{row['flops']['lm_prefill'] / 1e9:.1f}",
        )
    console.print(times)
    console.print(ratios)
    for keep, share in result["selection_share_of_unpruned_prefill"].items():
        seven_b = result["analytic_7b"]["exact_scoring_plus_greedy_share"].get(keep)
        extra = (
            f"; analytic, exact scoring + greedy vs a LLaVA-1.5-7B prefill: {seven_b:.3%}"
            if seven_b
            else ""
        )
        console.print(f"keep {keep}: selection = {share:.2%} of the unpruned prefill{extra}")
    console.print(
        f"[dim]{result['dtype']}, method {result['method']}, medians of {config.repeats} after "
        f"{config.warmup} warm-up; {_machine_line(result)}[/dim]"
    )
    path = _write_json(result, Path(args.out), "speed.json")
    plot = plot_speed(result, Path(args.out) / "speed.png")
    console.print(f"wrote {path} and {plot}")
    return 0


def _speed_kernels(args: argparse.Namespace) -> int:
    from zooprune.bench.kernels import KernelBenchConfig, run_kernel_benchmark

    config = KernelBenchConfig(
        tokens=args.tokens,
        vision_dim=args.vision_dim,
        hidden_dim=args.hidden_dim,
        text_dim=args.text_dim,
        budgets=args.budgets,
        images=args.images,
        num_directions=args.num_directions,
        token_scale=args.token_scale,
        device=args.device,
    )
    _set_threads(args.threads)
    result = _with_progress("kernel benchmark", lambda report: run_kernel_benchmark(config, report))
    table = Table(
        title=f"sensitivity estimators: N={config.tokens}, projector {config.vision_dim} -> "
        f"{config.hidden_dim} -> {config.text_dim}, {config.images} images"
    )
    for column in (
        "estimator",
        "ms / image",
        "speed-up vs zo",
        "Spearman vs zo",
        *[f"top-{k} overlap" for k in config.budgets],
    ):
        table.add_column(column, justify="right")
    for row in result["estimators"]:
        table.add_row(
            row["estimator"],
            f"{row['seconds_per_image'] * 1e3:.1f}",
            f"{row['speedup_vs_zo']:.1f}",
            f"{row['spearman_vs_zo']:.4f}",
            *[f"{row[f'top{k}_overlap_vs_zo']:.3f}" for k in config.budgets],
        )
    console.print(table)
    gram_ms = result["setup"]["exact_gram_kernel_s"] * 1e3
    console.print(
        f"one-off per model (cached): exact's Gram kernel {gram_ms:.0f} ms, lowrank's SVD "
        f"{result['setup']['lowrank_svd_s'] * 1e3:.0f} ms; zo: m={config.num_directions}, "
        f"h=0.01, float32; jvp and lowrank use zo's direction bank, zo-reseeded another one "
        f"(zo's own sampling noise); features: N(0, 1)"
        + (f" x log-normal({config.token_scale}) per token" if config.token_scale else "")
    )
    greedy = Table(title="greedy selection vs the naive re-slicing loop")
    for column in (
        "k",
        "ours ms",
        "naive ms",
        "speed-up",
        "distance matrix ms",
        "ours loop ms",
        "naive loop ms",
        "loop speed-up",
        "same picks",
    ):
        greedy.add_column(column, justify="right")
    for row in result["greedy"]:
        greedy.add_row(
            str(row["k"]),
            f"{row['ours_s'] * 1e3:.2f}",
            f"{row['naive_reslice_s'] * 1e3:.2f}",
            f"{row['speedup']:.1f}",
            f"{row['distance_matrix_s'] * 1e3:.2f}",
            f"{row['ours_loop_s'] * 1e3:.2f}",
            f"{row['naive_loop_s'] * 1e3:.2f}",
            f"{row['loop_speedup']:.1f}",
            str(row["same_selection"]),
        )
    console.print(greedy)
    console.print(f"[dim]float32, medians; {_machine_line(result)}[/dim]")
    path = _write_json(result, Path(args.out), "kernels.json")
    console.print(f"wrote {path}")
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
    run.add_argument("--show", metavar="PNG", help="draw the kept patches and scores to this file")
    run.add_argument(
        "--option", action="append", default=[], metavar="NAME=VALUE", help="a method option"
    )
    run.set_defaults(handler=_run)

    methods = commands.add_parser("methods", help="list the pruning methods")
    methods.add_argument(
        "--matrix", action="store_true", help="print the model x method support table (Markdown)"
    )
    methods.set_defaults(handler=_methods)

    speed = commands.add_parser("speed", help="time unpruned vs pruned end to end, per budget")
    speed.add_argument("--model", default=None, help="default: a LLaVA-1.5-shaped random model")
    speed.add_argument("--budgets", type=_budgets, default=(192, 128, 64))
    speed.add_argument("--method", default="zoo")
    speed.add_argument(
        "--dtype",
        choices=["auto", "float32", "bfloat16", "float16"],
        default="auto",
        help="auto: bfloat16 where the hardware computes it natively, else float32",
    )
    speed.add_argument("--new-tokens", type=int, default=20)
    speed.add_argument("--repeats", type=int, default=3)
    speed.add_argument("--warmup", type=int, default=1)
    speed.add_argument("--device", default="cpu")
    speed.add_argument("--threads", type=int, default=0)
    speed.add_argument("--out", default="out/speed", help="folder for speed.json and speed.png")
    speed.set_defaults(handler=_speed)

    kernels = commands.add_parser(
        "speed-kernels", help="time the sensitivity estimators and greedy selection alone"
    )
    kernels.add_argument("--tokens", type=int, default=576)
    kernels.add_argument("--vision-dim", type=int, default=1024)
    kernels.add_argument("--hidden-dim", type=int, default=4096)
    kernels.add_argument("--text-dim", type=int, default=4096)
    kernels.add_argument("--budgets", type=_budgets, default=(64, 128, 192))
    kernels.add_argument("--images", type=int, default=4)
    kernels.add_argument("--num-directions", type=int, default=64)
    kernels.add_argument(
        "--token-scale", type=float, default=0.0, help="sigma of a log-normal per-token scale"
    )
    kernels.add_argument("--device", default="cpu")
    kernels.add_argument("--threads", type=int, default=0)
    kernels.add_argument("--out", default="out/speed")
    kernels.set_defaults(handler=_speed_kernels)

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
