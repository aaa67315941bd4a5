"""The checkpoint shipped inside the package: it loads the standard way and keeps its
accuracy. The floors sit well under what was measured on this slice (90% unpruned, every
family but glyph at 90-100%; 71% with a random 11% of the tokens), so that they catch a
broken or swapped checkpoint, not noise. The measured figures are printed by
`zooprune bench --n-per-family 10 --families color,shape,count,exists,spatial,location,glyph
--methods random --ratios 1/9`."""

import pytest
from transformers import AutoProcessor, LlavaForConditionalGeneration

from zooprune.bench import accuracy as harness
from zooprune.testbed.model import bundled_path, load_testbed

N_PER_FAMILY = 10  # 70 fixed test questions


@pytest.fixture(scope="module")
def bundled():
    return load_testbed()


def test_bundled_checkpoint_is_a_standard_folder():
    path = bundled_path()
    model = LlavaForConditionalGeneration.from_pretrained(path)
    processor = AutoProcessor.from_pretrained(path)
    assert model.config.image_token_id == processor.tokenizer.convert_tokens_to_ids("<image>")
    assert sum(p.numel() for p in model.parameters()) < 8_000_000
    assert sum(f.stat().st_size for f in path.iterdir()) < 30 * 2**20


def test_bundled_checkpoint_answers_the_test_slice(bundled, tmp_path):
    model, processor = bundled
    items = harness.testbed_items(N_PER_FAMILY, split="test")
    summary = harness.run_accuracy(model, processor, items, tmp_path, ["random"], [1 / 9], reps=200)
    unpruned, random11 = summary["conditions"]
    accuracy = unpruned["overall"]["accuracy"]
    assert accuracy >= 0.8, unpruned
    for family, stats in unpruned["families"].items():
        if family != "glyph":  # below its floor; the README says so
            assert stats["accuracy"] >= 0.7, (family, stats)
    # Keeping a random 11% of the tokens must hurt: the answers live in a few tokens.
    assert random11["overall"]["accuracy"] <= accuracy - 0.08, summary
