import os

import numpy as np
import pytest
import torch
from hypothesis import settings
from PIL import Image
from transformers import AutoProcessor, LlavaForConditionalGeneration

from zooprune.tiny import save_tiny_llava

# Property tests draw the same examples on every run (a seed per test, no example
# database), so a test cannot pass on one run and fail on the next: CI stays reproducible.
# `make test-fuzz` (pytest --hypothesis-profile=fuzz) draws fresh examples, many more of
# them, and saves any failure it finds for the next run to replay.
settings.register_profile("ci", max_examples=150, deadline=None, derandomize=True, database=None)
settings.register_profile("fuzz", max_examples=1000, deadline=None)
# `make mutate` runs each mutant against the tests that reach it: fewer examples, same seeds.
settings.register_profile("mutate", max_examples=10, deadline=None, derandomize=True, database=None)
settings.load_profile("ci")


#: fixtures that build, save or load a model: the costly setups of a mutant's tests
MODEL_FIXTURES = frozenset({"tiny_llava_dir", "model", "next_model", "saved", "vlm", "family"})


def pytest_collection_modifyitems(config, items):
    # mutmut runs a mutant's tests in no particular order (it passes them as a set), and
    # -x: the tests that build no model go first, so that a mutant one of them catches
    # fails before any model is built (most do; only survivors run everything).
    if os.environ.get("MUTANT_UNDER_TEST"):
        items.sort(key=lambda item: bool(MODEL_FIXTURES.intersection(item.fixturenames)))


@pytest.fixture(scope="session")
def tiny_llava_dir(tmp_path_factory):
    """A tiny random LLaVA saved with save_pretrained, so tests load it the real way."""
    return save_tiny_llava(tmp_path_factory.mktemp("tiny-llava"))


@pytest.fixture
def model(tiny_llava_dir):
    return LlavaForConditionalGeneration.from_pretrained(tiny_llava_dir).eval()


@pytest.fixture(scope="session")
def processor(tiny_llava_dir):
    return AutoProcessor.from_pretrained(tiny_llava_dir)


@pytest.fixture(scope="session")
def images():
    rng = np.random.default_rng(0)
    return [
        Image.fromarray(rng.integers(0, 256, (52 + 7 * i, 60, 3), dtype=np.uint8)) for i in range(4)
    ]


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
