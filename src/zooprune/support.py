"""The README's support matrix, generated from the registries: each family's adapter (the
Hugging Face engine), the methods it runs, and whether vLLM serves it pruned.

It reads both engines' declarations, so it lives above them; neither engine imports it.
"""

from __future__ import annotations

from collections.abc import Callable

from zooprune.adapters import ADAPTERS, Adapter
from zooprune.integrations.vllm import VARIANTS
from zooprune.select import METHODS


def support_matrix() -> str:
    """The family x method table of the README, in Markdown, with a vLLM column."""
    names = sorted(METHODS)
    lines = [
        "| model class | N per image | " + " | ".join(f"`{name}`" for name in names) + " | vLLM |",
        "|---|---|" + "---|" * (len(names) + 1),
    ]
    notes: list[str] = []

    def noted(note: str) -> str:
        notes.append(note)
        return f"✓ ({len(notes)})"

    for adapter in ADAPTERS.values():
        cells = []
        for name in names:
            # What the engine derives from the prompt needs no condition of the family.
            own = METHODS[name].needs - adapter.prompt_extras
            conditions = [adapter.extras.get(need, "") for need in sorted(own)]
            if not all(conditions):
                cells.append("–")
            elif conditions:
                cells.append(noted(f"`{name}` on {adapter.name}: {'; '.join(conditions)}"))
            else:
                cells.append("✓")
        cells.append(_served(adapter, noted))
        classes = ", ".join(f"`{cls.__name__}`" for cls in adapter.model_classes)
        lines.append(
            f"| {classes} {adapter.requirement} | {adapter.tokens_per_image} | "
            + " | ".join(cells)
            + " |"
        )
    lines += ["", *[f"({i}) {note}" for i, note in enumerate(notes, 1)]]
    return "\n".join(lines).rstrip() + "\n"


def _served(adapter: Adapter, noted: Callable[[str], str]) -> str:
    """The vLLM cell: ✓ where every class of the family has a pruned variant, with a note
    where the variant takes only some values of a layout option."""
    variants = [VARIANTS.get(cls.__name__) for cls in adapter.model_classes]
    if not all(variants):
        return "–"
    limits = {
        f"{name}={'/'.join(values)}"
        for variant in variants
        for name, values in variant.layout.items()
        if values is not None
    }
    if not limits:
        return "✓"
    return noted(f"vLLM serves {adapter.name} with {', '.join(sorted(limits))}")
