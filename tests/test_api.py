"""The integration invariants: pruning is exactly "those visual tokens never existed"."""

import pytest
import torch

import zooprune
from zooprune import METHODS

PROMPTS = [
    "<s> user <image> what is in the image ?",
    "<s> user <image> describe this picture",
    "<s> user what shape is the red square ? <image> left or right ?",
]
N = 64  # the tiny model's 8 x 8 patch grid


def inputs(processor, images, prompts):
    return processor(images=images, text=prompts, return_tensors="pt", padding=True)


def greedy(model, batch, steps=5):
    # A random model may emit <image>; a prompt that then grows by one would no longer
    # match its images, so that token is banned in every generation loop here.
    return model.generate(**batch, max_new_tokens=steps, do_sample=False, suppress_tokens=[4])


@pytest.mark.parametrize("method", sorted(set(METHODS) - {"visionzip"}))
def test_keep_all_tokens_is_a_noop(model, processor, images, method):
    batch = inputs(processor, images[:2], PROMPTS[:2])
    tokens = greedy(model, batch)
    logits = model(**batch).logits
    with zooprune.prune(model, method, keep=N):
        assert torch.equal(greedy(model, batch), tokens)
        torch.testing.assert_close(model(**batch).logits, logits, rtol=0, atol=1e-5)


def test_visionzip_keep_all_rebuilds_the_same_tokens(model, processor, images):
    # With k = N every contextual "merge" holds one token; projecting it again in float32
    # equals the model's own projection up to rounding.
    batch = inputs(processor, images[:1], PROMPTS[:1])
    logits = model(**batch).logits
    with zooprune.prune(model, "visionzip", keep=N):
        torch.testing.assert_close(model(**batch).logits, logits, rtol=0, atol=1e-4)


def masked_reference(model, batch, kept_positions, positions):
    """The unpruned model with the dropped image tokens masked out of attention."""
    ids = batch["input_ids"]
    mask = torch.ones_like(ids)
    mask[ids == model.config.image_token_id] = 0
    mask[0, kept_positions] = 1
    return model(**batch | {"attention_mask": mask, "position_ids": positions}).logits


@pytest.mark.parametrize("method", ["zoo", "divprune", "random", "grid"])
@pytest.mark.parametrize("positions", ["original", "compact"])
def test_pruned_forward_equals_masked_unpruned(model, processor, images, method, positions):
    batch = inputs(processor, images[:1], PROMPTS[2:3])
    with zooprune.prune(model, method, keep=11, positions=positions) as handle:
        pruned = model(**batch).logits
        kept = handle.selection.images[0].positions
    ids = batch["input_ids"]
    keep = ids[0] != model.config.image_token_id
    keep[kept] = True
    place = torch.arange(ids.shape[1])
    if positions == "compact":
        place = place - (~keep).long().cumsum(0)
    reference = masked_reference(model, batch, kept, place[None])
    assert pruned.shape[1] == int(keep.sum())
    torch.testing.assert_close(pruned[0], reference[0, keep], rtol=0, atol=1e-5)


