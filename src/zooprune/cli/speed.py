"""``zooprune speed`` (end to end, per budget) and ``zooprune speed-kernels`` (the selection
kernels alone)."""

from __future__ import annotations

import argparse
from pathlib import Path

from rich.table import Table

from zooprune.bench.flops import LLAVA15_7B, vision_share
from zooprune.bench.widths import AGREEMENT, QUICK, SHAPES, WidthBenchConfig, run_width_benchmark
from zooprune.cli.common import (
    add_dtype,
    add_out,
    add_threads,
    budgets,
    console,
    fail,
    machine_line,
    method_name,
    parse_option,
    set_threads,
    vllm_missing,
    with_progress,
    write_json,
)
from zooprune.errors import PruneError

#: the vision tower's share of LLaVA-1.5-7B's unpruned prefill, 40 text tokens
VISION_SHARE_7B = vision_share(LLAVA15_7B, 40)


def register(commands: argparse._SubParsersAction) -> None:
    speed = commands.add_parser(
        "speed",
        help="time unpruned vs pruned end to end, per budget (Hugging Face, or vLLM serving)",
    )
    speed.add_argument(
        "--model", default=None, help="default: a LLaVA-1.5-proportioned random model"
    )
    speed.add_argument(
        "--engine",
        choices=["hf", "vllm"],
        default="hf",
        help="hf: one request, phase by phase; vllm: concurrent requests served by vLLM",
    )
    speed.add_argument("--budgets", type=budgets, default=(192, 128, 64))
    speed.add_argument("--method", type=method_name, default="zoo")
    speed.add_argument(
        "--option", action="append", default=[], metavar="NAME=VALUE", help="a method option"
    )
    speed.add_argument(
        "--concurrency",
        type=int,
        nargs="+",
        default=None,
        help="vllm: requests submitted at once (R; default 8); with --videos, one or more "
        "levels (default 8 32)",
    )
    speed.add_argument(
        "--videos",
        action="store_true",
        help="vllm: serve videos: unpruned, zooprune's --video-methods and vLLM's own EVS and "
        "VidCom2 (where the model has them), all at the video tokens EVS keeps at --rate",
    )
    speed.add_argument(
        "--video-methods",
        type=_methods,
        default=("zoo", "divprune", "grid"),
        help="--videos: zooprune's methods, comma-separated (--option applies to the first)",
    )
    speed.add_argument(
        "--rate",
        type=float,
        default=0.5,
        help="--videos: the share of a video's tokens dropped (vLLM's video_pruning_rate)",
    )
    speed.add_argument("--frames", type=int, default=8, help="--videos: frames per video")
    speed.add_argument(
        "--frame-size", type=int, default=224, help="--videos: square frames of this many px"
    )
    speed.add_argument(
        "--reference",
        type=_reference,
        default="grid",
        help="vllm: a method whose selection is nearly free, served at the smallest budget "
        "too: the requests/s a pre-LLM pruner can reach there ('none': no such row)",
    )
    add_dtype(speed, "auto")
    speed.add_argument("--new-tokens", type=int, default=20)
    speed.add_argument("--repeats", type=int, default=3)
    speed.add_argument("--warmup", type=int, default=1)
    speed.add_argument("--device", default="cpu")
    add_threads(speed)
    add_out(speed, "out/speed", "folder for speed.json and speed.png")
    speed.set_defaults(handler=_speed)

    kernels = commands.add_parser(
        "speed-kernels", help="time the sensitivity estimators and greedy selection alone"
    )
    kernels.add_argument("--tokens", type=int, default=576)
    kernels.add_argument("--vision-dim", type=int, default=1024)
    kernels.add_argument("--hidden-dim", type=int, default=4096)
    kernels.add_argument("--text-dim", type=int, default=4096)
    kernels.add_argument("--budgets", type=budgets, default=(64, 128, 192))
    kernels.add_argument(
        "--images", type=int, default=None, help="images to score (default 4; --widths: 1)"
    )
    kernels.add_argument("--num-directions", type=int, default=64)
    kernels.add_argument(
        "--token-scale", type=float, default=0.0, help="sigma of a log-normal per-token scale"
    )
    kernels.add_argument(
        "--greedy-only", action="store_true", help="time the greedy selection alone (seconds)"
    )
    kernels.add_argument(
        "--widths",
        action="store_true",
        help="each estimator at real models' projector widths, beside their LMs' pruned "
        "prefill (--shapes, --tokens, one image unless --images)",
    )
    kernels.add_argument(
        "--shapes",
        type=_shapes,
        default=None,
        help=f"--widths: comma-separated, of: {', '.join(s.name for s in SHAPES)}",
    )
    kernels.add_argument("--keep", type=int, default=64, help="--widths: the greedy's k")
    kernels.add_argument("--device", default="cpu")
    add_threads(kernels)
    add_out(kernels, "out/speed", "folder for kernels.json")
    kernels.set_defaults(handler=_speed_kernels)


