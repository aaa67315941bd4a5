"""Model adapters, one per family, and the lookup from a model to its adapter."""

from __future__ import annotations

from torch import nn

from zooprune.adapters.base import Adapter
from zooprune.adapters.llava import LlavaAdapter
from zooprune.errors import UnsupportedModelError

ADAPTERS: dict[str, Adapter] = {adapter.name: adapter for adapter in [LlavaAdapter()]}


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


__all__ = ["ADAPTERS", "Adapter", "adapter_for"]
