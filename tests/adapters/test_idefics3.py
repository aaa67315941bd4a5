"""Idefics3 and SmolVLM: the invariants of tests/test_api.py on split images with text markers.

Tiny random models of both classes are built here (a 32 px crop of 8 x 8 patches,
pixel-shuffled 2 x 2 to 4 x 4 tokens; images up to 64 px are split into up to 2 x 2 crops
plus the global crop), saved with ``save_pretrained`` and loaded back with
``from_pretrained``. Both use the Idefics3 processor: SmolVLM's own needs ``num2words``
and a torchvision video processor, and builds the same image prompt string
(``get_image_prompt_string``) from the same splitting.
"""

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import (
    Idefics3Config,
    Idefics3ForConditionalGeneration,
    Idefics3Processor,
    SmolVLMConfig,
    SmolVLMForConditionalGeneration,
)
from transformers.models.idefics3.image_processing_pil_idefics3 import Idefics3ImageProcessorPil

import zooprune
from tests.adapters.test_gemma3 import EOS
from tests.adapters.test_llava_next import inputs
from tests.test_api import greedy, masked_reference
from zooprune import METHODS, PruneError
from zooprune.budget import split_evenly
from zooprune.errors import PlaceholderMismatchError
from zooprune.tiny import SPECIAL, WORDS, word_tokenizer

CROP, PATCH, SCALE = 32, 4, 2
SIDE = CROP // PATCH // SCALE  # 4 x 4 tokens per crop
S = SIDE * SIDE
IMAGE = SPECIAL.index("<image>")
MARKERS = ["<fake_token_around_image>", "<global-img>", "<end_of_utterance>"] + [
    f"<row_{i}_col_{j}>" for i in range(1, 7) for j in range(1, 7)
]
VOCAB = SPECIAL + MARKERS + WORDS
CLASSES = {
    "idefics3": (Idefics3Config, Idefics3ForConditionalGeneration),
    "smolvlm": (SmolVLMConfig, SmolVLMForConditionalGeneration),
}
PROMPTS = [
    "<s> user <image> what is in the image ?",
    "<s> user <image> describe this picture",
    "<s> user what shape is the red square ? <image> left or right ?",
]


def processor() -> Idefics3Processor:
    images = Idefics3ImageProcessorPil(
        size={"longest_edge": 2 * CROP},
        max_image_size={"longest_edge": CROP},
        do_image_splitting=True,
    )
    return Idefics3Processor(
        image_processor=images, tokenizer=word_tokenizer(VOCAB, SPECIAL + MARKERS), image_seq_len=S
    )


def build(family, path):
    torch.manual_seed(0)
    config_class, model_class = CLASSES[family]
    config = config_class(
        vision_config={
            "image_size": CROP,
            "patch_size": PATCH,
            "hidden_size": 16,
            "intermediate_size": 32,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
        },
        text_config={
            "model_type": "llama",
            "vocab_size": len(VOCAB),
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "pad_token_id": 0,
            "bos_token_id": 2,
            "eos_token_id": 3,
        },
        scale_factor=SCALE,
        image_token_id=IMAGE,
    )
    model = model_class(config)
    model.generation_config.pad_token_id = 0
    model.eval().save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    return {family: build(family, tmp_path_factory.mktemp(family)) for family in CLASSES}


@pytest.fixture(params=sorted(CLASSES))
def family(request):
    return request.param


@pytest.fixture
def vlm(family, saved):
    return CLASSES[family][1].from_pretrained(saved[family]).eval()


@pytest.fixture(scope="module")
def proc():
    return processor()


@pytest.fixture(scope="module")
def pictures():
    # Wide (1 x 2 sub-crops + the global crop), tall (2 x 1 + 1), and two of 2 x 2 + 1.
    rng = np.random.default_rng(3)
    shapes = [(20, 70), (70, 20), (40, 60), (50, 50)]
    return [Image.fromarray(rng.integers(0, 256, (*s, 3), dtype=np.uint8)) for s in shapes]