def _speed(args: argparse.Namespace) -> int:
    from zooprune.select import METHODS

    if METHODS[args.method].in_lm and args.engine == "vllm":
        return fail(
            f"--method {args.method} chooses tokens inside the language model; "
            "vLLM does not serve it"
        )
    if args.videos and args.engine != "vllm":
        return fail("--videos applies to --engine vllm")
    if args.engine == "vllm":
        return _speed_videos(args) if args.videos else _speed_vllm(args)
    if args.concurrency is not None:
        return fail("--concurrency applies to --engine vllm")
    options = {}
    if args.option:
        if not METHODS[args.method].in_lm:
            return fail(
                "--option applies to --engine vllm, or to a method inside the LM (the hf "
                "engine times the other methods at their defaults)"
            )
        try:  # before the model is built and timed
            options = METHODS[args.method].resolve_options(
                dict(parse_option(text) for text in args.option)
            )
        except PruneError as error:
            return fail(str(error))
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
        options=options,
    )
    set_threads(args.threads)
    result = with_progress("speed benchmark", lambda report: run_speed_benchmark(config, report))
    notes = [_vision_share_line(result["vision_share_of_prefill_flops"])]
    for keep, share in result["selection_share_of_unpruned_prefill"].items():
        seven_b = result["analytic_7b"]["exact_scoring_plus_greedy_share"].get(keep)
        extra = (
            f"; analytic, exact scoring + greedy vs a LLaVA-1.5-7B prefill: {seven_b:.3%}"
            if seven_b
            else ""
        )
        notes.append(f"keep {keep}: selection = {share:.2%} of the unpruned prefill{extra}")
    if result["in_lm"]:
        notes.append(
            f"{result['method']} drops tokens inside the LM: its prefill and LM generation are "
            "timed through the handle (the image encoded inside) less the vision encoder's "
            "median; scoring is its ranking, included in the prefill"
        )
    notes.append(
        f"[dim]{result['dtype']}, method {result['method']}, medians of {config.repeats} after "
        f"{config.warmup} warm-up; {machine_line(result)}[/dim]"
    )
    _publish(result, speed_tables(result), notes, Path(args.out) / "speed", plot_speed)
    return 0


def _vision_share_line(share: float) -> str:
    return (
        f"vision tower + projector: {share:.1%} of the unpruned prefill's FLOPs "
        f"(LLaVA-1.5-7B: {VISION_SHARE_7B:.1%})"
    )


def _publish(result: dict, tables: list[Table], notes: list[str], stem: Path, plot) -> None:
    """Print the tables and notes; write ``stem``.json and ``stem``.png."""
    for line in (*tables, *notes):
        console.print(line)
    path = write_json(result, stem.parent, stem.name + ".json")
    picture = plot(result, stem.with_suffix(".png"))
    console.print(f"wrote {path} and {picture}")


def _reference(value: str) -> str | None:
    return None if value == "none" else method_name(value)


