"""Pictures: where the time goes per budget, which tokens a method kept, accuracy per budget."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only; no display is assumed
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.patches import Rectangle  # noqa: E402

from zooprune.bench.accuracy import UNPRUNED, condition_stats  # noqa: E402


def plot_speed(result: dict[str, Any], path: str | Path) -> Path:
    """Stacked time per phase for each budget, end-to-end generation of the fixed tokens."""
    rows = result["rows"]
    labels = ["all" if not r["pruned"] else str(r["keep"]) for r in rows]
    new_tokens = result["config"]["new_tokens"]
    phases = [
        ("vision encoder", [r["encode_s"] for r in rows], "#9aa5b1"),
        ("selection", [r["select_s"] for r in rows], "#e07a5f"),
        ("prefill", [r["prefill_s"] for r in rows], "#3d405b"),
        (
            f"decode ({new_tokens - 1} steps)",
            [r["decode_per_token_s"] * (new_tokens - 1) for r in rows],
            "#81b29a",
        ),
    ]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    bottom = [0.0] * len(rows)
    for name, values, colour in phases:
        left.bar(labels, values, bottom=bottom, label=name, color=colour)
        bottom = [b + v for b, v in zip(bottom, values, strict=True)]
    left.set_xlabel(f"visual tokens kept (of {result['visual_tokens']})")
    left.set_ylabel("seconds")
    left.set_title(f"time to answer with {new_tokens} tokens ({result['method']})")
    left.legend(fontsize=8)
    speedups = [
        ("prefill", "prefill_speedup"),
        ("LM generate + selection", "generate_speedup_with_selection"),
        ("end to end", "end_to_end_speedup"),
    ]
    width = 0.27
    for i, (name, key) in enumerate(speedups):
        xs = [j + (i - 1) * width for j in range(len(rows))]
        right.bar(xs, [r[key] for r in rows], width=width, label=name)
    right.set_xticks(range(len(rows)), labels)
    right.axhline(1.0, color="black", linewidth=0.8)
    right.set_xlabel("visual tokens kept")
    right.set_ylabel("speed-up over unpruned (x)")
    right.legend(fontsize=8)
    fig.suptitle(f"{result['model']}\n{result['dtype']}, {result['machine']['cpu']}", fontsize=8)
    return _save(fig, path)


def plot_serving(result: dict[str, Any], path: str | Path) -> Path:
    """Requests per second, and time to first token (median, p95 whisker), per budget."""
    rows = result["rows"]
    labels = [
        "all"
        if not r["pruned"]
        else f"{r['keep']}\n{r['method']}"
        if r["method"] != result["method"]
        else str(r["keep"])
        for r in rows
    ]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    bars = left.bar(labels, [r["requests_per_s"] for r in rows], color="#3d405b")
    for bar, row in zip(bars, rows, strict=True):
        left.annotate(
            f"{row['throughput_x']:.2f}x",
            (bar.get_x() + bar.get_width() / 2, bar.get_height()),
            ha="center",
            va="bottom",
            fontsize=8,
        )
    left.set_xlabel(f"visual tokens kept (of {result['visual_tokens']:.0f})")
    left.set_ylabel("requests / s")
    concurrency = result["config"]["concurrency"]
    left.set_title(f"throughput, {concurrency} concurrent requests ({result['method']})")
    medians = [r["ttft_median_s"] * 1e3 for r in rows]
    whiskers = [[0] * len(rows), [(r["ttft_p95_s"] - r["ttft_median_s"]) * 1e3 for r in rows]]
    right.bar(labels, medians, yerr=whiskers, capsize=4, color="#81b29a")
    right.set_xlabel("visual tokens kept")
    right.set_ylabel("ms")
    right.set_title("time to first token (median; whisker: p95)")
    fig.suptitle(
        f"{result['engine']}: {result['model']}\n{result['dtype']}, {result['machine']['cpu']}",
        fontsize=8,
    )
    return _save(fig, path)


def plot_video_serving(result: dict[str, Any], path: str | Path) -> Path:
    """Per concurrency level, each condition's requests per second and time to first
    token (median, p95 whisker), side by side."""
    rows = result["rows"]
    levels = sorted({r["concurrency"] for r in rows})
    conditions = list(dict.fromkeys((r["by"], r["method"]) for r in rows))
    names = ["unpruned" if by is None else f"{method} ({by})" for by, method in conditions]
    colours = plt.get_cmap("tab10").colors
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.4))
    width = 0.8 / len(conditions)
    for c, (condition, name) in enumerate(zip(conditions, names, strict=True)):
        mine = {r["concurrency"]: r for r in rows if (r["by"], r["method"]) == condition}
        xs = [i + (c - (len(conditions) - 1) / 2) * width for i in range(len(levels))]
        per_level = [mine[level] for level in levels]
        left.bar(xs, [r["requests_per_s"] for r in per_level], width, label=name, color=colours[c])
        medians = [r["ttft_median_s"] * 1e3 for r in per_level]
        whisker = [(r["ttft_p95_s"] - r["ttft_median_s"]) * 1e3 for r in per_level]
        right.bar(
            xs, medians, width, yerr=[[0] * len(levels), whisker], capsize=3, color=colours[c]
        )
    for axis in (left, right):
        axis.set_xticks(range(len(levels)), [f"{level} at once" for level in levels])
    left.set_ylabel("requests / s")
    left.set_title(f"throughput; pruned rows keep {result['keep']} of {result['video_tokens']}")
    left.legend(fontsize=7)
    right.set_ylabel("ms")
    right.set_title("time to first token (median; whisker: p95)")
    fig.suptitle(
        f"{result['engine']}: {result['model']}\n{result['dtype']}, {result['machine']['cpu']}",
        fontsize=8,
    )
    return _save(fig, path)


def processed_image(pixel_values: Any, mean: Any, std: Any) -> Any:
    """The image the model saw, as ``[H, W, 3]`` floats in [0, 1]: normalisation undone.

    Args:
        pixel_values: ``[3, H, W]`` one image as the processor produced it.
        mean, std: the processor's per-channel normalisation.
    """
    import torch

    x = pixel_values.detach().float().cpu()
    x = x * torch.tensor(std).view(3, 1, 1) + torch.tensor(mean).view(3, 1, 1)
    return x.clamp(0, 1).permute(1, 2, 0).numpy()


def plot_selection(
    image: Any, selections: list[tuple[str, Any]], path: str | Path, title: str | None = None
) -> Path:
    """Which patches each method kept, and the score it ranked by, over the image.

    Args:
        image: ``[H, W, 3]`` in [0, 1] (see :func:`processed_image`).
        selections: ``(title, ImageSelection)`` pairs, one column each; the second row
            shows the method's per-token score as a heatmap when it has one.
        title: a line above the panels (e.g. the question and the answers).
    """
    import numpy as np

    rows = 2 if any(sel.scores is not None for _, sel in selections) else 1

    fig, axes = plt.subplots(rows, len(selections), figsize=(3.2 * len(selections), 3.3 * rows))
    axes = np.array(axes).reshape(rows, len(selections))
    height, width = image.shape[:2]
    for column, (name, sel) in enumerate(selections):
        grid_h, grid_w = sel.grid
        kept = np.zeros(grid_h * grid_w, dtype=bool)
        kept[sel.indices.cpu().numpy()] = True
        ax = axes[0, column]
        cells = np.stack(divmod(np.flatnonzero(kept), grid_w), axis=-1)
        _show_kept_cells(ax, image, (grid_h, grid_w), cells)
        ax.set_title(f"{name}: {sel.kept}/{sel.num_tokens} kept", fontsize=9)
        ax.axis("off")
        if rows == 2:
            ax = axes[1, column]
            ax.axis("off")
            if sel.scores is not None:
                ax.imshow(image)
                heat = sel.scores.float().cpu().numpy().reshape(grid_h, grid_w)
                ax.imshow(heat, cmap="inferno", alpha=0.6, extent=(0, width, height, 0))
                ax.set_title(f"{name} score per patch", fontsize=9)
    if title:
        fig.suptitle(title, fontsize=10)
    return _save(fig, path)


def plot_regions(image: Any, selection: Any, path: str | Path, title: str | None = None) -> Path:
    """Which tokens one image kept, for any model family (see :func:`regions_figure`)."""
    return _save(regions_figure(image, selection, title), path)


def regions_figure(image: Any, selection: Any, title: str | None = None) -> Any:
    """The kept tokens of one :class:`~zooprune.record.ImageSelection`, drawn where they came from.

    - Crop boxes known (LLaVA-NeXT / OneVision; InternVL when the call passed
      ``image_sizes``): one panel, each kept token's region (``selection.regions()``)
      outlined on the original image.
    - One crop, boxes unknown (LLaVA-1.5, Gemma 3, Qwen2-VL, a one-tile image): the crop's patch
      grid stretched over the image, with the method's scores as a heatmap beside it.
    - Several crops, boxes unknown (Idefics3 / SmolVLM, InternVL): one panel per crop, its
      patch grid with the kept cells filled.

    - A video (``selection.kind == "video"``): one panel per frame, its kept cells
      outlined over that frame's picture (``image``: one picture per frame of the record,
      e.g. every second frame for Qwen2-VL, whose frames are pairs) or filled on its grid.

    Args:
        image: the original image, ``[H, W, 3]`` floats in [0, 1] or a PIL image; for a
            video, a list of such pictures (one per frame) or None.
    """
    import numpy as np

    if selection.kind == "video":
        return _frame_panels(image, selection, title)
    picture = np.asarray(image)
    # Integer pixels (PIL, uint8 arrays) are 0-255; floats are taken as [0, 1].
    scale = 255.0 if np.issubdtype(picture.dtype, np.integer) else 1.0
    picture = picture.astype(np.float64) / scale
    height, width = picture.shape[:2]
    grids = list(selection.patch_grids) or [selection.grid]
    crops = (
        selection.crops.cpu().numpy()
        if selection.crops is not None
        else np.zeros(selection.kept, dtype=int)
    )
    cells = selection.cells.cpu().numpy() if selection.cells is not None else None
    if cells is None:
        cells = np.stack(divmod(selection.indices.cpu().numpy(), selection.grid[1]), axis=-1)
    regions = selection.regions()
    caption = f"{selection.kept}/{selection.num_tokens} kept"
    if regions is not None:
        boxes = regions.numpy()
    elif len(grids) == 1:
        rows, cols = grids[0]
        step = np.array([height / rows, width / cols])
        boxes = np.concatenate([cells * step, (cells + 1) * step], axis=-1)
    else:
        return _crop_panels(grids, crops, cells, caption, title)
    heat = selection.scores is not None and regions is None and len(grids) == 1
    fig, axes = plt.subplots(1, 2 if heat else 1, figsize=(4.0 * (2 if heat else 1), 4.0))
    axes = np.atleast_1d(axes)
    lit = np.zeros((height, width), dtype=bool)
    for top, left, bottom, right in boxes:
        lit[max(int(top), 0) : int(np.ceil(bottom)), max(int(left), 0) : int(np.ceil(right))] = True
    axes[0].imshow(picture * np.where(lit, 1.0, 0.3)[..., None])
    for top, left, bottom, right in boxes:
        axes[0].add_patch(
            Rectangle(
                (left - 0.5, top - 0.5),
                right - left,
                bottom - top,
                fill=False,
                edgecolor="#00e5ff",
                linewidth=0.6,
            )
        )
    axes[0].set_title(caption, fontsize=9)
    if heat:
        rows, cols = grids[0]
        axes[1].imshow(picture)
        scores = selection.scores.float().cpu().numpy().reshape(rows, cols)
        axes[1].imshow(scores, cmap="inferno", alpha=0.6, extent=(0, width, height, 0))
        axes[1].set_title("score per token", fontsize=9)
    for ax in axes:
        ax.axis("off")
    if title:
        fig.suptitle(title, fontsize=10)
    return fig


def _crop_panels(
    grids: list[tuple[int, int]], crops: Any, cells: Any, caption: str, title: str | None
) -> Any:
    import numpy as np

    fig, axes = plt.subplots(1, len(grids), figsize=(2.4 * len(grids), 2.8), squeeze=False)
    for crop, ((rows, cols), ax) in enumerate(zip(grids, axes[0], strict=True)):
        kept = np.zeros((rows, cols))
        mine = cells[crops == crop]
        kept[mine[:, 0], mine[:, 1]] = 1.0
        ax.imshow(kept, cmap="Blues", vmin=0, vmax=1.2)
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_title(f"crop {crop}: {len(mine)} kept", fontsize=8)
    fig.suptitle(f"{title + chr(10) if title else ''}{caption} (crop boxes unknown)", fontsize=9)
    return fig


def _frame_panels(frames: Any, selection: Any, title: str | None) -> Any:
    """A video's kept tokens, frame by frame, over the frames' pictures when given."""
    import numpy as np

    grids = list(selection.patch_grids)
    crops = selection.crops.cpu().numpy()
    cells = selection.cells.cpu().numpy()
    if frames is not None and len(frames) != len(grids):
        raise ValueError(
            f"the video's record has {len(grids)} frames, {len(frames)} pictures given"
        )
    columns = min(len(grids), 8)
    rows = -(-len(grids) // columns)
    fig, axes = plt.subplots(rows, columns, figsize=(2.2 * columns, 2.4 * rows), squeeze=False)
    for frame, ax in enumerate(axes.flat):
        ax.axis("off")
        if frame >= len(grids):
            continue
        grid_h, grid_w = grids[frame]
        mine = cells[crops == frame]
        if frames is None:
            kept = np.zeros((grid_h, grid_w))
            kept[mine[:, 0], mine[:, 1]] = 1.0
            ax.imshow(kept, cmap="Blues", vmin=0, vmax=1.2)
        else:
            picture = np.asarray(frames[frame])
            scale = 255.0 if np.issubdtype(picture.dtype, np.integer) else 1.0
            _show_kept_cells(ax, picture.astype(np.float64) / scale, grids[frame], mine)
        ax.set_title(f"frame {frame}: {len(mine)} kept", fontsize=8)
    caption = f"{selection.kept}/{selection.num_tokens} kept over {len(grids)} frames"
    fig.suptitle(f"{title + chr(10) if title else ''}{caption}", fontsize=9)
    return fig


def _show_kept_cells(ax: Any, picture: Any, grid: tuple[int, int], cells: Any) -> None:
    """``picture`` with the cells of ``grid`` not in ``cells`` dimmed and each kept cell
    outlined; pixel row y belongs to cell row ``y * rows // height`` (so shading and
    outlines agree when the side is not a multiple of the grid)."""
    import numpy as np

    height, width = picture.shape[:2]
    rows, cols = grid
    lit = np.zeros(grid, dtype=bool)
    if len(cells):
        lit[cells[:, 0], cells[:, 1]] = True
    cell_of_row = np.arange(height) * rows // height
    cell_of_col = np.arange(width) * cols // width
    shade = np.where(lit[cell_of_row[:, None], cell_of_col[None, :]], 1.0, 0.3)
    ax.imshow(picture * shade[..., None])
    step_h, step_w = height / rows, width / cols
    for r, c in cells:
        ax.add_patch(
            Rectangle(
                (c * step_w - 0.5, r * step_h - 0.5),
                step_w,
                step_h,
                fill=False,
                edgecolor="#00e5ff",
                linewidth=0.6,
            )
        )


def plot_accuracy(summary: dict[str, Any], path: str | Path, ylabel: str = "accuracy %") -> Path:
    """Overall accuracy (with 95% intervals) against the fraction of tokens kept, per method;
    one small panel per family below."""
    conds = summary["conditions"]
    base = conds[0]
    families = list(base["families"])
    methods = sorted({c["method"] for c in conds[1:]})
    panels = 1 + len(families)
    columns = min(4, panels)
    rows = -(-panels // columns)
    fig, axes = plt.subplots(rows, columns, figsize=(3.6 * columns, 3.0 * rows), squeeze=False)
    for panel, family in enumerate(["overall", *families]):
        ax = axes.flat[panel]
        for method in methods:
            points = sorted(
                ((c["ratio"], condition_stats(c, family)) for c in conds if c["method"] == method),
                key=lambda point: point[0],
            )
            xs = [100 * r for r, _ in points]
            ys = [100 * s["accuracy"] for _, s in points]
            err = [
                [100 * (s["accuracy"] - s["low"]) for _, s in points],
                [100 * (s["high"] - s["accuracy"]) for _, s in points],
            ]
            style = {"lw": 2.4, "zorder": 3} if method == "zoo" else {"lw": 1.2}
            ax.errorbar(
                xs,
                ys,
                yerr=err if family == "overall" else None,
                marker="o",
                ms=3,
                capsize=2,
                label=method,
                **style,
            )
        ax.axhline(
            100 * condition_stats(base, family)["accuracy"],
            color="k",
            ls="--",
            lw=1,
            label=UNPRUNED,
        )
        ax.set_title(family, fontsize=10)
        ax.set_xlabel("% of visual tokens kept", fontsize=8)
        ax.set_ylabel(ylabel, fontsize=8)
        ax.set_ylim(0, 102)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[panels:]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=7, ncol=2)
    fig.suptitle(f"accuracy vs visual-token budget: {summary.get('model', '')}", fontsize=11)
    return _save(fig, path, dpi=100)


def flops_points(summary: dict[str, Any]) -> dict[str, list[tuple[float, float]]]:
    """Per method, ``(LM prefill FLOPs % of unpruned, overall accuracy %)`` of each of its
    conditions that has a FLOP count, by increasing FLOPs."""
    points: dict[str, list[tuple[float, float]]] = {}
    for c in summary["conditions"][1:]:
        if c.get("lm_flops") is not None:
            point = (100 * c["lm_flops"], 100 * c["overall"]["accuracy"])
            points.setdefault(c["method"], []).append(point)
    return {method: sorted(values) for method, values in sorted(points.items())}


def plot_accuracy_flops(summary: dict[str, Any], path: str | Path) -> Path:
    """Overall accuracy against the LM prefill FLOPs each condition leaves (% of
    unpruned), per method: equal compute on the x axis, whatever the kept tokens."""
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    for i, (method, points) in enumerate(flops_points(summary).items()):
        xs, ys = zip(*points, strict=True)
        style = {"lw": 2.4, "zorder": 3} if method == "zoo" else {"lw": 1.2}
        # ten colours, then the next ten dashed, dotted: every line its own look
        style["ls"] = ("-", "--", ":")[i // 10 % 3]
        ax.plot(xs, ys, marker="o", ms=3, label=method, **style)
    base = summary["conditions"][0]["overall"]["accuracy"]
    ax.axhline(100 * base, color="k", ls="--", lw=1, label=UNPRUNED)
    ax.set_xlabel("LM prefill FLOPs, % of unpruned", fontsize=9)
    ax.set_ylabel("accuracy %", fontsize=9)
    ax.set_ylim(0, 102)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    ax.set_title(f"accuracy vs compute: {summary.get('model', '')}", fontsize=10)
    return _save(fig, path, dpi=100)


def _save(fig: Any, path: str | Path, dpi: int = 110) -> Path:
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return path