def crop_count(batch, row):
    """Crops the processor made for prompt ``row`` (the rest of pixel_values is padding)."""
    return int((batch["pixel_values"][row].flatten(1) != 0).any(-1).sum())


# -- the invariants ---------------------------------------------------------------------


@pytest.mark.parametrize("method", sorted(set(METHODS) - {"visionzip"}))
def test_keep_all_tokens_is_a_noop(vlm, proc, pictures, method):
    batch = inputs(proc, [pictures[:1], pictures[2:3]], PROMPTS[:2])
    tokens = greedy(vlm, batch)
    logits = vlm(**batch).logits
    with zooprune.prune(vlm, method, ratio=1.0) as handle:  # K = N of each image
        torch.testing.assert_close(vlm(**batch).logits, logits, rtol=0, atol=1e-5)
        assert torch.equal(greedy(vlm, batch), tokens)
    assert [s.num_tokens for s in handle.selection.images] == [3 * S, 5 * S]
    assert [s.kept for s in handle.selection.images] == [3 * S, 5 * S]


@pytest.mark.parametrize("positions", ["original", "compact"])
@pytest.mark.parametrize(
    ("method", "crop_budget"),
    [("zoo", "split"), ("divprune", "global"), ("grid", "split"), ("random", "global")],
)
def test_pruned_forward_equals_masked_unpruned(vlm, proc, pictures, method, crop_budget, positions):
    batch = inputs(proc, [pictures[1:2]], PROMPTS[2:3])
    with zooprune.prune(vlm, method, keep=9, positions=positions, crop_budget=crop_budget) as h:
        pruned = vlm(**batch).logits
        kept = h.selection.images[0].positions
    ids = batch["input_ids"]
    keep = ids[0] != IMAGE
    keep[kept] = True
    place = torch.arange(ids.shape[1])
    if positions == "compact":
        place = place - (~keep).long().cumsum(0)
    reference = masked_reference(vlm, batch, kept, place[None])
    assert h.selection.kept == 9
    assert pruned.shape[1] == int(keep.sum()) == ids.shape[1] - (3 * S - 9)
    torch.testing.assert_close(pruned[0], reference[0, keep], rtol=0, atol=1e-5)


