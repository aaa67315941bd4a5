"""Pure tensor math of token selection: scores, greedy selection, baselines, the registry.

Nothing here knows about Hugging Face; adapters hand these functions plain tensors.
"""

from zooprune.select import fastv as _fastv  # noqa: F401  (registers the in-LM method)
from zooprune.select import methods as _methods  # noqa: F401  (registers the methods)
from zooprune.select import pdrop as _pdrop  # noqa: F401  (registers the in-LM method)
from zooprune.select import sparsevlm as _sparsevlm  # noqa: F401  (registers the in-LM method)
from zooprune.select.methods import check_estimator
from zooprune.select.registry import METHODS, MethodResult, MethodSpec, TokenSet, get_method

__all__ = ["METHODS", "MethodResult", "MethodSpec", "TokenSet", "check_estimator", "get_method"]
