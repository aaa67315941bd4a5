"""The checkpoint shipped inside the package: it loads the standard way and keeps its
accuracy. The floors sit well under what was measured on this slice (99% unpruned, every
family at 90-100%; 77% with a random 11% of the tokens), so that they catch a broken or
swapped checkpoint, not noise. The measured figures are printed by
`zooprune bench --n-per-family 10 --methods random --ratios 1/9`."""

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
    assert accuracy >= 0.85, unpruned
    assert len(unpruned["families"]) == 7  # glyph reading included
    for family, stats in unpruned["families"].items():
        assert stats["accuracy"] >= 0.7, (family, stats)
    # Keeping a random 11% of the tokens must hurt: the answers live in a few tokens.
    assert random11["overall"]["accuracy"] <= accuracy - 0.12, summary


def test_the_shipped_projector_learned(bundled):
    """The projector ZOO-Prune probes was trained, not left at its initialisation.

    The recipe starts it from seed 0's random Linear-GELU-Linear and folds a
    standardisation into the first layer (a scalar scale and a bias), so an untrained
    shipped projector would have exactly the seed's second layer and a first layer that is
    a multiple of the seed's. Each must instead have moved by several percent.
    """
    from zooprune.testbed.train import TrainConfig, _build

    initial = _build(TrainConfig())[0].model.multi_modal_projector
    shipped = bundled[0].model.multi_modal_projector
    w1, w1_0 = shipped.linear_1.weight.detach(), initial.linear_1.weight.detach()
    w2, w2_0 = shipped.linear_2.weight.detach(), initial.linear_2.weight.detach()
    scale = (w1 * w1_0).sum() / (w1_0 * w1_0).sum()  # the standardisation's best fit
    assert float((w1 - scale * w1_0).norm() / w1.norm()) > 0.03
    assert float((w2 - w2_0).norm() / w2_0.norm()) > 0.03
