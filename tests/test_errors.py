"""Every bad input raises the documented error and leaves the model untouched."""

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import zooprune
from zooprune import (
    AlreadyPrunedError,
    BudgetError,
    NonFiniteFeaturesError,
    PlaceholderMismatchError,
    PruneError,
    UnknownMethodError,
    UnsupportedModelError,
)

PROMPT = "<s> user <image> what is in the image ?"


def untouched(model):
    return not {"forward", "generate", "_zooprune_handle"} & set(model.__dict__)


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"keep": 0}, BudgetError, "keep must be positive"),
        ({"keep": -3}, BudgetError, "keep must be positive"),
        ({"keep": 2.5}, BudgetError, "keep must be an int"),
        ({"keep": "4"}, BudgetError, "keep must be an int"),
        ({"ratio": 0.0}, BudgetError, r"ratio must be in \(0, 1\]"),
        ({"ratio": 1.5}, BudgetError, r"ratio must be in \(0, 1\]"),
        ({"ratio": float("nan")}, BudgetError, r"ratio must be in \(0, 1\]"),
        ({}, BudgetError, "exactly one of keep"),
        ({"keep": 3, "ratio": 0.5}, BudgetError, "exactly one of keep"),
        ({"keep": 3, "positions": "middle"}, PruneError, "positions must be"),
        (
            {"keep": 3, "num_direction": 4},
            PruneError,
            "its options are: center, estimator, num_directions",
        ),
        ({"keep": 3, "estimator": "magic"}, PruneError, "estimator must be one of auto, exact"),
        ({"keep": 3, "zo_dtype": "float16"}, PruneError, "applies to estimator='zo' only"),
        ({"keep": 3, "estimator": "zo", "zo_dtype": "int8"}, PruneError, "zo_dtype must be one of"),
        ({"keep": 3, "num_directions": 0}, PruneError, "num_directions must be an int >= 1"),
        ({"keep": 3, "step": -1.0}, PruneError, "step must be finite and positive"),
    ],
)
def test_bad_arguments(model, kwargs, error, message):
    with pytest.raises(error, match=message):
        zooprune.prune(model, "zoo", **kwargs)
    assert untouched(model)


@pytest.mark.parametrize(
    ("method", "kwargs", "message"),
    [
        ("zoo", {"step": float("inf")}, "step must be finite and positive, got inf"),
        ("zoo", {"step": float("nan")}, "step must be finite and positive"),
        ("zoo", {"step": "0.1"}, "step must be a number"),
        ("zoo", {"seed": "x"}, "seed must be an int, got 'x'"),
        ("zoo", {"seed": 1.5}, "seed must be an int"),
        ("zoo", {"seed": None}, "seed must be an int"),
        ("zoo", {"seed": -1}, r"seed must be an int in \[0, "),
        ("zoo", {"num_directions": 4.0}, "num_directions must be an int"),
        ("zoo", {"rank": True}, "rank must be an int"),
        ("random", {"seed": "x"}, "seed must be an int"),
        ("visionzip", {"contextual": -1}, r"contextual must be an int in \[0, 7\], got -1"),
        ("visionzip", {"contextual": 8}, r"contextual must be an int in \[0, 7\], got 8"),
        ("visionzip", {"contextual": 2.5}, "contextual must be an int"),
        ("visionzip", {"contextual": "a"}, "contextual must be an int"),
        ("visionzip", {"cls_token": 1}, "cls_token must be True or False"),
    ],
)
def test_bad_option_values_are_refused_by_prune(model, method, kwargs, message):
    with pytest.raises(PruneError, match=message):
        zooprune.prune(model, method, keep=8, **kwargs)
    assert untouched(model)


def test_options_that_do_not_fit_an_image_under_ratio_name_it(model, processor, images):
    # Under ratio= the kept count is known per image only: checked at the call, as a
    # PruneError naming the image, and the handle keeps working.
    batch = processor(images=images[:1], text=[PROMPT], return_tensors="pt")
    with zooprune.prune(model, "visionzip", ratio=0.1, contextual=6) as handle:
        with pytest.raises(PruneError, match="image 0: visionzip's contextual=6 leaves no"):
            model(**batch)
        assert handle.selection is None


def test_unknown_method_lists_the_known_ones(model):
    known = (
        "cdpruner, dart, divprune, fastv, grid, holitom, mmtok, pdrop, pool, random, "
        "sensitivity, sparsevlm, visionzip, vispruner, zoo"
    )
    with pytest.raises(UnknownMethodError, match=f"known methods: {known}, zoo-sum$"):
        zooprune.prune(model, "fastest", keep=3)
    assert untouched(model)


def test_unsupported_model_names_the_supported_classes():
    lm = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=16,
            hidden_size=8,
            intermediate_size=16,
            num_hidden_layers=1,
            num_attention_heads=2,
        )
    )
    with pytest.raises(
        UnsupportedModelError, match="LlamaForCausalLM.*LlavaForConditionalGeneration"
    ):
        zooprune.prune(lm, keep=3)
    assert untouched(lm)


