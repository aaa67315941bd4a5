"""zooprune: training-free visual-token pruning for Hugging Face vision-language models.

handle = zooprune.prune(model, method="zoo", keep=64)
model.generate(**inputs)      # unchanged call, pruned prompt
handle.selection              # what was kept
handle.remove()               # the model as it was

The names below torch and transformers are imported on first use, so that importing a
light submodule (an engine's plugin manifest, the errors) stays light.
"""

from __future__ import annotations

import importlib
from typing import Any

from zooprune.errors import (
    AlreadyPrunedError,
    BudgetError,
    NonFiniteFeaturesError,
    PlaceholderMismatchError,
    PruneError,
    UnknownMethodError,
    UnsupportedModelError,
)

__version__ = "0.1.0"

_LAZY = {
    "prune": "zooprune.api",
    "PruneHandle": "zooprune.handle",
    "handle_of": "zooprune.handle",
    "ImageSelection": "zooprune.record",
    "Selection": "zooprune.record",
    "METHODS": "zooprune.select",
}

__all__ = [
    "METHODS",
    "AlreadyPrunedError",
    "BudgetError",
    "ImageSelection",
    "NonFiniteFeaturesError",
    "PlaceholderMismatchError",
    "PruneError",
    "PruneHandle",
    "Selection",
    "UnknownMethodError",
    "UnsupportedModelError",
    "handle_of",
    "prune",
]


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module 'zooprune' has no attribute {name!r}")
    value = getattr(importlib.import_module(_LAZY[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