def _methods(value: str) -> tuple[str, ...]:
    return tuple(method_name(name.strip()) for name in value.split(",") if name.strip())


def _speed_vllm(args: argparse.Namespace) -> int:
    if (status := vllm_missing("--engine vllm")) is not None:
        return status
    from zooprune.integrations.vllm.throughput import ServingConfig, run_serving_benchmark
    from zooprune.viz import plot_serving

    concurrency = args.concurrency or [8]
    if len(concurrency) != 1:
        return fail("--concurrency takes one value without --videos")
    if concurrency[0] < 1 or args.repeats < 1 or args.new_tokens < 1:
        return fail("--concurrency, --repeats and --new-tokens must be at least 1")
    config = ServingConfig(
        model=args.model,
        budgets=args.budgets,
        method=args.method,
        options=dict(parse_option(o) for o in args.option),
        dtype=args.dtype,
        concurrency=concurrency[0],
        reference=args.reference,
        new_tokens=args.new_tokens,
        repeats=args.repeats,
        warmup=args.warmup,
        device=args.device,
    )
    set_threads(args.threads)
    try:
        result = with_progress(
            "vLLM serving benchmark", lambda report: run_serving_benchmark(config, report)
        )
    except PruneError as error:
        return fail(str(error))
    share = result["vision_share_of_prefill_flops"]
    notes = [] if share is None else [_vision_share_line(share)]
    if (reference := result["reference"]) is not None:
        notes.append(
            f"{result['method']} at keep {reference['keep']}: "
            f"{reference['share_of_requests_per_s']:.1%} of {reference['method']}'s "
            f"requests/s, median TTFT {reference['ttft_ratio']:.2f}x {reference['method']}'s "
            f"({reference['method']}: selection nearly free, the limit of a pre-LLM pruner at "
            "that K; the two served by two engines, wave for wave in turn, in both start "
            "orders)"
        )
    notes.append(
        f"[dim]{result['engine']}, {result['dtype']}, method {result['method']}; each wave: "
        f"{config.concurrency} requests at once, one {config.image_size} px image and "
        f"{config.text_tokens} words each, {config.new_tokens} output tokens; medians of "
        f"{config.repeats} waves after {config.warmup} warm-up ({2 * config.repeats} for the "
        f"two compared at the reference's K; TTFT and latency: of every "
        f"request in them); KV blocks: the warm-up wave's peak; {machine_line(result)}[/dim]"
    )
    _publish(result, serving_tables(result), notes, Path(args.out) / "serving", plot_serving)
    return 0


def _speed_videos(args: argparse.Namespace) -> int:
    if (status := vllm_missing("--engine vllm --videos")) is not None:
        return status
    from zooprune.errors import PruneError
    from zooprune.integrations.vllm.video_throughput import (
        VideoServingConfig,
        run_video_serving_benchmark,
    )
    from zooprune.viz import plot_video_serving

    concurrency = tuple(args.concurrency or (8, 32))
    if min(concurrency) < 1 or args.repeats < 1 or args.new_tokens < 1:
        return fail("--concurrency, --repeats and --new-tokens must be at least 1")
    if not 0 < args.rate < 1:
        return fail(f"--rate must be in (0, 1), got {args.rate}")
    if args.frames < 2 or args.frame_size < 32:
        return fail("--frames must be at least 2 and --frame-size at least 32 px")
    if not args.video_methods:
        return fail("--video-methods names no method")
    config = VideoServingConfig(
        model=args.model,
        rate=args.rate,
        methods=args.video_methods,
        options=dict(parse_option(o) for o in args.option),
        dtype=args.dtype,
        concurrency=concurrency,
        new_tokens=args.new_tokens,
        frames=args.frames,
        frame_size=args.frame_size,
        repeats=args.repeats,
        warmup=args.warmup,
        device=args.device,
    )
    set_threads(args.threads)
    try:
        result = with_progress(
            "vLLM video serving benchmark",
            lambda report: run_video_serving_benchmark(config, report),
        )
    except PruneError as error:
        return fail(str(error))
    notes = []
    if (share := result["vision_share_of_prefill_flops"]) is not None:
        notes.append(
            f"vision tower + mergers: {share:.1%} of the unpruned video prefill's FLOPs "
            f"(Qwen3-VL-8B on the same video: {result['vision_share_qwen3_vl_8b']:.1%})"
        )
    missing = [m for m in ("evs", "vidcom2") if m not in result["vllm_methods_supported"]]
    if missing:
        notes.append(f"vLLM's class for this model has no {', '.join(missing)}")
    notes.append(
        f"[dim]{result['engine']}, {result['dtype']}; each wave: R requests at once, one "
        f"video of {config.frames} frames of {config.frame_size} px and "
        f"{config.text_tokens} words each, {config.new_tokens} output tokens; every pruned "
        f"row keeps {result['keep']} of {result['video_tokens']} video tokens (EVS's count at "
        f"rate {config.rate}); medians of {config.repeats} waves after {config.warmup} "
        f"warm-up (TTFT and latency: of every request in them); KV blocks: the warm-up wave's "
        f"peak; {machine_line(result)}[/dim]"
    )
    _publish(
        result, video_serving_tables(result), notes, Path(args.out) / "video", plot_video_serving
    )
    return 0


