"""``zooprune run`` (one image, one prompt, pruned) and ``zooprune tiny`` (a model to try)."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from rich.table import Table

from zooprune.cli.common import (
    add_dtype,
    add_method_and_budget,
    add_threads,
    console,
    fail,
    load_model,
    resolve_dtype,
    set_threads,
    settings_from,
)


def register(commands: argparse._SubParsersAction) -> None:
    run = commands.add_parser(
        "run", help="answer a prompt about an image with pruned visual tokens"
    )
    run.add_argument("--model", required=True, help="a local folder or hub id of a supported VLM")
    run.add_argument("--image", required=True, help="an image file")
    run.add_argument("--prompt", required=True, help="the question; <image> is prepended if absent")
    add_method_and_budget(run)
    run.add_argument(
        "--positions",
        choices=["compact", "original"],
        default=None,
        help="position ids of the shortened prompt (default: the family's; M-RoPE: original)",
    )
    run.add_argument("--max-new-tokens", type=int, default=32)
    add_dtype(run, "float32")
    add_threads(run)
    run.add_argument("--show", metavar="PNG", help="draw the kept patches and scores to this file")
    run.set_defaults(handler=_run)

    tiny = commands.add_parser("tiny", help="save a tiny random LLaVA to try the commands on")
    tiny.add_argument("path")
    tiny.add_argument("--seed", type=int, default=0)
    tiny.set_defaults(handler=_tiny)


def _run(args: argparse.Namespace) -> int:
    import torch
    from PIL import Image
    from transformers import LogitsProcessorList

    import zooprune
    from zooprune.bench.timing import StepClock

    if (args.keep is None) == (args.ratio is None):
        args.keep = 64 if args.ratio is None else None
    image_path = Path(args.image)
    if not image_path.is_file():
        return fail(f"no such image file: {image_path}")
    set_threads(args.threads)
    model, processor = load_model(args.model, args.dtype)
    image = Image.open(image_path).convert("RGB")
    prompt = args.prompt
    token = getattr(processor, "image_token", "<image>")
    if token not in prompt:
        prompt = f"{token} {prompt}"
    inputs = processor(images=[image], text=[prompt], return_tensors="pt")
    inputs["pixel_values"] = inputs["pixel_values"].to(model.dtype)
    try:
        handle = zooprune.prune(model, **settings_from(args).kwargs())
    except zooprune.PruneError as error:
        return fail(str(error))
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
        return fail(str(error))
    finally:
        handle.remove()
    prompt_length = inputs["input_ids"].shape[1]
    answer = processor.batch_decode(output[:, prompt_length:], skip_special_tokens=True)[0]
    selection = handle.selection
    new_tokens = output.shape[1] - prompt_length
    # An in-LM method (fastv) ranks during the prefill: its selection time is part of it.
    in_lm = "lm_stage" in handle.selector.needs
    prefill = clock.stamps[0] - start - selection.encode_seconds
    if not in_lm:
        prefill -= selection.select_seconds
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
        f"{selection.select_seconds * 1e3:.1f} ms" + (" (in prefill)" if in_lm else ""),
        f"{prefill * 1e3:.1f} ms",
        "-" if decode is None else f"{decode * 1e3:.1f} ms",
    )
    console.print(table)
    console.print(
        f"[dim]{new_tokens} new tokens, {resolve_dtype(args.dtype)}, "
        f"{torch.get_num_threads()} threads[/dim]"
    )
    if args.show:
        console.print(f"wrote {_draw(args, processor, inputs, image, selection)}")
    return 0


def _draw(args, processor, inputs, image, selection) -> Path:
    """The kept tokens over the image (one crop) or over each crop's region."""
    from zooprune.viz import plot_regions, plot_selection, processed_image

    chosen = selection.images[0]
    pixels = inputs["pixel_values"][0]
    if pixels.dim() == 3 and len(chosen.patch_grids) <= 1 and chosen.boxes is None:
        # The image exactly as the tower saw it, under its own patch grid.
        images = processor.image_processor
        picture = processed_image(pixels, images.image_mean, images.image_std)
        return plot_selection(picture, [(args.method, chosen)], args.show)
    return plot_regions(image, chosen, args.show, title=args.method)


def _tiny(args: argparse.Namespace) -> int:
    from zooprune.tiny import save_tiny_llava

    path = save_tiny_llava(args.path, seed=args.seed)
    console.print(f"saved a tiny random LLaVA and its processor to {path}")
    return 0
