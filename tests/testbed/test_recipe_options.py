"""Recipe options of the test-bed trainer (issue 16): ink-only digit labels, a projector /
tower unfrozen late, a projector kept centred while it learns, and joint training
continued from a saved model."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from transformers import LlavaForConditionalGeneration

from tests.testbed.test_model import TINY_SCENE
from tests.testbed.test_model import TINY_TRAIN as TINY_RUN
from zooprune.testbed import scenes
from zooprune.testbed.model import save_testbed
from zooprune.testbed.train import (
    TrainConfig,
    _build,
    _feature_stats,
    _group_lr,
    _make_optimizer,
    ink_mask,
    patch_labels,
    projector_drift,
    train,
    training_example,
    visual_token_stats,
)

# test_model's tiny run, shorter: three joint steps, no checkpoint in between.
TINY_TRAIN = dataclasses.replace(TINY_RUN, joint_steps=3, warmup=1, checkpoint_every=100)
# No noise and no clutter: the ink is the only black or white in the image.
CLEAN = dataclasses.replace(scenes.DEFAULT_CONFIG, noise_sigma=0.0, min_clutter=0, max_clutter=0)


def _glyph_scenes(n: int) -> list[scenes.Scene]:
    return [scenes.make_sample("test", i, "glyph", CLEAN).scene for i in range(n)]


def test_ink_mask_is_exactly_the_inked_pixels():
    checked = 0
    for scene in _glyph_scenes(12):
        for obj in scene.objects:
            mask = ink_mask(obj, CLEAN.image_size)
            if obj.digit is None:
                assert not mask.any()
                continue
            # Reference: the rendered pixels of the ink colour inside this object.
            ink_rgb = scenes._ink_rgb(obj.color)
            inked = (scene.image == np.array(ink_rgb, np.uint8)).all(-1) & obj.mask(
                CLEAN.image_size
            )
            assert np.array_equal(mask, inked)
            checked += 1
    assert checked >= 10


def test_ink_digit_labels_by_brute_force():
    p, g = CLEAN.patch_size, CLEAN.grid_size
    for scene in _glyph_scenes(8):
        obj_labels = patch_labels(scene)
        ink_labels = patch_labels(scene, digit_labels="ink", min_ink_pixels=3)
        # Everything but the digit is as in the default labelling.
        for key in ("color", "shape", "center", "pixels"):
            assert np.array_equal(obj_labels[key], ink_labels[key])
        expected = np.full(g * g, -100)
        for patch in range(g * g):
            r, c = divmod(patch, g)
            if obj_labels["digit"][patch] == 0:
                expected[patch] = 0  # a digitless object's patch
            for obj in scene.objects:
                if obj.digit is None:
                    continue
                window = ink_mask(obj, CLEAN.image_size)[r * p : (r + 1) * p, c * p : (c + 1) * p]
                if window.sum() >= 3:
                    expected[patch] = obj.digit + 1
        assert np.array_equal(ink_labels["digit"], expected)
        # Ink patches are a subset of the patches the default labels carry the digit on.
        inked = ink_labels["digit"] > 0
        assert inked.any() and np.array_equal(
            ink_labels["digit"][inked], obj_labels["digit"][inked]
        )
    with pytest.raises(ValueError, match="digit_labels"):
        patch_labels(scene, digit_labels="glyph")


def test_the_recipe_labels_digits_on_their_ink():
    config = TrainConfig()
    scene, _, labels = training_example(3, config)
    assert np.array_equal(labels["digit"], patch_labels(scene, digit_labels="ink")["digit"])
    scene, _, whole = training_example(3, dataclasses.replace(config, digit_labels="object"))
    assert np.array_equal(whole["digit"], patch_labels(scene)["digit"])
    assert not np.array_equal(whole["digit"], labels["digit"])


def test_a_late_group_is_frozen_then_ramps_up():
    config = dataclasses.replace(
        TINY_TRAIN, lr_projector=1e-3, projector_from_step=5, late_warmup=4, projector_bias=False
    )
    model, heads, _ = _build(config)
    opt = _make_optimizer(2, model, heads, config)
    projector = model.model.multi_modal_projector
    assert not any(p.requires_grad for p in projector.parameters())
    lm_group, proj_group = opt.param_groups
    assert _group_lr(lm_group, 0, 0.5, 4) == pytest.approx(config.lr_lm * 0.5)
    assert _group_lr(proj_group, 4, 1.0, 4) == 0.0
    assert not projector.linear_1.weight.requires_grad
    ramp = [_group_lr(proj_group, s, 1.0, 4) / 1e-3 for s in range(5, 10)]
    assert ramp == pytest.approx([0.25, 0.5, 0.75, 1.0, 1.0])
    # Unfrozen at its step: the weights learn, the biases stay frozen (projector_bias=False).
    assert projector.linear_1.weight.requires_grad and projector.linear_2.weight.requires_grad
    assert not projector.linear_1.bias.requires_grad and not projector.linear_2.bias.requires_grad
    assert {id(p) for p in proj_group["params"]} == {
        id(projector.linear_1.weight),
        id(projector.linear_2.weight),
    }


@pytest.fixture(scope="module")
def saved_tiny(tmp_path_factory):
    model, _, processor = _build(TINY_TRAIN)
    return save_testbed(model, processor, tmp_path_factory.mktemp("init") / "model")


def _first_layer_at_mean(path, config):
    model = LlavaForConditionalGeneration.from_pretrained(path)
    mean, _ = _feature_stats(model, config)
    with torch.no_grad():
        return model.model.multi_modal_projector.linear_1(mean), model


@pytest.mark.parametrize("center", [False, True])
def test_continued_training_and_the_centred_projector(saved_tiny, tmp_path, center):
    # Biases frozen: then only the centring moves the first bias, and the first layer's
    # output at the mean patch state is exactly what the centring must preserve.
    config = dataclasses.replace(
        TINY_TRAIN,
        init_from=str(saved_tiny),
        lr_projector=3e-2,
        projector_from_step=0,
        projector_center=center,
        projector_bias=False,
    )
    events: list[dict] = []
    path = train(config, tmp_path, events.append)
    # Phase 1 is skipped: only joint steps run, from the saved weights.
    steps = [e for e in events if e["event"] == "step"]
    assert [e["phase"] for e in steps] == [2, 2, 2]
    before, initial = _first_layer_at_mean(saved_tiny, config)
    after, final = _first_layer_at_mean(path, config)
    p0 = initial.model.multi_modal_projector.linear_1.weight
    assert not torch.equal(final.model.multi_modal_projector.linear_1.weight, p0)
    # Centred: the first layer still maps the tower's mean patch state where it did.
    if center:
        torch.testing.assert_close(after, before, rtol=0, atol=1e-5)
    else:
        assert (after - before).abs().max() > 1e-3
    evals = [e for e in events if e["event"] == "eval"]
    assert evals[0]["projector_drift"] == 0.0 and evals[-1]["projector_drift"] > 0.0
    reference = initial.model.multi_modal_projector.state_dict()
    assert evals[-1]["projector_drift"] == pytest.approx(projector_drift(final, reference))


def test_visual_token_stats_by_hand():
    model, _, _ = _build(TINY_TRAIN)
    stats = visual_token_stats(model, TINY_SCENE, n_images=4)
    from zooprune.testbed.model import pixel_values_from_images, vision_features

    images = np.stack(
        [scenes.make_sample("validation", i, "shape", TINY_SCENE).scene.image for i in range(4)]
    )
    with torch.no_grad():
        tokens = vision_features(model.eval(), pixel_values_from_images(images))[1]
    x = tokens.reshape(-1, tokens.shape[-1]).double()
    mean = x.mean(0)
    share = float(mean @ mean) / float((x * x).sum(1).mean())
    assert stats["mean_share"] == pytest.approx(share, rel=1e-4)
    # A shared offset pushes the share towards 1.
    with torch.no_grad():
        model.model.multi_modal_projector.linear_2.bias.add_(100.0)
    assert visual_token_stats(model, TINY_SCENE, n_images=4)["mean_share"] > 0.99