def video_serving_tables(result: dict) -> list[Table]:
    """Per concurrency level and condition: throughput, latency, KV cache; and the ratios
    to unpruned at the same level."""
    times = Table(title=f"zooprune speed --engine vllm --videos: {result['model']}")
    ratios = Table(title="over unpruned, at the same R")
    for column in (
        "R",
        "pruned by",
        "method",
        "video tokens",
        "prompt tokens",
        "requests/s",
        "TTFT median ms",
        "TTFT p95 ms",
        "latency median ms",
        "latency p95 ms",
        "KV blocks peak",
        "selection ms/video",
    ):
        times.add_column(column, justify="right")
    for column in ("R", "pruned by", "method", "throughput x", "TTFT x", "latency x", "KV x"):
        ratios.add_column(column, justify="right")
    base = {row["concurrency"]: row for row in result["rows"] if row["by"] is None}
    for row in sorted(result["rows"], key=lambda r: r["concurrency"]):
        by, method = row["by"] or "-", row["method"] or "-"
        selection = row["selection_s_per_video"]
        times.add_row(
            str(row["concurrency"]),
            by,
            method,
            f"{row['video_tokens']}",
            f"{row['prompt_tokens']:.0f}",
            f"{row['requests_per_s']:.2f}",
            f"{row['ttft_median_s'] * 1e3:.0f}",
            f"{row['ttft_p95_s'] * 1e3:.0f}",
            f"{row['latency_median_s'] * 1e3:.0f}",
            f"{row['latency_p95_s'] * 1e3:.0f}",
            f"{row['kv_blocks_peak']} of {row['kv_blocks_total']}",
            "-" if selection is None else f"{selection * 1e3:.1f}",
        )
        unpruned = base[row["concurrency"]]
        ratios.add_row(
            str(row["concurrency"]),
            by,
            method,
            f"{row['throughput_x']:.2f}",
            f"{row['ttft_ratio']:.2f}",
            f"{row['latency_ratio']:.2f}",
            f"{row['kv_blocks_peak'] / max(unpruned['kv_blocks_peak'], 1):.2f}",
        )
    return [times, ratios]