def test_pruning_twice_is_refused(model):
    handle = zooprune.prune(model, keep=3)
    with pytest.raises(AlreadyPrunedError, match="remove"):
        zooprune.prune(model, "grid", keep=5)
    assert model.__dict__["_zooprune_handle"] is handle
    handle.remove()
    assert untouched(model)


def test_keep_larger_than_the_image_names_the_image(model, processor, images):
    batch = processor(images=images[:2], text=[PROMPT, PROMPT], return_tensors="pt", padding=True)
    with zooprune.prune(model, keep=65):
        with pytest.raises(BudgetError, match="keep=65 exceeds image 0's 64 visual tokens"):
            model(**batch)


def test_ratio_that_keeps_nothing(model, processor, images):
    batch = processor(images=images[:1], text=[PROMPT], return_tensors="pt")
    with zooprune.prune(model, ratio=0.01):
        with pytest.raises(BudgetError, match="keeps no token of image 0"):
            model(**batch)


def test_non_finite_features(model, processor, images):
    batch = processor(images=images[:2], text=[PROMPT, PROMPT], return_tensors="pt", padding=True)
    batch["pixel_values"][1, :, :3, :3] = float("nan")
    with zooprune.prune(model, keep=4):
        with pytest.raises(NonFiniteFeaturesError, match="image 1"):
            model.generate(**batch, max_new_tokens=2)


def test_prompt_tokens_that_do_not_match_the_images(model, processor, images):
    batch = processor(images=images[:1], text=[PROMPT], return_tensors="pt")
    short = {**batch, "input_ids": batch["input_ids"][:, :-5].clone()}
    short["input_ids"][0, 3] = 5  # one placeholder fewer
    short["attention_mask"] = batch["attention_mask"][:, :-5]
    with zooprune.prune(model, keep=4):
        with pytest.raises(PlaceholderMismatchError, match="63 image tokens but the 1 image"):
            model(**short)
        two_images = torch.cat([batch["pixel_values"]] * 2)
        with pytest.raises(PlaceholderMismatchError, match="64 image tokens but the 2 image"):
            model(**batch | {"pixel_values": two_images})


def test_image_split_across_prompts(model, processor, images):
    batch = processor(images=images[:2], text=[PROMPT, PROMPT], return_tensors="pt", padding=True)
    ids = batch["input_ids"].clone()
    row0 = (ids[0] == 4).nonzero()[:, 0]
    ids[0, row0[-1]] = 5  # move one placeholder of image 0 into prompt 1
    text = (ids[1] != 4).nonzero()[:, 0]
    ids[1, text[-1]] = 4
    with zooprune.prune(model, keep=4):
        with pytest.raises(PlaceholderMismatchError, match="split across prompts"):
            model(**batch | {"input_ids": ids})


def test_inputs_embeds_instead_of_ids(model, processor, images):
    batch = processor(images=images[:1], text=[PROMPT], return_tensors="pt")
    embeds = model.get_input_embeddings()(batch["input_ids"])
    with zooprune.prune(model, keep=4):
        with pytest.raises(PruneError, match="needs input_ids"):
            model(inputs_embeds=embeds, pixel_values=batch["pixel_values"])


def test_errors_leave_the_wrapped_model_working(model, processor, images):
    batch = processor(images=images[:1], text=[PROMPT], return_tensors="pt")
    before = model(**batch).logits
    with zooprune.prune(model, ratio=0.01) as handle:
        with pytest.raises(BudgetError):
            model(**batch)
        assert handle.selection is None
        handle.budget = type(handle.budget)(keep=64)  # the same handle works on good input
        torch.testing.assert_close(model(**batch).logits, before, rtol=0, atol=1e-5)
    assert torch.equal(model(**batch).logits, before)
    assert untouched(model)


def test_a_method_that_returns_unsorted_indices_is_caught(model, processor, images):
    from zooprune.select.registry import METHODS, MethodResult, register_method

    @register_method("_backwards", "test only")
    def backwards(tokens, k):
        n = tokens.projected.shape[1]
        return MethodResult(
            torch.arange(n - 1, n - 1 - k, -1).expand(tokens.projected.shape[0], -1)
        )

    try:
        batch = processor(images=images[:1], text=[PROMPT], return_tensors="pt")
        with zooprune.prune(model, "_backwards", keep=3):
            with pytest.raises(RuntimeError, match="not 3 distinct ascending"):
                model(**batch)
    finally:
        del METHODS["_backwards"]


def test_continuing_from_a_pruned_cache_is_refused(model, processor, images):
    batch = processor(images=images[:1], text=[PROMPT], return_tensors="pt")
    with zooprune.prune(model, keep=4):
        out = model.generate(
            **batch, max_new_tokens=2, return_dict_in_generate=True, suppress_tokens=[4]
        )
        with pytest.raises(PruneError, match="cache holds a pruned prompt"):
            model.generate(input_ids=out.sequences, past_key_values=out.past_key_values)
