"""``zooprune demo``: one test-bed question, unpruned and pruned, and a picture of what was kept."""

from __future__ import annotations

import argparse
from pathlib import Path

from rich.table import Table

from zooprune.cli.common import (
    FAMILIES,
    add_out,
    add_threads,
    console,
    fraction,
    method_name,
    set_threads,
)


def register(commands: argparse._SubParsersAction) -> None:
    demo = commands.add_parser(
        "demo", help="one test-bed question, unpruned and pruned, with a picture of what was kept"
    )
    # The family the bundled checkpoint answers best, so the demo shows a working model.
    demo.add_argument("--family", default="shape", choices=list(FAMILIES))
    demo.add_argument("--index", type=int, default=0, help="which test question of the family")
    demo.add_argument("--method", type=method_name, default="zoo")
    demo.add_argument("--baseline", type=method_name, default="divprune")
    demo.add_argument("--ratio", type=fraction, default=1 / 9, help="fraction kept (default 1/9)")
    add_threads(demo)
    add_out(demo, "out/demo.png", "the picture")
    demo.set_defaults(handler=_demo)


def _demo(args: argparse.Namespace) -> int:
    import torch

    import zooprune
    from zooprune.bench.accuracy import is_correct
    from zooprune.testbed import scenes
    from zooprune.testbed.model import load_testbed
    from zooprune.viz import plot_selection, processed_image

    set_threads(args.threads)
    sample = scenes.make_sample("test", args.index, args.family)
    with console.status("loading the bundled test-bed model"):
        model, processor = load_testbed()
    image = sample.scene.to_pil()
    messages = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": sample.question}]}
    ]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    inputs = processor(images=[image], text=[prompt], return_tensors="pt")
    length = inputs["input_ids"].shape[1]

    def answer() -> str:
        with torch.no_grad():
            output = model.generate(**inputs, max_new_tokens=1, do_sample=False)
        return processor.batch_decode(output[:, length:], skip_special_tokens=True)[0].strip()

    console.print(f"[bold]question:[/bold] {sample.question}   [dim](truth: {sample.answer})[/dim]")
    table = Table()
    for column in ("visual tokens", "method", "answer", "correct"):
        table.add_column(column)
    unpruned = answer()
    total = inputs["input_ids"].eq(model.config.image_token_id).sum().item()
    table.add_row(
        f"{total} / {total}", "unpruned", unpruned, _mark(is_correct(unpruned, sample.answer))
    )
    selections = []
    said_by = {"unpruned": unpruned}
    for method in (args.method, args.baseline):
        with zooprune.prune(model, method, ratio=args.ratio) as handle:
            said = answer()
        sel = handle.selection.images[0]
        selections.append((method, sel))
        said_by[method] = said
        table.add_row(
            f"{sel.kept} / {sel.num_tokens}", method, said, _mark(is_correct(said, sample.answer))
        )
    console.print(table)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    images = processor.image_processor
    picture = processed_image(inputs["pixel_values"][0], images.image_mean, images.image_std)
    answers = ", ".join(f"{name}: {said}" for name, said in said_by.items())
    title = f"{sample.question} (truth: {sample.answer})\n{answers}"
    plot_selection(picture, selections, out, title=title)
    console.print(f"wrote {out}: the patches each method kept, and the scores it ranked by")
    return 0


def _mark(ok: bool) -> str:
    return "[green]yes[/green]" if ok else "[red]no[/red]"
