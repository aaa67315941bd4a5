"""Fast tests of the test-bed model, processor and training loop (tiny sizes)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from transformers import LlavaForConditionalGeneration

from zooprune.testbed import model as tb
from zooprune.testbed import scenes
from zooprune.testbed.model import (
    IMAGE_ID,
    encode_prompt,
    forward_answer_logits,
    load_testbed,
    num_image_tokens,
    pixel_values_from_images,
    prompt_text,
    save_testbed,
    vision_features,
)
from zooprune.testbed.train import (
    TrainConfig,
    _batch,
    _build,
    _make_optimizer,
    _step,
    active_families,
    evaluate,
    oracle_keep,
    patch_labels,
    random_keep,
    train,
    training_example,
)

TINY_SCENE = scenes.SceneConfig(image_size=48, patch_size=6, min_size=8, max_size=12, max_objects=3)
TINY_FAMILIES = ("color", "shape", "count", "exists", "spatial", "location")
TINY_MODEL = dict(
    vision_hidden=32,
    vision_layers=2,
    vision_heads=2,
    vision_ffn=64,
    text_hidden=32,
    text_layers=2,
    text_heads=2,
    text_ffn=64,
    max_positions=256,
)
TINY_TRAIN = TrainConfig(
    scene=TINY_SCENE,
    families=TINY_FAMILIES,
    model=TINY_MODEL,
    vision_steps=2,
    vision_batch=2,
    joint_steps=4,
    batch=2,
    warmup=2,
    eval_every=100,
    eval_n_per_family=1,
    log_every=1,
    checkpoint_every=1,
)


@pytest.fixture(scope="module")
def tiny():
    model, _, processor = _build(TINY_TRAIN)
    return model.eval(), processor


def test_default_processor_pixels_and_256_tokens():
    cfg = tb.testbed_config()
    proc = tb.testbed_processor(cfg)
    assert num_image_tokens(cfg) == 256
    s = scenes.make_sample("test", 5)
    inp = proc(images=s.scene.to_pil(), text=prompt_text([(s.question, None)]), return_tensors="pt")
    assert int((inp.input_ids == IMAGE_ID).sum()) == 256
    # No resize/crop distortion: exactly the CLIP normalisation of the raw pixels.
    assert inp.pixel_values.shape == (1, 3, 144, 144)
    torch.testing.assert_close(
        inp.pixel_values, pixel_values_from_images(s.scene.image[None]), rtol=0, atol=1e-6
    )
    ids, targets = encode_prompt([(s.question, s.answer)], proc.tokenizer.get_vocab(), 256)
    assert ids[:-1] == inp.input_ids[0].tolist()
    assert targets[len(ids) - 2] == proc.tokenizer.convert_tokens_to_ids(s.answer)
    assert sum(t >= 0 for t in targets) == 1


def test_round_trip_and_argmax_equals_generate(tiny, tmp_path):
    model, processor = tiny
    path = save_testbed(model, processor, tmp_path / "m")
    model2, proc2 = load_testbed(path)
    s = scenes.make_sample("test", 1, "shape", TINY_SCENE)
    text = prompt_text([(s.question, None)])
    inp = proc2(images=s.scene.to_pil(), text=text, return_tensors="pt")
    assert int((inp.input_ids == IMAGE_ID).sum()) == 64
    assert inp.input_ids.tolist() == processor(text=text, images=s.scene.to_pil()).input_ids
    with torch.no_grad():
        ref = model(**inp).logits[0, -1]
        torch.testing.assert_close(model2(**inp).logits[0, -1], ref)
        _, feats = vision_features(model2, inp.pixel_values)
        query = torch.zeros_like(inp.input_ids, dtype=torch.bool)
        query[0, -1] = True
        ours = forward_answer_logits(model2, inp.input_ids, feats, query)[0]
        torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-4)
        # Keeping every token is the unpruned forward.
        kept = forward_answer_logits(model2, inp.input_ids, feats, query, [torch.arange(64)])[0]
        torch.testing.assert_close(kept, ref, rtol=1e-4, atol=1e-4)
        gen = model2.generate(**inp, max_new_tokens=1, do_sample=False)
    assert int(gen[0, -1]) == int(ref.argmax())


def test_dropping_tokens_equals_masking_them_in_the_unpruned_model(tiny):
    # Two prompts of different lengths (right padding) and different kept subsets.
    model, processor = tiny
    samples = [
        scenes.make_sample("test", i, fam, TINY_SCENE) for i, fam in ((3, "shape"), (4, "spatial"))
    ]
    enc = [
        processor(
            images=s.scene.to_pil(), text=prompt_text([(s.question, None)]), return_tensors="pt"
        )
        for s in samples
    ]
    length = max(e.input_ids.shape[1] for e in enc)
    ids = torch.full((2, length), tb.PAD_ID, dtype=torch.long)
    query = torch.zeros(2, length, dtype=torch.bool)
    for r, e in enumerate(enc):
        ids[r, : e.input_ids.shape[1]] = e.input_ids[0]
        query[r, e.input_ids.shape[1] - 1] = True
    pixels = torch.cat([e.pixel_values for e in enc])
    keep = [torch.tensor([0, 5, 9, 30, 63]), torch.arange(10, 50, 3)]
    with torch.no_grad():
        _, feats = vision_features(model, pixels)
        ours = forward_answer_logits(model, ids, feats, query, keep)
        # Reference: the stock forward over the whole prompt, the dropped image tokens
        # (and the padding) masked out of attention, every token at its own position.
        mask = (ids != tb.PAD_ID).long()
        for r in range(2):
            image = (ids[r] == IMAGE_ID).nonzero().squeeze(1)
            dropped = torch.ones(image.numel(), dtype=torch.bool)
            dropped[keep[r]] = False
            mask[r, image[dropped]] = 0
        reference = model(input_ids=ids, pixel_values=pixels, attention_mask=mask).logits[query]
    torch.testing.assert_close(ours, reference, rtol=1e-4, atol=1e-4)


def test_keep_functions_and_evaluate(tiny):
    model, processor = tiny
    s = scenes.make_sample("test", 2, "shape", TINY_SCENE)
    feats = torch.zeros(64, 4)
    pixels = patch_labels(s.scene)["pixels"]
    n_obj = int((pixels > 0).sum())
    k = min(8, n_obj)
    keep = oracle_keep(k)(s, feats)
    assert len(keep) == k and (pixels[keep] > 0).all()
    assert len(set(random_keep(8)(s, feats))) == 8
    res = evaluate(model, processor, "test", 2, random_keep(8), TINY_FAMILIES, TINY_SCENE)
    assert set(res["families"]) == set(TINY_FAMILIES) and res["n"] == 12
    assert 0.0 <= res["overall"] <= 1.0


def test_joint_steps_reduce_loss_on_fixed_batch():
    model, heads, processor = _build(TINY_TRAIN)
    batch = _batch(TINY_TRAIN, 2, 0, processor.tokenizer.get_vocab(), 64)
    params = [*model.parameters(), *heads.parameters()]
    opt = torch.optim.AdamW(params, lr=3e-3)
    losses = []
    for _ in range(6):
        loss, _ = _step(2, model, heads, batch, TINY_TRAIN, TINY_SCENE.grid_size)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < 0.8 * losses[0]


def test_joint_training_starts_with_only_the_language_model_learning():
    model, heads, processor = _build(TINY_TRAIN)
    # The recipe's: the tower never learns, the projector only from a later step.
    assert TINY_TRAIN.lr_vision == 0.0 and TINY_TRAIN.projector_from_step > 0
    opt = _make_optimizer(2, model, heads, TINY_TRAIN)
    m = model.model
    frozen = {
        "projector": m.multi_modal_projector,
        "tower": m.vision_tower,
        "heads": heads,
    }
    before = {k: [p.detach().clone() for p in mod.parameters()] for k, mod in frozen.items()}
    lm_before = [p.detach().clone() for p in m.language_model.parameters()]
    batch = _batch(TINY_TRAIN, 2, 0, processor.tokenizer.get_vocab(), 64)
    for _ in range(2):
        loss, _ = _step(2, model, heads, batch, TINY_TRAIN, TINY_SCENE.grid_size)
        opt.zero_grad()
        loss.backward()
        opt.step()
    for name, mod in frozen.items():
        for p, q in zip(mod.parameters(), before[name], strict=True):
            assert p.grad is None, name  # no backward pass through frozen parts
            assert torch.equal(p, q), name
    moved = [
        not torch.equal(p, q) for p, q in zip(m.language_model.parameters(), lm_before, strict=True)
    ]
    assert sum(moved) > len(moved) // 2
    # From its step on (here the first), the projector trains.
    _make_optimizer(2, model, heads, dataclasses.replace(TINY_TRAIN, projector_from_step=0))
    assert all(p.requires_grad for p in m.multi_modal_projector.parameters())


def test_resume_reproduces_next_step_loss(tmp_path):
    def losses_of(out, stop):
        seen: dict[tuple[int, int], float] = {}
        train(
            TINY_TRAIN,
            out,
            lambda e: (
                seen.update({(e["phase"], e["step"]): e["loss"]}) if e["event"] == "step" else None
            ),
            stop_after_steps=stop,
        )
        return seen

    # 3 global steps = both vision steps and the first joint step.
    straight = losses_of(tmp_path / "a", 4)
    losses_of(tmp_path / "b", 3)
    resumed = losses_of(tmp_path / "b", 1)
    assert list(resumed) == [(2, 2)]
    assert resumed[(2, 2)] == pytest.approx(straight[(2, 2)], rel=1e-6, abs=1e-6)


def test_a_seed_reproduces_its_weights_exactly(tmp_path):
    # What the shipped checkpoint's claim rests on, at a size a test can afford: the
    # whole recipe (projector unfrozen mid-run and kept centred) twice from one seed.
    cfg = dataclasses.replace(TINY_TRAIN, projector_from_step=2, late_warmup=1)

    def weights(out, config):
        model = LlavaForConditionalGeneration.from_pretrained(train(config, out))
        return model.state_dict()

    first, second = weights(tmp_path / "a", cfg), weights(tmp_path / "b", cfg)
    assert all(torch.equal(first[k], second[k]) for k in first)
    other = weights(tmp_path / "c", dataclasses.replace(cfg, seed=1))
    assert not torch.equal(first["lm_head.weight"], other["lm_head.weight"])


def test_train_writes_model_and_curve(tmp_path):
    cfg = dataclasses.replace(TINY_TRAIN, vision_steps=1, joint_steps=1)
    path = train(cfg, tmp_path)
    assert (tmp_path / "curve.json").exists() and (tmp_path / "curve.png").exists()
    model = LlavaForConditionalGeneration.from_pretrained(path)
    assert model.config.vision_config.image_size == 48
    assert np.isfinite(sum(float(p.sum()) for p in model.parameters()))


QUESTION_FAMILY = {
    "what color": "color",
    "what shape": "shape",
    "how many": "count",
    "is there": "exists",
    "is the": "spatial",
    "where is": "location",
    "what digit": "glyph",
}


def family_of(question):
    return QUESTION_FAMILY[" ".join(question.split()[:2])]


def test_the_curriculum_adds_one_family_per_stage_and_training_asks_only_those():
    config = TrainConfig(curriculum_steps=10)
    order = config.curriculum_order
    assert active_families(config, 2, 0) == order[:2]
    assert active_families(config, 2, 9) == order[:2]
    assert active_families(config, 2, 10) == order[:3]
    assert active_families(config, 2, 10_000) == order
    assert set(order) == set(scenes.FAMILIES)
    assert active_families(config, 1, 0) == config.families  # phase 1 asks nothing anyway
    assert active_families(dataclasses.replace(config, curriculum_steps=0), 2, 0) == (
        config.families
    )
    # A family missing from the order joins after the ordered ones.
    partial = dataclasses.replace(config, curriculum_order=("count",), families=("shape", "count"))
    assert active_families(partial, 2, 0) == ("count", "shape")
    asked = {
        family_of(q)
        for index in range(40)
        for q, _ in training_example(index, config, order[:2])[1]
    }
    assert asked == set(order[:2])
    everything = {
        family_of(q) for index in range(40) for q, _ in training_example(index, config)[1]
    }
    assert everything == set(scenes.FAMILIES)
    # The batch of a step uses that step's families.
    vocab = tb.testbed_processor(tb.testbed_config()).tokenizer.get_vocab()
    ids = _batch(config, 2, 0, vocab, 256)["input_ids"]
    words = {w for w, i in vocab.items() if i in set(ids.flatten().tolist())}
    assert "digit" not in words and "many" not in words