def test_generate_with_cache_equals_no_cache_loop(vlm, proc, pictures):
    batch = inputs(proc, [pictures[3:4]], PROMPTS[:1])
    with zooprune.prune(vlm, "zoo", keep=6, positions="original"):
        generated = vlm.generate(
            **batch, max_new_tokens=6, do_sample=False, suppress_tokens=[IMAGE, EOS]
        )
        ids = batch["input_ids"]
        for _ in range(6):
            logits = vlm(
                input_ids=ids,
                pixel_values=batch["pixel_values"],
                pixel_attention_mask=batch["pixel_attention_mask"],
                use_cache=False,
            ).logits
            logits[..., [IMAGE, EOS]] = float("-inf")
            ids = torch.cat([ids, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(generated, ids)


@pytest.mark.parametrize(("method", "crop_budget"), [("zoo", "split"), ("pool", "global")])
def test_batch_equals_each_prompt_alone(vlm, proc, pictures, method, crop_budget):
    # Left padding, images with different crop counts (so different N), a prompt with two
    # images, and pixel_values padded with empty crops: prompts lose different numbers.
    prompts = [PROMPTS[0], PROMPTS[1] + " <image> and this ?", PROMPTS[2]]
    per_prompt = [pictures[:1], pictures[1:3], pictures[3:4]]
    batch = inputs(proc, per_prompt, prompts)
    options = {"max_new_tokens": 4, "do_sample": False, "suppress_tokens": [IMAGE, EOS]}
    options |= {"output_scores": True, "return_dict_in_generate": True}
    with zooprune.prune(vlm, method, keep=7, crop_budget=crop_budget) as handle:
        together = vlm.generate(**batch, **options)
        assert [s.prompt for s in handle.selection.images] == [0, 1, 1, 2]
        assert [s.num_tokens for s in handle.selection.images] == [3 * S, 3 * S, 5 * S, 5 * S]
        for row, (prompt, group) in enumerate(zip(prompts, per_prompt, strict=True)):
            alone = vlm.generate(**inputs(proc, [group], [prompt]), **options)
            assert torch.equal(together.sequences[row, -4:], alone.sequences[0, -4:])
            torch.testing.assert_close(
                together.scores[0][row], alone.scores[0][0], rtol=0, atol=1e-4
            )


def test_remove_restores_the_model_exactly(vlm, proc, pictures, saved, family):
    batch = inputs(proc, [pictures[:1]], PROMPTS[:1])
    before = vlm(**batch).logits
    attributes = set(vlm.__dict__)
    handle = zooprune.prune(vlm, "zoo", keep=4)
    assert vlm(**batch).logits.shape[1] == before.shape[1] - (3 * S - 4)
    handle.remove()
    handle.remove()  # harmless twice
    assert set(vlm.__dict__) == attributes
    assert vlm.forward.__func__ is type(vlm).forward
    assert torch.equal(vlm(**batch).logits, before)
    fresh = CLASSES[family][1].from_pretrained(saved[family]).eval()
    assert torch.equal(greedy(vlm, batch), greedy(fresh, batch))
    zooprune.prune(vlm, "grid", keep=3).remove()  # can be pruned again after removal


@pytest.mark.parametrize("method", ["zoo", "grid"])
def test_unsplit_images_prune_like_single_crop_models(vlm, proc, pictures, method):
    # Every run is a global crop, two images share a prompt: each image is one crop.
    batch = proc(
        images=[pictures[:2]],
        text=[PROMPTS[1] + " <image> and this ?"],
        return_tensors="pt",
        do_image_splitting=False,
    )
    with zooprune.prune(vlm, method, keep=5, positions="original") as handle:
        pruned = vlm(**batch).logits
    images = handle.selection.images
    assert [(s.num_tokens, s.kept, s.grid) for s in images] == [(S, 5, (SIDE, SIDE))] * 2
    assert all(bool((s.crops == 0).all()) for s in images)
    kept = torch.cat([s.positions for s in images])
    keep = batch["input_ids"][0] != IMAGE
    keep[kept] = True
    place = torch.arange(batch["input_ids"].shape[1])[None]
    reference = masked_reference(vlm, batch, kept, place)
    torch.testing.assert_close(pruned[0], reference[0, keep], rtol=0, atol=1e-5)


# -- budget semantics and the record ----------------------------------------------------


@pytest.mark.parametrize("crop_budget", ["split", "global"])
def test_budget_counts_visual_tokens_and_is_split_evenly_over_crops(
    vlm, proc, pictures, crop_budget
):
    batch = inputs(proc, [pictures[:1], pictures[3:4]], PROMPTS[:2])
    with zooprune.prune(vlm, "zoo", keep=7, crop_budget=crop_budget) as handle:
        vlm(**batch)
    for image in handle.selection.images:
        crops = crop_count(batch, image.prompt)
        # N is every placeholder of the image: the markers are text, not placeholders.
        assert (
            image.num_tokens == crops * S == int((batch["input_ids"][image.prompt] == IMAGE).sum())
        )
        assert image.kept == 7 and image.patch_grids == ((SIDE, SIDE),) * crops
        kept_per_crop = torch.bincount(image.crops, minlength=crops).tolist()
        if crop_budget == "split":  # the global crop (0) first, then the sub-crops
            assert kept_per_crop == split_evenly(7, [S] * crops)
    # The markers all stay.
    with zooprune.prune(vlm, "grid", keep=2) as handle:
        prepared = handle.prepare(dict(batch), for_generate=False)
    for marker in ("<fake_token_around_image>", "<global-img>", "<row_1_col_2>"):
        token = VOCAB.index(marker)
        before = (batch["input_ids"] == token).sum(-1)
        assert torch.equal((prepared["input_ids"] == token).sum(-1), before)


def test_record_maps_kept_tokens_to_crop_cells(vlm, proc, pictures):
    """Each kept token's (crop, cell) names the connector output the model put at its place."""
    batch = inputs(proc, [pictures[:1], pictures[1:2]], PROMPTS[:2])
    with zooprune.prune(vlm, "divprune", keep=12) as handle:
        prepared = handle.prepare(dict(batch), for_generate=False)
    with torch.no_grad():
        full = vlm.model.get_image_features(
            batch["pixel_values"], batch["pixel_attention_mask"]
        ).pooler_output  # per prompt [crops * S, D]
    placed = prepared["mm_encoder_outputs"]["image"].pooler_output
    for image, tokens in zip(handle.selection.images, placed, strict=True):
        crops = crop_count(batch, image.prompt)
        assert bool((image.cells >= 0).all() & (image.cells < SIDE).all())
        assert image.boxes is None and image.regions() is None
        # The processor's crop order: sub-crops in raster order, then the global crop.
        pixel_crop = torch.where(image.crops == 0, crops - 1, image.crops - 1)
        per_crop = full[image.prompt].view(crops, S, -1)
        expected = per_crop[pixel_crop, image.cells[:, 0] * SIDE + image.cells[:, 1]]
        torch.testing.assert_close(tokens, expected, rtol=0, atol=0)
        # And the kept positions are the placeholders of those runs in the prompt.
        run = (batch["input_ids"][image.prompt] == IMAGE).nonzero().flatten()
        assert torch.equal(
            run[pixel_crop * S + image.cells[:, 0] * SIDE + image.cells[:, 1]], image.positions
        )


def test_the_projector_is_the_linear_after_the_pixel_shuffle(vlm, proc, pictures):
    # Without splitting an image is its global crop alone.
    batch = proc(
        images=[pictures[2:3]], text=PROMPTS[:1], return_tensors="pt", do_image_splitting=False
    )
    with torch.no_grad():
        patches = vlm.model.vision_model(batch["pixel_values"][0]).last_hidden_state  # [1, 64, d]
        # Token (i, j) of the shuffled grid holds the 2 x 2 patch window at (2i, 2j).
        grid = patches.view(1, 8, 8, -1)
        window = grid[0, 2:4, 4:6].reshape(-1)  # token (1, 2)
        token = vlm.model.connector.modality_projection(window)
        full = vlm.model.get_image_features(batch["pixel_values"]).pooler_output[0]
    torch.testing.assert_close(token, full[1 * SIDE + 2], rtol=0, atol=1e-6)
    with zooprune.prune(vlm, "zoo", keep=5, num_directions=8) as handle:
        vlm(**batch)
    assert handle.selection.details["estimator"] == "jvp"
    scores = handle.selection.scores[0]
    # A Linear's Jacobian is its weight: every token is equally sensitive, to the bit.
    assert bool((scores > 0).all()) and bool((scores == scores[0]).all())


# -- what the family cannot serve, and bad input -----------------------------------------


def test_visionzip_is_refused_naming_the_methods_that_apply(vlm):
    with pytest.raises(PruneError, match="cls_attention") as error:
        zooprune.prune(vlm, "visionzip", keep=4)
    usable = str(error.value).split("methods that apply: ")[1].split(", ")
    assert usable == sorted(set(METHODS) - {"visionzip"})
    assert "forward" not in vlm.__dict__


def test_bad_layout_options_are_refused(vlm):
    with pytest.raises(PruneError, match="crop_budget must be one of split, global"):
        zooprune.prune(vlm, "zoo", keep=4, crop_budget="per-row")
    with pytest.raises(PruneError, match="no option 'separators'"):  # no separators here
        zooprune.prune(vlm, "zoo", keep=4, separators="all")
    assert "forward" not in vlm.__dict__


def test_a_prompt_without_its_markers_is_refused(vlm, proc, pictures):
    batch = inputs(proc, [pictures[:1]], PROMPTS[:1])
    ids = batch["input_ids"].clone()
    first = int((ids[0] == IMAGE).nonzero()[0])
    ids[0, first - 1] = IMAGE  # a run now starts one token early
    with zooprune.prune(vlm, "zoo", keep=4):
        with pytest.raises(PlaceholderMismatchError):
            vlm(**batch | {"input_ids": ids})
