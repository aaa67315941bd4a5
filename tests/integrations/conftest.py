"""The integration tests run in their engine's own virtual environment (``make test-lmms``,
``make test-vllm``), which sets ``ZOOPRUNE_REQUIRE_<ENGINE>=1`` so that they fail, never
skip, where the engine should be: a test that skips there is reported as failed. Elsewhere
(the core environment, without the engine) their files are not collected."""

import importlib.util
import os
from pathlib import Path

import pytest

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


def required_engine(path: Path) -> str | None:
    """The engine module a test file needs, if its environment promises it."""
    for prefix, module in ENGINES.items():
        if path.name.startswith(prefix) and os.environ.get(f"ZOOPRUNE_REQUIRE_{module.upper()}"):
            return module
    return None


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    engine = required_engine(Path(str(item.path)))
    if report.skipped and engine is not None and not hasattr(report, "wasxfail"):
        reason = report.longrepr[-1] if isinstance(report.longrepr, tuple) else report.longrepr
        report.outcome = "failed"
        report.longrepr = (
            f"skipped where ZOOPRUNE_REQUIRE_{engine.upper()}=1 promises that it runs: {reason}"
        )
