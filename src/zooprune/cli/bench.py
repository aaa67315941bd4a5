"""``zooprune bench``: accuracy against the token budget, per method and question family."""

from __future__ import annotations

import argparse
from pathlib import Path

from rich.markup import escape
from rich.table import Table

from zooprune.cli.common import (
    FAMILIES,
    add_dtype,
    add_out,
    add_threads,
    console,
    fail,
    families,
    fractions,
    load_model,
    method_specs,
    set_threads,
    vllm_missing,
)


def register(commands: argparse._SubParsersAction) -> None:
    bench = commands.add_parser(
        "bench", help="accuracy vs token budget for every method, per question family"
    )
    bench.add_argument("--model", help="a VLM folder or hub id (default: the bundled test bed)")
    bench.add_argument("--data", help='JSON lines {"image", "question", "answer"[, "family"]}')
    bench.add_argument(
        "--engine",
        choices=["hf", "vllm"],
        default="hf",
        help="hf: generate() with a pruning handle; vllm: the vLLM plugin (needs vLLM)",
    )
    bench.add_argument(
        "--methods",
        type=method_specs,
        default=None,
        help="default: every one the model can run (those skipped are named); "
        "NAME[OPTION=VALUE,...] benches a variant, e.g. 'zoo[estimator=zo,num_directions=16]'",
    )
    bench.add_argument(
        "--ratios",
        type=fractions,
        default=None,
        help="fractions of the visual tokens kept (default 1/3,2/9,1/9,1/18)",
    )
    bench.add_argument("--n-per-family", type=int, default=0, help="test-bed questions per family")
    bench.add_argument(
        "--families",
        type=families,
        default=None,
        help="test-bed families (default: all seven)",
    )
    bench.add_argument("--quick", action="store_true", help="12 questions per family")
    bench.add_argument("--limit", type=int, default=0, help="first N questions of --data")
    bench.add_argument("--prompt", help="template with {image} and {question} (default: chat)")
    bench.add_argument("--max-new-tokens", type=int, default=0)
    bench.add_argument("--batch-size", type=int, default=32)
    add_dtype(bench, "float32")
    bench.add_argument(
        "--match",
        choices=["flops"],
        help="flops: also run every method that drops tokens inside the LM (fastv) at the "
        "budget where its LM prefill FLOPs equal the pre-LLM methods' at each ratio",
    )
    bench.add_argument("--seed", type=int, default=0)
    add_threads(bench)
    add_out(bench, "out/bench", "results folder (resumed if present)")
    bench.set_defaults(handler=_bench)