@pytest.mark.parametrize("positions", ["original", "compact"])
def test_generate_with_cache_equals_no_cache_loop(model, processor, images, positions):
    batch = inputs(processor, images[:1], PROMPTS[:1])
    with zooprune.prune(model, "zoo", keep=9, positions=positions):
        generated = greedy(model, batch, steps=6)
        ids = batch["input_ids"]
        for _ in range(6):
            logits = model(
                input_ids=ids, pixel_values=batch["pixel_values"], use_cache=False
            ).logits
            logits[..., 4] = float("-inf")
            ids = torch.cat([ids, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(generated, ids)


def test_generate_returns_the_callers_prompt(model, processor, images):
    batch = inputs(processor, images[:1], PROMPTS[:1])
    with zooprune.prune(model, "zoo", keep=5) as handle:
        out = greedy(model, batch, steps=3)
    assert torch.equal(out[:, : batch["input_ids"].shape[1]], batch["input_ids"])
    assert out.shape[1] == batch["input_ids"].shape[1] + 3
    assert handle.selection.kept == 5 and handle.selection.total == N


@pytest.mark.parametrize(
    ("method", "positions"),
    [("zoo", "compact"), ("zoo", "original"), ("visionzip", "compact"), ("pool", "original")],
)
def test_batch_equals_each_prompt_alone(model, processor, images, method, positions):
    # Prompts of different lengths (left padding) and one prompt with two images, so the
    # pruned prompts lose different numbers of tokens and must be re-padded.
    prompts = [PROMPTS[0], PROMPTS[1] + " <image> and this ?", PROMPTS[2]]
    per_prompt = [images[:1], images[1:3], images[3:4]]
    batch = inputs(processor, [im for group in per_prompt for im in group], prompts)
    with zooprune.prune(model, method, keep=7, positions=positions) as handle:
        together = model.generate(
            **batch,
            max_new_tokens=4,
            do_sample=False,
            output_scores=True,
            return_dict_in_generate=True,
            suppress_tokens=[4],
        )
        assert [s.prompt for s in handle.selection.images] == [0, 1, 1, 2]
        for row, (prompt, group) in enumerate(zip(prompts, per_prompt, strict=True)):
            alone = model.generate(
                **inputs(processor, group, [prompt]),
                max_new_tokens=4,
                do_sample=False,
                output_scores=True,
                return_dict_in_generate=True,
                suppress_tokens=[4],
            )
            assert torch.equal(together.sequences[row, -4:], alone.sequences[0, -4:])
            torch.testing.assert_close(
                together.scores[0][row], alone.scores[0][0], rtol=0, atol=1e-4
            )


def test_remove_restores_the_model_exactly(model, processor, images):
    batch = inputs(processor, images[:1], PROMPTS[:1])
    before = model(**batch).logits
    attributes = set(model.__dict__)
    handle = zooprune.prune(model, "zoo", keep=4)
    assert model(**batch).logits.shape[1] == before.shape[1] - (N - 4)
    handle.remove()
    handle.remove()  # harmless twice
    assert set(model.__dict__) == attributes
    assert model.forward.__func__ is type(model).forward
    assert torch.equal(model(**batch).logits, before)
    assert torch.equal(
        greedy(model, batch), greedy(type(model).from_pretrained(model.name_or_path), batch)
    )
    zooprune.prune(model, "grid", keep=3).remove()  # can be pruned again after removal


def test_two_models_do_not_interfere(model, tiny_llava_dir, processor, images):
    other = type(model).from_pretrained(tiny_llava_dir).eval()
    batch = inputs(processor, images[:1], PROMPTS[:1])
    reference = other(**batch).logits
    first = zooprune.prune(model, "zoo", keep=4)
    second = zooprune.prune(other, "random", keep=N)  # keeps everything: other stays exact
    assert model(**batch).logits.shape[1] == reference.shape[1] - (N - 4)
    assert torch.equal(other(**batch).logits, reference)
    first.remove()
    assert torch.equal(other(**batch).logits, reference)
    assert second.selection.kept == N and first.selection.kept == 4
    second.remove()


def test_ratio_budget_uses_the_authors_rounding(model, processor, images):
    batch = inputs(processor, images[:1], PROMPTS[:1])
    with zooprune.prune(model, "divprune", ratio=0.1112) as handle:
        model(**batch)
    assert handle.selection.kept == int(0.1112 * N) == 7


def test_selection_record(model, processor, images):
    batch = inputs(processor, images[:2], PROMPTS[:2])
    with zooprune.prune(model, "zoo", keep=6, estimator="zo", num_directions=8) as handle:
        model(**batch)
    selection = handle.selection
    assert selection.method == "zoo" and selection.details["estimator"] == "zo"
    ids = batch["input_ids"]
    for image in selection.images:
        assert image.grid == (8, 8) and image.num_tokens == N
        assert image.indices.tolist() == sorted(set(image.indices.tolist()))
        assert image.scores.shape == (N,) and bool((image.scores > 0).all())
        # The kept positions are image placeholders of the image's own prompt, in order.
        assert bool((ids[image.prompt, image.positions] == 4).all())
        assert image.positions.tolist() == sorted(image.positions.tolist())


def test_selection_is_reproducible(model, processor, images):
    batch = inputs(processor, images[:1], PROMPTS[:1])
    picks = []
    for _ in range(2):
        with zooprune.prune(model, "zoo", keep=6, num_directions=8, seed=3) as handle:
            model(**batch)
        picks.append(handle.selection.indices[0])
    assert torch.equal(*picks)


def test_right_padded_forward_equals_each_prompt_alone(model, processor, images):
    prompts = [PROMPTS[0], PROMPTS[2]]
    processor.tokenizer.padding_side = "right"
    try:
        batch = inputs(processor, images[:2], prompts)
    finally:
        processor.tokenizer.padding_side = "left"
    assert bool((batch["attention_mask"][:, -1] == 0).any())
    with zooprune.prune(model, "zoo", keep=5, num_directions=8):
        together = model(**batch)
        lengths = batch["attention_mask"].sum(-1) - (N - 5)
        for row in range(2):
            alone = model(**inputs(processor, images[row : row + 1], prompts[row : row + 1]))
            real = together.logits[row, : int(lengths[row])]
            torch.testing.assert_close(real, alone.logits[0], rtol=0, atol=1e-4)


def test_numpy_integer_budgets_are_accepted(model, processor, images):
    import numpy as np

    batch = inputs(processor, images[:1], PROMPTS[:1])
    with zooprune.prune(model, "grid", keep=np.int64(9)) as handle:
        model(**batch)
    assert handle.selection.kept == 9


@pytest.mark.parametrize("estimator", ["exact", "zo", "jvp", "lowrank"])
def test_every_estimator_runs_and_is_recorded(model, processor, images, estimator):
    batch = inputs(processor, images[:1], PROMPTS[:1])
    with zooprune.prune(model, "zoo", keep=5, estimator=estimator, num_directions=8, rank=4) as h:
        model(**batch)
    assert h.selection.details["estimator"] == estimator
    assert bool((h.selection.scores[0] > 0).all())


def test_visionzip_uses_the_feature_layers_cls_attention(tiny_llava_dir, processor, images):
    eager = type_of_model().from_pretrained(tiny_llava_dir, attn_implementation="eager").eval()
    batch = inputs(processor, images[:1], PROMPTS[:1])
    tower = eager.model.vision_tower(batch["pixel_values"], output_attentions=True)
    # vision_feature_layer = -2: the features are the output of layers[-2]
    expected = tower.attentions[-2][0, :, 0, 1:].sum(dim=0)
    with zooprune.prune(eager, "visionzip", keep=12, contextual=2) as handle:
        eager(**batch)
    chosen = handle.selection.images[0]
    torch.testing.assert_close(chosen.scores, expected, atol=1e-5, rtol=1e-5)
    dominant = set(expected.argsort(descending=True)[:10].tolist())
    assert dominant <= set(chosen.indices.tolist())


def type_of_model():
    from transformers import LlavaForConditionalGeneration

    return LlavaForConditionalGeneration


def test_labels_are_shortened_and_the_loss_is_the_masked_one(model, processor, images):
    batch = inputs(processor, images[:1], PROMPTS[:1])
    labels = batch["input_ids"].clone()
    labels[labels == 4] = -100
    with zooprune.prune(model, "zoo", keep=6, positions="original") as handle:
        pruned = model(**batch, labels=labels)
    kept = handle.selection.images[0].positions
    place = torch.arange(labels.shape[1])[None]
    reference_logits = masked_reference(model, batch, kept, place)
    keep = batch["input_ids"][0] != 4
    keep[kept] = True
    reference = torch.nn.functional.cross_entropy(
        reference_logits[0, keep][:-1], labels[0, keep][1:], ignore_index=-100
    )
    torch.testing.assert_close(pruned.loss, reference, atol=1e-5, rtol=1e-5)


def test_gradients_reach_the_projector_through_kept_tokens(model, processor, images):
    batch = inputs(processor, images[:1], PROMPTS[:1])
    with zooprune.prune(model, "zoo", keep=6):
        model(**batch, labels=batch["input_ids"]).loss.backward()
    assert model.model.multi_modal_projector.linear_1.weight.grad.abs().sum() > 0


def test_bfloat16_model_end_to_end(tiny_llava_dir, processor, images):
    model = type_of_model().from_pretrained(tiny_llava_dir, dtype=torch.bfloat16).eval()
    batch = inputs(processor, images[:2], PROMPTS[:2])
    batch["pixel_values"] = batch["pixel_values"].bfloat16()
    with zooprune.prune(model, "zoo", keep=N) as handle:
        out = greedy(model, batch, steps=3)
    assert out.shape[1] == batch["input_ids"].shape[1] + 3
    assert handle.selection.details["estimator"] == "exact"
    assert handle.selection.scores[0].dtype == torch.float32


def test_prepare_gives_the_pruned_arguments(model, processor, images):
    batch = inputs(processor, images[:1], PROMPTS[:1])
    with zooprune.prune(model, "grid", keep=4) as handle:
        expected = model(**batch).logits
        prepared = handle.prepare(dict(batch), for_generate=False)
        assert prepared["input_ids"].shape[1] == batch["input_ids"].shape[1] - (N - 4)
        assert "pixel_values" not in prepared and "mm_encoder_outputs" in prepared
        assert int((prepared["input_ids"] == 4).sum()) == 4
    torch.testing.assert_close(model(**prepared).logits, expected)


def test_max_length_counts_the_callers_prompt(model, processor, images):
    batch = inputs(processor, images[:1], PROMPTS[:1])
    length = batch["input_ids"].shape[1]
    with zooprune.prune(model, "zoo", keep=4):
        out = model.generate(
            **batch, max_length=length + 3, min_length=length + 3, suppress_tokens=[4]
        )
    assert out.shape[1] == length + 3
