"""Pictures: where the time goes per budget, and which tokens a method kept."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only; no display is assumed
import matplotlib.pyplot as plt  # noqa: E402


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
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