def _bench(args: argparse.Namespace) -> int:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from zooprune.bench.accuracy import (
        DEFAULT_RATIOS,
        jsonl_items,
        prefill_cost,
        run_accuracy,
        testbed_items,
    )
    from zooprune.bench.timing import machine
    from zooprune.select import METHODS
    from zooprune.viz import plot_accuracy, plot_accuracy_flops

    if args.data is not None and args.model is None:
        return fail("--data needs --model (the test bed answers its own questions)")
    if args.data is not None and args.families:
        return fail("--families chooses test-bed questions; --data brings its own")
    methods = args.methods or sorted(METHODS)  # the hf engine narrows it to the model's
    if args.engine == "vllm":
        from zooprune.integrations.vllm import served_methods

        # by default what vLLM serves: visionzip needs the CLS attention its towers hide,
        # cdpruner the prompt's text embeddings, which the plugin does not compute
        methods = args.methods or served_methods()
        from zooprune.bench.accuracy import method_parts

        names = {method_parts(spec)[0] for spec in methods}
        refused = sorted(names - set(served_methods()))
        if refused:
            return fail(
                f"vLLM cannot serve {', '.join(refused)} (it gives methods neither the CLS "
                "attention nor the prompt's text embeddings); "
                f"it serves {', '.join(served_methods())}"
            )
    ratios = args.ratios or DEFAULT_RATIOS
    n = args.n_per_family or (12 if args.quick else 100)
    set_threads(args.threads)
    try:
        items = (
            jsonl_items(args.data)
            if args.data
            else testbed_items(n, "test", args.families or list(FAMILIES))
        )
    except (OSError, ValueError) as error:
        return fail(str(error))
    if args.data and args.limit:
        items = items[: args.limit]
    max_new = args.max_new_tokens or (1 if args.data is None else 16)
    answerer = None
    if args.engine == "vllm":
        if (status := vllm_missing("--engine vllm")) is not None:
            return status
        from transformers import AutoConfig

        from zooprune.integrations.vllm.accuracy import VllmAnswerer

        model, name = _folder_for_bench(args)
        if not model.is_dir():
            return fail(f"--engine vllm takes a local model folder; no folder {model}")
        answerer = VllmAnswerer(
            model, prompt_template=args.prompt, max_new_tokens=max_new, dtype=args.dtype
        )
        processor = answerer.processor
        config = AutoConfig.from_pretrained(model)
    else:
        model, processor, name = _load_for_bench(args)
        methods, refused = runnable_methods(model, methods)
        if args.methods and refused:  # asked for by name: say why not
            return fail(next(iter(refused.values())))
        if not methods:
            return fail(f"no method can run on this model: {next(iter(refused.values()))}")
        if refused:
            console.print(
                f"[dim]skipped {escape(', '.join(refused))}: this model cannot run them "
                "(--methods NAME says why)[/dim]"
            )
        config = model.config
    try:
        cost = prefill_cost(config, processor, items, args.prompt)
    except ValueError as error:  # a config without an image token id: no FLOPs column
        if args.match:
            return fail(f"--match flops cannot count this model's prompts: {error}")
        cost = None
    out = Path(args.out)
    total = (1 + len(methods) * len(ratios)) * -(-len(items) // args.batch_size)
    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
    )
    finished: dict[str, int] = {}
    with Progress(*columns, console=console, transient=True) as progress:
        task = progress.add_task("accuracy", total=total)

        def report(condition: str, done: int, batches: int) -> None:
            finished[condition] = done
            progress.update(task, completed=sum(finished.values()), description=escape(condition))

        summary = run_accuracy(
            model,
            processor,
            items,
            out,
            methods,
            ratios,
            model_name=name,
            batch_size=args.batch_size,
            max_new_tokens=max_new,
            prompt_template=args.prompt,
            seed=args.seed,
            on_progress=report,
            engine=args.engine,
            answerer=answerer,
            cost=cost,
            match_flops=args.match == "flops",
        )
    if answerer is not None:
        answerer.close()
    _print_accuracy(summary)
    plot = plot_accuracy(summary, out / "accuracy.png")
    if any(c.get("lm_flops") is not None for c in summary["conditions"][1:]):
        plot = f"{plot}, {plot_accuracy_flops(summary, out / 'accuracy-flops.png')}"
    m = machine()
    console.print(
        f"[dim]{len(items)} questions, {args.engine} engine, greedy, seed {args.seed}, {m['cpu']}, "
        f"{m['torch_threads']} threads; wrote {out / 'accuracy.json'}, "
        f"{out / 'accuracy.csv'}, {plot}[/dim]"
    )
    return 0


def runnable_methods(model: object, specs: list) -> tuple[list, dict[str, str]]:
    """The methods of ``specs`` (names, or ``(name, options)``) that ``zooprune.prune``
    accepts on ``model``, and why it refuses each other one, by label (e.g. ``visionzip``
    without the tower's CLS attention, ``fastv`` outside the models with an in-LM stage, an
    unknown option, a method for videos only). Each is tried: attached and removed at once,
    the model left as it was."""
    import zooprune
    from zooprune.bench.accuracy import method_label, method_parts

    runnable, refused = [], {}
    for spec in specs:
        name, options = method_parts(spec)
        try:
            if name in zooprune.METHODS and zooprune.METHODS[name].videos_only:
                raise zooprune.PruneError(
                    f"method {name!r} prunes videos only; the bench's questions are images"
                )
            zooprune.prune(model, name, ratio=0.5, **options).remove()
        except zooprune.PruneError as error:
            refused[method_label(name, options)] = str(error)
        else:
            runnable.append(spec)
    return runnable, refused


def _folder_for_bench(args: argparse.Namespace) -> tuple[Path, str]:
    if args.model is None:
        from zooprune.testbed.model import bundled_path

        return bundled_path(), f"zooprune test bed ({bundled_path().name})"
    return Path(args.model), args.model


