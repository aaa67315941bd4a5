"""zooprune: training-free visual-token pruning for Hugging Face vision-language models.

handle = zooprune.prune(model, method="zoo", keep=64)
model.generate(**inputs)      # unchanged call, pruned prompt
handle.selection              # what was kept
handle.remove()               # the model as it was
"""

from zooprune.api import PruneHandle, handle_of, prune
from zooprune.errors import (
    AlreadyPrunedError,
    BudgetError,
    NonFiniteFeaturesError,
    PlaceholderMismatchError,
    PruneError,
    UnknownMethodError,
    UnsupportedModelError,
)
from zooprune.record import ImageSelection, Selection
from zooprune.select import METHODS

__version__ = "0.1.0"

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