def serving_tables(result: dict) -> list[Table]:
    """The throughput, latency and KV cache per budget, and the ratios to unpruned."""
    visual = result["visual_tokens"]
    times = Table(title=f"zooprune speed --engine vllm: {result['model']}")
    ratios = Table(title="over unpruned")
    for column in (
        "kept",
        "method",
        "prompt tokens",
        "requests/s",
        "output tok/s",
        "TTFT median ms",
        "TTFT p95 ms",
        "latency median ms",
        "latency p95 ms",
        "KV blocks peak",
    ):
        times.add_column(column, justify="right")
    for column in ("kept", "method", "throughput x", "TTFT x", "latency x", "KV blocks x"):
        ratios.add_column(column, justify="right")
    selection = Table(title="selection inside the engine, ms per image")
    for column in ("kept", "method", "in all", "scoring", "greedy", "data movement", "threads"):
        selection.add_column(column, justify="right")
    base = result["rows"][0]
    for row in result["rows"]:
        kept = f"{row['keep'] if row['pruned'] else visual}/{visual}"
        method = row["method"] or "-"
        if (split := row.get("selection")) is not None:
            selection.add_row(
                kept,
                method,
                *(f"{split[part] * 1e3:.1f}" for part in SELECTION_PARTS),
                str(split["threads"]),
            )
        times.add_row(
            kept,
            method,
            f"{row['prompt_tokens']:.0f}",
            f"{row['requests_per_s']:.2f}",
            f"{row['output_tokens_per_s']:.1f}",
            f"{row['ttft_median_s'] * 1e3:.0f}",
            f"{row['ttft_p95_s'] * 1e3:.0f}",
            f"{row['latency_median_s'] * 1e3:.0f}",
            f"{row['latency_p95_s'] * 1e3:.0f}",
            f"{row['kv_blocks_peak']} of {row['kv_blocks_total']}",
        )
        ratios.add_row(
            kept,
            method,
            f"{row['throughput_x']:.2f}",
            f"{row['ttft_ratio']:.2f}",
            f"{row['latency_ratio']:.2f}",
            f"{row['kv_blocks_peak'] / max(base['kv_blocks_peak'], 1):.2f}",
        )
    return [times, ratios, selection]


#: the parts of a selection's time the serving table shows (Tally.per_image's keys)
SELECTION_PARTS = ("selection", "scoring", "greedy", "data_movement")


