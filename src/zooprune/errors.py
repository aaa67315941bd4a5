"""The errors zooprune raises on bad input. All are ``ValueError`` subclasses."""

from __future__ import annotations


class PruneError(ValueError):
    """Base class: the request cannot be honoured; the model is left as it was."""


class BudgetError(PruneError):
    """``keep`` or ``ratio`` is invalid, or does not fit an image's token count."""


class UnknownMethodError(PruneError):
    """No method is registered under that name."""


class UnsupportedModelError(PruneError):
    """No adapter knows this model class."""


class AlreadyPrunedError(PruneError):
    """The model already carries a pruning handle; remove it first."""


class PlaceholderMismatchError(PruneError):
    """The prompt's image placeholder tokens do not match the images given."""


class NonFiniteFeaturesError(PruneError):
    """An image's visual features contain NaN or infinity."""