def _load_for_bench(args: argparse.Namespace) -> tuple[object, object, str]:
    if args.model is None:
        from zooprune.testbed.model import bundled_path, load_testbed

        model, processor = load_testbed()
        return model, processor, f"zooprune test bed ({bundled_path().name})"
    model, processor = load_model(args.model, args.dtype)
    tokenizer = getattr(processor, "tokenizer", None)
    if tokenizer is not None:
        tokenizer.padding_side = "left"  # generate() continues every prompt from its end
    return model, processor, args.model


def _at(conditions: list[dict], method: str, ratio: float) -> dict | None:
    return next((c for c in conditions if c["method"] == method and c["ratio"] == ratio), None)


def _print_flops(conds: list[dict], unmatched: list[dict]) -> None:
    """The LM prefill each condition leaves, % of unpruned, and the kept tokens it took."""
    if all(c.get("lm_flops") is None for c in conds[1:]):
        return
    table = Table(title="LM prefill FLOPs, % of unpruned (visual tokens kept per image)")
    table.add_column("method", style="bold")
    ratios = sorted({c["ratio"] for c in conds[1:]}, reverse=True)
    for ratio in ratios:
        table.add_column(f"{100 * ratio:.1f}%", justify="right")
    for method in sorted({c["method"] for c in conds[1:]}):
        cells = []
        for ratio in ratios:
            match = _at(conds, method, ratio)
            if match is None or match.get("lm_flops") is None:
                cells.append("-")
                continue
            cells.append(f"{100 * match['lm_flops']:.1f} ({match['kept_mean']:.1f})")
        table.add_row(escape(method), *cells)
    console.print(table)
    for miss in unmatched:
        console.print(
            f"[dim]{escape(miss['method'])} at {100 * miss['ratio']:.1f}%: no budget matches, "
            f"{escape(miss['reason'])}[/dim]"
        )


def _print_accuracy(summary: dict) -> None:
    from zooprune.bench.accuracy import condition_stats

    conds = summary["conditions"]
    base = conds[0]

    def cell(stats: dict) -> str:
        return f"{100 * stats['accuracy']:.0f} [{100 * stats['low']:.0f},{100 * stats['high']:.0f}]"

    for family in ["overall", *base["families"]]:
        n = condition_stats(base, family)["n"]
        table = Table(title=f"{family} (n={n}): accuracy % [95% CI] (relative to unpruned)")
        table.add_column("method", style="bold")
        ratios = sorted({c["ratio"] for c in conds[1:]}, reverse=True)
        for ratio in ratios:
            kept = next(c["kept_mean"] for c in conds if c["ratio"] == ratio)
            table.add_column(f"{100 * ratio:.1f}% ({kept:.0f})", justify="right")
        table.add_row("unpruned", *[cell(condition_stats(base, family))] * len(ratios))
        for method in sorted({c["method"] for c in conds[1:]}):
            row = []
            for ratio in ratios:
                match = _at(conds, method, ratio)
                if match is None:  # no budget matched the pre-LLM compute at this ratio
                    row.append("-")
                    continue
                stats = condition_stats(match, family)
                relative = "" if stats["relative"] is None else f" ({100 * stats['relative']:.0f}%)"
                row.append(cell(stats) + relative)
            table.add_row(escape(method), *row)  # a variant's [options] are not markup
        console.print(table)
    _print_flops(conds, summary.get("unmatched", []))
    comparisons = summary["comparisons"]
    if comparisons:
        table = Table(title="paired differences on the same questions: points [95% CI]")
        table.add_column("difference", style="bold")
        ratios = sorted({c["ratio"] for c in comparisons}, reverse=True)
        for ratio in ratios:
            table.add_column(f"{100 * ratio:.1f}%", justify="right")
        for pair in dict.fromkeys((c["a"], c["b"]) for c in comparisons):
            cells = []
            for ratio in ratios:
                comp = next(
                    (c for c in comparisons if (c["a"], c["b"]) == pair and c["ratio"] == ratio),
                    None,
                )
                cells.append(
                    ""
                    if comp is None
                    else f"{100 * comp['difference']:+.1f} "
                    f"[{100 * comp['low']:+.1f}, {100 * comp['high']:+.1f}]"
                )
            table.add_row(escape(f"{pair[0]} - {pair[1]}"), *cells)
        console.print(table)
