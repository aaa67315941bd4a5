"""The integration tests run in their engine's own virtual environment (``make test-lmms``),
which sets ``ZOOPRUNE_REQUIRE_LMMS_EVAL=1`` so that they fail, never skip, where the engine
should be. Elsewhere (the core environment, without lmms-eval) they are not collected."""

import importlib.util
import os

collect_ignore = []
if importlib.util.find_spec("lmms_eval") is None and not os.environ.get(
    "ZOOPRUNE_REQUIRE_LMMS_EVAL"
):
    collect_ignore.append("test_lmms_eval.py")
