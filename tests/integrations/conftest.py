"""The integration tests run in their engine's own virtual environment (``make test-lmms``,
``make test-vllm``), which sets ``ZOOPRUNE_REQUIRE_<ENGINE>=1`` so that they fail, never
skip, where the engine should be. Elsewhere (the core environment, without the engine)
their files are not collected."""

import importlib.util
import os
from pathlib import Path

#: test files by prefix -> the engine module they need
ENGINES = {"test_lmms_eval": "lmms_eval", "test_vllm": "vllm"}

collect_ignore = [
    path.name
    for path in Path(__file__).parent.glob("test_*.py")
    for prefix, module in ENGINES.items()
    if path.name.startswith(prefix)
    and importlib.util.find_spec(module) is None
    and not os.environ.get(f"ZOOPRUNE_REQUIRE_{module.upper()}")
]
