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


__all__ = ["ADAPTERS", "Adapter", "adapter_for"]
