"""Model adapters, one per family, and the lookup from a model to its adapter."""

from __future__ import annotations

from torch import nn

from zooprune.adapters.base import Adapter
from zooprune.adapters.gemma3 import Gemma3Adapter
from zooprune.adapters.gemma4 import Gemma4Adapter
from zooprune.adapters.idefics3 import Idefics3Adapter
from zooprune.adapters.internvl import InternVLAdapter
from zooprune.adapters.llava import LlavaAdapter
from zooprune.adapters.llava_next import LlavaNextAdapter, LlavaOnevisionAdapter
from zooprune.adapters.mistral3 import Mistral3Adapter
from zooprune.adapters.qwen2_vl import Qwen2VLAdapter
from zooprune.adapters.qwen3_5 import Qwen3_5Adapter
from zooprune.adapters.qwen3_vl import Qwen3VLAdapter
from zooprune.errors import UnsupportedModelError
from zooprune.select import METHODS

ADAPTERS: dict[str, Adapter] = {
    adapter.name: adapter
    for adapter in [
        LlavaAdapter(),
        LlavaNextAdapter(),
        LlavaOnevisionAdapter(),
        Gemma3Adapter(),
        Gemma4Adapter(),
        Idefics3Adapter(),
        InternVLAdapter(),
        Mistral3Adapter(),
        Qwen2VLAdapter(),
        Qwen3_5Adapter(),
        Qwen3VLAdapter(),
    ]
}


def adapter_for(model: nn.Module) -> Adapter:
    """The adapter that supports ``model``; the error names the supported classes."""
    for adapter in ADAPTERS.values():
        if adapter.supports(model):
            return adapter
    supported = "; ".join(
        f"{', '.join(cls.__name__ for cls in a.model_classes)} {a.requirement}".strip()
        for a in ADAPTERS.values()
    )
    raise UnsupportedModelError(
        f"zooprune does not support this {type(model).__name__}; supported: {supported}"
    )


def support_matrix() -> str:
    """The family x method table of the README, in Markdown, from the registries."""
    names = sorted(METHODS)
    lines = [
        "| model class | N per image | " + " | ".join(f"`{name}`" for name in names) + " |",
        "|---|---|" + "---|" * len(names),
    ]
    notes: list[str] = []
    for adapter in ADAPTERS.values():
        cells = []
        for name in names:
            # What the engine derives from the prompt needs no condition of the family.
            own = METHODS[name].needs - adapter.prompt_extras
            conditions = [adapter.extras.get(need, "") for need in sorted(own)]
            if not all(conditions):
                cells.append("–")
            elif conditions:
                notes.append(f"`{name}` on {adapter.name}: {'; '.join(conditions)}")
                cells.append(f"✓ ({len(notes)})")
            else:
                cells.append("✓")
        classes = ", ".join(f"`{cls.__name__}`" for cls in adapter.model_classes)
        lines.append(
            f"| {classes} {adapter.requirement} | {adapter.tokens_per_image} | "
            + " | ".join(cells)
            + " |"
        )
    lines += ["", *[f"({i}) {note}" for i, note in enumerate(notes, 1)]]
    return "\n".join(lines).rstrip() + "\n"


__all__ = ["ADAPTERS", "Adapter", "adapter_for", "support_matrix"]