def speed_tables(result: dict) -> list[Table]:
    """The times per budget, and the ratios and sizes, as ``zooprune speed`` prints them."""
    ms = lambda seconds: f"{seconds * 1e3:.1f}"  # noqa: E731
    times = Table(title=f"zooprune speed: {result['model']} (ms)")
    ratios = Table(title="speed-up over unpruned, and sizes")
    new_tokens = result["config"]["new_tokens"]
    for column in (
        "kept",
        "vision",
        "scoring",
        "greedy",
        "prefill",
        "decode/tok",
        f"LM gen {new_tokens}",
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
    keys = (
        "encode_s",
        "scoring_s",
        "greedy_s",
        "prefill_s",
        "decode_per_token_s",
        "generate_s",
        "end_to_end_s",
        "time_to_first_token_s",
    )
    for row in result["rows"]:
        kept = f"{row['keep']}/{result['visual_tokens']}"
        times.add_row(kept, *[ms(row[key]) for key in keys])
        ratios.add_row(
            kept,
            f"{row['prefill_speedup']:.2f}",
            f"{row['generate_speedup_with_selection']:.2f}",
            f"{row['end_to_end_speedup']:.2f}",
            f"{row['kv_cache_bytes'] / 2**20:.1f}",
            str(row["sequence_length"]),
            f"{row['flops']['lm_prefill'] / 1e9:.1f}",
        )
    return [times, ratios]


def _shapes(value: str) -> tuple[str, ...]:
    names = tuple(name.strip() for name in value.split(",") if name.strip())
    known = {shape.name for shape in SHAPES}
    unknown = [name for name in names if name not in known]
    if unknown or not names:
        bad = unknown[0] if unknown else value
        raise argparse.ArgumentTypeError(
            f"unknown shape {bad!r}; shapes: {', '.join(sorted(known))}"
        )
    return names


def _speed_widths(args: argparse.Namespace) -> int:
    if (args.images is not None and args.images < 1) or args.keep < 1 or args.tokens < args.keep:
        return fail("--images and --keep must be at least 1, and --tokens at least --keep")
    config = WidthBenchConfig(
        tokens=args.tokens,
        keep=args.keep,
        images=1 if args.images is None else args.images,
        num_directions=args.num_directions,
        shapes=args.shapes or WidthBenchConfig.shapes,
        device=args.device,
    )
    set_threads(args.threads)
    result = with_progress(
        "estimators at real widths", lambda report: run_width_benchmark(config, report)
    )
    console.print(width_table(result))
    for line in auto_lines(result):
        console.print(line)
    console.print(
        f"[dim]N={config.tokens} tokens per image, {config.images} image(s), features "
        f"N(0, 1) x log-normal({config.token_scale}) per token, float32; jvp and zo: "
        f"m={config.num_directions}, lowrank: rank {config.rank}; selection: scoring, then "
        f"the greedy at k={config.keep}; prefill: {config.keep} visual + "
        f"{config.text_tokens} text tokens through the shape's LM (one layer timed in "
        f"{result['lm_dtype']}, times its layers); a scoring call under {QUICK} s is the "
        f"median of {config.repeats}; {machine_line(result)}[/dim]"
    )
    path = write_json(result, Path(args.out), "widths.json")
    console.print(f"wrote {path}")
    return 0


def width_table(result: dict) -> Table:
    """``zooprune speed-kernels --widths``: per shape and estimator."""
    keep = result["config"]["keep"]
    table = Table(title="sensitivity estimators at real projector widths (ms per image)")
    for column in (
        "shape",
        "projector",
        "estimator",
        "scoring",
        "greedy",
        "selection",
        "LM prefill",
        "selection / prefill",
        "Spearman vs exact",
        f"top-{keep} overlap",
    ):
        table.add_column(column, justify="right")
    shapes = {shape["name"]: shape for shape in result["shapes"]}
    for row in result["rows"]:
        shape = shapes[row["shape"]]
        spearman, overlap = row["spearman_vs_exact"], row[f"top{keep}_overlap_vs_exact"]
        table.add_row(
            row["shape"],
            f"{shape['vision_dim']}->{shape['hidden']}->{shape['text_dim']}",
            row["estimator"],
            f"{row['scoring_s_per_image'] * 1e3:.1f}",
            f"{row['greedy_s_per_image'] * 1e3:.1f}",
            f"{row['selection_s_per_image'] * 1e3:.1f}",
            f"{row['prefill_s'] * 1e3:.0f}",
            f"{row['share_of_prefill']:.1%}",
            "-" if spearman is None else f"{spearman:.4f}",
            "-" if overlap is None else f"{overlap:.3f}",
        )
    return table


def auto_lines(result: dict) -> list[str]:
    """What ``estimator="auto"`` picks, against the cheapest estimator that ranks within
    :data:`~zooprune.bench.widths.AGREEMENT` of ``exact`` at each shape."""
    lines = []
    for name in dict.fromkeys(row["shape"] for row in result["rows"]):
        rows = {row["estimator"]: row for row in result["rows"] if row["shape"] == name}
        agreeing = [
            e
            for e, row in rows.items()
            if row["spearman_vs_exact"] is not None and row["spearman_vs_exact"] >= AGREEMENT
        ]
        cheapest = min(agreeing, key=lambda e: rows[e]["scoring_s_per_image"], default=None)
        sampled = [e for e in ("jvp", "zo") if e in rows]
        faster = ""
        if len(sampled) == 2:
            ratio = rows["zo"]["scoring_s_per_image"] / rows["jvp"]["scoring_s_per_image"]
            faster = (
                f"; without a closed form (not a plain MLP) auto takes jvp: zo/jvp time {ratio:.2f}"
            )
        lines.append(
            f"{name}: auto takes exact for this MLP; the cheapest estimator ranking within "
            f"Spearman {AGREEMENT} of exact here: {cheapest or '-'}{faster}"
        )
    return lines


def _speed_kernels(args: argparse.Namespace) -> int:
    from zooprune.bench.kernels import KernelBenchConfig, run_kernel_benchmark

    if args.widths:
        return _speed_widths(args)

    config = KernelBenchConfig(
        tokens=args.tokens,
        vision_dim=args.vision_dim,
        hidden_dim=args.hidden_dim,
        text_dim=args.text_dim,
        budgets=args.budgets,
        images=4 if args.images is None else args.images,
        num_directions=args.num_directions,
        token_scale=args.token_scale,
        estimators=() if args.greedy_only else KernelBenchConfig.estimators,
        device=args.device,
    )
    set_threads(args.threads)
    result = with_progress("kernel benchmark", lambda report: run_kernel_benchmark(config, report))
    for table in kernel_tables(result):
        console.print(table)
    if result["estimators"]:
        gram_ms = result["setup"]["exact_gram_kernel_s"] * 1e3
        console.print(
            f"one-off per model (cached): exact's Gram kernel {gram_ms:.0f} ms, lowrank's SVD "
            f"{result['setup']['lowrank_svd_s'] * 1e3:.0f} ms; zo: m={config.num_directions}, "
            f"h=0.01, float32; jvp and lowrank use zo's direction bank, zo-reseeded another "
            f"one (zo's own sampling noise); features: N(0, 1)"
            + (f" x log-normal({config.token_scale}) per token" if config.token_scale else "")
        )
    console.print(
        f"[dim]greedy: N={config.tokens}, d={config.text_dim}, float32, medians of "
        f"{config.greedy_repeats} after 1 warm-up; 'in full' includes each side's distance "
        f"work; picks' rows: the k rows an exact selection needs, as one product (a floor); "
        f"{machine_line(result)}[/dim]"
    )
    path = write_json(result, Path(args.out), "kernels.json")
    console.print(f"wrote {path}")
    return 0


def kernel_tables(result: dict) -> list[Table]:
    """The estimator and greedy tables of ``zooprune speed-kernels``."""
    config = result["config"]
    tables = []
    if result["estimators"]:
        estimators = Table(
            title=f"sensitivity estimators: N={config['tokens']}, projector "
            f"{config['vision_dim']} -> {config['hidden_dim']} -> {config['text_dim']}, "
            f"{config['images']} images"
        )
        for column in (
            "estimator",
            "ms / image",
            "speed-up vs zo",
            "Spearman vs zo",
            *[f"top-{k} overlap" for k in config["budgets"]],
        ):
            estimators.add_column(column, justify="right")
        for row in result["estimators"]:
            estimators.add_row(
                row["estimator"],
                f"{row['seconds_per_image'] * 1e3:.1f}",
                f"{row['speedup_vs_zo']:.1f}",
                f"{row['spearman_vs_zo']:.4f}",
                *[f"{row[f'top{k}_overlap_vs_zo']:.3f}" for k in config["budgets"]],
            )
        tables.append(estimators)
    greedy = Table(title="greedy selection in full vs the naive re-slicing loop (ms)")
    for column in (
        "k",
        "ours (auto)",
        "naive",
        "speed-up",
        "ours: matrix",
        "ours: rows",
        "distance matrix",
        "picks' rows",
        "ours loop",
        "naive loop",
        "loop speed-up",
        "same picks",
    ):
        greedy.add_column(column, justify="right")
    for row in result["greedy"]:
        greedy.add_row(
            str(row["k"]),
            f"{row['ours_s'] * 1e3:.2f} ({row['auto_mode']})",
            f"{row['naive_reslice_s'] * 1e3:.2f}",
            f"{row['speedup']:.1f}",
            f"{row['ours_matrix_s'] * 1e3:.2f}",
            f"{row['ours_rows_s'] * 1e3:.2f}",
            f"{row['distance_matrix_s'] * 1e3:.2f}",
            f"{row['picks_rows_s'] * 1e3:.2f}",
            f"{row['ours_loop_s'] * 1e3:.2f}",
            f"{row['naive_loop_s'] * 1e3:.2f}",
            f"{row['loop_speedup']:.1f}",
            str(row["same_selection"]),
        )
    tables.append(greedy)
    return tables
