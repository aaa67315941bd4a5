"""LLaVA-NeXT and LLaVA-OneVision: the invariants of tests/test_api.py on AnyRes layouts.

Tiny random models of each family are built here, saved with ``save_pretrained`` and
loaded back with ``from_pretrained``. Three layouts run every invariant: LLaVA-NeXT
(CLIP, CLS dropped), OneVision (SigLIP, no CLS) and OneVision with ``anyres_max_1``, where
the model bilinearly shrinks the sub-crop grid.
"""

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import (
    CLIPVisionConfig,
    LlamaConfig,
    LlavaNextConfig,
    LlavaNextForConditionalGeneration,
    LlavaNextProcessor,
    LlavaOnevisionConfig,
    LlavaOnevisionForConditionalGeneration,
    LlavaOnevisionProcessor,
    Qwen2Config,
    SiglipVisionConfig,
)
from transformers.models.llava_next.image_processing_pil_llava_next import (
    LlavaNextImageProcessorPil,
)
from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches
from transformers.models.llava_onevision.image_processing_pil_llava_onevision import (
    LlavaOnevisionImageProcessorPil,
)

import zooprune
from tests.test_api import greedy, masked_reference
from zooprune import METHODS, PruneError
from zooprune.budget import split_evenly
from zooprune.tiny import SPECIAL, WORDS, word_level_llava_processor

CROP, PATCH = 24, 6  # 4 x 4 patches per crop
SIDE = CROP // PATCH
PINPOINTS = [[24, 48], [48, 24], [48, 48]]
IMAGE = SPECIAL.index("<image>")
FAMILIES = ["llava-next", "onevision", "onevision-shrunk"]
PROMPTS = [
    "<s> user <image> what is in the image ?",
    "<s> user <image> describe this picture",
    "<s> user what shape is the red square ? <image> left or right ?",
]


def tokenizer():
    # <video> is a word here so that OneVision's processor finds its video token.
    return word_level_llava_processor(SPECIAL + ["<video>"] + WORDS, CROP, PATCH).tokenizer


def text_config(cls, vocab_size):
    return cls(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        pad_token_id=0,
        bos_token_id=2,
        eos_token_id=3,
    )


def vision(cls):
    return cls(
        image_size=CROP,
        patch_size=PATCH,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
    )


class OnevisionProcessorWithoutVideo(LlavaOnevisionProcessor):
    """OneVision's processor for images only: its video processor needs torchvision."""

    def check_argument_for_proper_class(self, name, argument):
        if name == "video_processor" and argument is None:
            return None
        return super().check_argument_for_proper_class(name, argument)


def build(family, path):
    torch.manual_seed(0)
    vocab = len(tokenizer())
    if family == "llava-next":
        config = LlavaNextConfig(
            vision_config=vision(CLIPVisionConfig),
            text_config=text_config(LlamaConfig, vocab),
            image_token_id=IMAGE,
            image_grid_pinpoints=PINPOINTS,
            vision_feature_layer=-2,
            vision_feature_select_strategy="default",
        )
        model = LlavaNextForConditionalGeneration(config)
    else:
        config = LlavaOnevisionConfig(
            vision_config=vision(SiglipVisionConfig),
            text_config=text_config(Qwen2Config, vocab),
            image_token_id=IMAGE,
            video_token_id=SPECIAL.index("<image>") + 1,
            image_grid_pinpoints=PINPOINTS,
            vision_feature_layer=-1,
            vision_feature_select_strategy="full",
        )
        model = LlavaOnevisionForConditionalGeneration(config)
    model.generation_config.pad_token_id = 0
    model.eval().save_pretrained(path)
    return path


def processor_for(family):
    if family == "llava-next":
        images = LlavaNextImageProcessorPil(
            size={"shortest_edge": CROP},
            crop_size={"height": CROP, "width": CROP},
            image_grid_pinpoints=PINPOINTS,
        )
        return LlavaNextProcessor(
            image_processor=images,
            tokenizer=tokenizer(),
            patch_size=PATCH,
            vision_feature_select_strategy="default",
            image_token="<image>",
            num_additional_image_tokens=1,
        )
    images = LlavaOnevisionImageProcessorPil(
        size={"height": CROP, "width": CROP}, image_grid_pinpoints=PINPOINTS
    )
    return OnevisionProcessorWithoutVideo(
        image_processor=images,
        tokenizer=tokenizer(),
        video_processor=None,
        num_image_tokens=SIDE * SIDE,
        vision_feature_select_strategy="full",
        image_token="<image>",
        vision_aspect_ratio="anyres_max_1" if family == "onevision-shrunk" else "anyres_max_9",
    )


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    return {
        family: build(family, tmp_path_factory.mktemp(family))
        for family in ("llava-next", "onevision")
    }


@pytest.fixture(params=FAMILIES)
def family(request):
    return request.param


def load(family, saved):
    if family == "llava-next":
        return LlavaNextForConditionalGeneration.from_pretrained(saved[family]).eval()
    # The same weights; the config change makes the model shrink large sub-crop grids.
    extra = {"vision_aspect_ratio": "anyres_max_1"} if family == "onevision-shrunk" else {}
    return LlavaOnevisionForConditionalGeneration.from_pretrained(
        saved["onevision"], **extra
    ).eval()


@pytest.fixture
def vlm(family, saved):
    return load(family, saved)


@pytest.fixture
def proc(family):
    return processor_for(family)


@pytest.fixture(scope="module")
def pictures():
    # Wide, tall, square and very wide: different pinpoints, crops and unpadding.
    rng = np.random.default_rng(1)
    shapes = [(40, 60), (50, 30), (36, 36), (30, 80)]
    return [Image.fromarray(rng.integers(0, 256, (*s, 3), dtype=np.uint8)) for s in shapes]


def inputs(proc, per_prompt, prompts):
    """Images grouped by prompt (OneVision encodes an image sharing its prompt as one crop)."""
    return proc(images=per_prompt, text=prompts, return_tensors="pt", padding=True)


def image_inputs(batch):
    return {k: v for k, v in batch.items() if k not in ("input_ids", "attention_mask")}


def kept_positions(selection):
    return torch.cat([selection.positions, selection.separators]).sort().values


# -- the invariants ---------------------------------------------------------------------


@pytest.mark.parametrize("method", sorted(set(METHODS) - {"visionzip"}))
def test_keep_all_tokens_is_a_noop(vlm, proc, pictures, method):
    batch = inputs(proc, [pictures[:1], pictures[1:2]], PROMPTS[:2])
    tokens = greedy(vlm, batch)
    logits = vlm(**batch).logits
    with zooprune.prune(vlm, method, ratio=1.0) as handle:  # K = N of each image
        torch.testing.assert_close(vlm(**batch).logits, logits, rtol=0, atol=1e-5)
        assert torch.equal(greedy(vlm, batch), tokens)
    assert [s.kept for s in handle.selection.images] == [
        s.num_tokens for s in handle.selection.images
    ]


def test_visionzip_keep_all_rebuilds_the_same_tokens(saved, pictures):
    model = LlavaNextForConditionalGeneration.from_pretrained(saved["llava-next"]).eval()
    batch = inputs(processor_for("llava-next"), [pictures[:1]], PROMPTS[:1])
    logits = model(**batch).logits
    with zooprune.prune(model, "visionzip", ratio=1.0):
        torch.testing.assert_close(model(**batch).logits, logits, rtol=0, atol=1e-4)


@pytest.mark.parametrize("positions", ["original", "compact"])
@pytest.mark.parametrize(
    ("method", "crop_budget", "separators"),
    [
        ("zoo", "split", "all"),
        ("divprune", "global", "nonempty"),
        ("grid", "split", "nonempty"),
        ("random", "global", "all"),
    ],
)
def test_pruned_forward_equals_masked_unpruned(
    vlm, proc, pictures, method, crop_budget, separators, positions
):
    batch = inputs(proc, [pictures[:1]], PROMPTS[2:3])
    with zooprune.prune(
        vlm, method, keep=9, positions=positions, crop_budget=crop_budget, separators=separators
    ) as handle:
        pruned = vlm(**batch).logits
        kept = kept_positions(handle.selection.images[0])
    ids = batch["input_ids"]
    keep = ids[0] != IMAGE
    keep[kept] = True
    place = torch.arange(ids.shape[1])
    if positions == "compact":
        place = place - (~keep).long().cumsum(0)
    reference = masked_reference(vlm, batch, kept, place[None])
    assert handle.selection.kept == 9
    assert pruned.shape[1] == int(keep.sum())
    torch.testing.assert_close(pruned[0], reference[0, keep], rtol=0, atol=1e-5)


@pytest.mark.parametrize("separators", ["all", "nonempty"])
def test_generate_with_cache_equals_no_cache_loop(vlm, proc, pictures, separators):
    batch = inputs(proc, [pictures[3:4]], PROMPTS[:1])
    with zooprune.prune(vlm, "zoo", keep=6, positions="original", separators=separators):
        generated = greedy(vlm, batch, steps=6)
        ids = batch["input_ids"]
        for _ in range(6):
            logits = vlm(input_ids=ids, **image_inputs(batch), use_cache=False).logits
            logits[..., IMAGE] = float("-inf")
            ids = torch.cat([ids, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(generated, ids)


@pytest.mark.parametrize(("method", "crop_budget"), [("zoo", "split"), ("pool", "global")])
def test_batch_equals_each_prompt_alone(vlm, proc, pictures, method, crop_budget):
    # Left padding, images of different sizes (so different N and crops), and a prompt with
    # two images: the pruned prompts lose different numbers of tokens.
    prompts = [PROMPTS[0], PROMPTS[1] + " <image> and this ?", PROMPTS[2]]
    per_prompt = [pictures[:1], pictures[1:3], pictures[3:4]]
    batch = inputs(proc, per_prompt, prompts)
    options = {"max_new_tokens": 4, "do_sample": False, "suppress_tokens": [IMAGE]}
    options |= {"output_scores": True, "return_dict_in_generate": True}
    with zooprune.prune(vlm, method, keep=7, crop_budget=crop_budget) as handle:
        together = vlm.generate(**batch, **options)
        assert [s.prompt for s in handle.selection.images] == [0, 1, 1, 2]
        for row, (prompt, group) in enumerate(zip(prompts, per_prompt, strict=True)):
            alone = vlm.generate(**inputs(proc, [group], [prompt]), **options)
            assert torch.equal(together.sequences[row, -4:], alone.sequences[0, -4:])
            torch.testing.assert_close(
                together.scores[0][row], alone.scores[0][0], rtol=0, atol=1e-4
            )


def test_visionzip_batch_equals_each_prompt_alone(saved, pictures):
    model = LlavaNextForConditionalGeneration.from_pretrained(saved["llava-next"]).eval()
    proc = processor_for("llava-next")
    prompts, per_prompt = PROMPTS[:2], [pictures[:1], pictures[1:2]]
    batch = inputs(proc, per_prompt, prompts)
    with zooprune.prune(model, "visionzip", keep=20, contextual=1) as handle:
        together = model(**batch).logits[:, -1]
        assert handle.selection.kept == 40
        for row, (prompt, group) in enumerate(zip(prompts, per_prompt, strict=True)):
            alone = model(**inputs(proc, [group], [prompt])).logits[0, -1]
            torch.testing.assert_close(together[row], alone, rtol=0, atol=1e-4)


def test_remove_restores_the_model_exactly(vlm, proc, pictures, saved, family):
    batch = inputs(proc, [pictures[:1]], PROMPTS[:1])
    before = vlm(**batch).logits
    attributes = set(vlm.__dict__)
    handle = zooprune.prune(vlm, "zoo", keep=4, separators="nonempty")
    assert vlm(**batch).logits.shape[1] < before.shape[1]
    handle.remove()
    handle.remove()  # harmless twice
    assert set(vlm.__dict__) == attributes
    assert vlm.forward.__func__ is type(vlm).forward
    assert torch.equal(vlm(**batch).logits, before)
    assert torch.equal(greedy(vlm, batch), greedy(load(family, saved), batch))
    zooprune.prune(vlm, "grid", keep=3).remove()  # can be pruned again after removal


# -- budget semantics and the record ----------------------------------------------------


def crop_sizes(selection_image, layout_crops):
    return torch.bincount(layout_crops, minlength=len(selection_image.patch_grids)).tolist()


@pytest.mark.parametrize("crop_budget", ["split", "global"])
def test_budget_counts_visual_tokens_and_is_split_evenly_over_crops(
    vlm, proc, pictures, crop_budget
):
    batch = inputs(proc, [pictures[:1], pictures[1:2]], PROMPTS[:2])
    with zooprune.prune(vlm, "random", ratio=1.0) as full:
        vlm(**batch)
    with zooprune.prune(vlm, "zoo", keep=7, crop_budget=crop_budget) as handle:
        vlm(**batch)
    for image, everything in zip(handle.selection.images, full.selection.images, strict=True):
        row = batch["input_ids"][image.prompt]
        placeholders = int((row == IMAGE).sum())
        # N counts the visual tokens only: the separators are the rest of the run.
        assert image.num_tokens + everything.separators.numel() == placeholders
        assert image.kept == 7
        sizes = crop_sizes(image, everything.crops)
        kept_per_crop = torch.bincount(image.crops, minlength=len(sizes)).tolist()
        if crop_budget == "split":
            assert len(sizes) > 1 and kept_per_crop == split_evenly(7, sizes)
        assert all(k <= n for k, n in zip(kept_per_crop, sizes, strict=True))


@pytest.mark.parametrize("separators", ["all", "nonempty"])
def test_separators_policy(vlm, proc, pictures, separators):
    batch = inputs(proc, [pictures[3:4]], PROMPTS[:1])
    with zooprune.prune(vlm, "random", ratio=1.0) as full:
        vlm(**batch)
    every = full.selection.images[0]
    with zooprune.prune(vlm, "grid", keep=3, separators=separators) as handle:
        vlm(**batch)
    image = handle.selection.images[0]
    assert bool((batch["input_ids"][0, image.separators] == IMAGE).all())
    if separators == "all":
        assert torch.equal(image.separators, every.separators)
        return
    # A newline stays exactly when the row it closes keeps a token: the first newline at
    # or after a kept sub-crop token (base-crop tokens have none of their own, unless the
    # image is its base crop alone).
    rows = every.separators
    closing = set()
    for position, crop in zip(image.positions.tolist(), image.crops.tolist(), strict=True):
        after = rows[rows > position]
        if after.numel() and (crop > 0 or len(every.patch_grids) == 1):
            closing.add(int(after[0]))
    assert image.separators.tolist() == sorted(closing)
    assert image.separators.numel() < every.separators.numel()


def test_record_maps_kept_tokens_to_crop_cells(vlm, proc, pictures, family):
    """Each kept token's (crop, cell) names the tower output the model put at its place."""
    batch = inputs(proc, [pictures[:1], pictures[1:2]], PROMPTS[:2])
    with zooprune.prune(vlm, "divprune", keep=12) as handle:
        vlm(**batch)
    config = vlm.config
    counts = [
        image_size_to_num_patches(size, config.image_grid_pinpoints, CROP)
        for size in batch["image_sizes"]
    ]
    with torch.no_grad():
        pixels = torch.cat([p[:n] for p, n in zip(batch["pixel_values"], counts, strict=True)])
        hidden = vlm.model.vision_tower(pixels, output_hidden_states=True).hidden_states
        feats = hidden[config.vision_feature_layer]
        if config.vision_feature_select_strategy == "default":
            feats = feats[:, 1:]
        projected = vlm.model.multi_modal_projector(feats)  # [crops, SIDE * SIDE, D]
        packed = vlm.model.get_image_features(
            pixel_values=batch["pixel_values"], image_sizes=batch["image_sizes"]
        ).pooler_output
    first = 0
    for image, n in zip(handle.selection.images, counts, strict=True):
        assert image.patch_grids == ((SIDE, SIDE),) * n
        assert bool((image.cells >= 0).all() & (image.cells < SIDE).all())
        height, width = batch["image_sizes"][image.image].tolist()
        assert image.boxes[0] == (0.0, 0.0, height, width)  # the base crop: the whole image
        regions = image.regions()
        assert regions.shape == (12, 4) and bool((regions[:, 2:] > regions[:, :2]).all())
        # Sub-crop boxes tile a canvas that covers the image.
        boxes = torch.tensor(image.boxes[1:])
        assert boxes[:, 0].min() <= 0 and boxes[:, 1].min() <= 0
        assert boxes[:, 2].max() >= height and boxes[:, 3].max() >= width
        if family != "onevision-shrunk":  # shrunk tokens mix cells: no exact reference
            run = (batch["input_ids"][image.prompt] == IMAGE).nonzero().flatten()
            slot = torch.searchsorted(run, image.positions)
            cell = image.cells[:, 0] * SIDE + image.cells[:, 1]
            expected = projected[first + image.crops, cell]
            torch.testing.assert_close(packed[image.image][slot], expected, rtol=0, atol=1e-5)
        first += n


# -- what a family cannot serve, and bad options ----------------------------------------


def test_visionzip_is_refused_on_onevision_naming_the_methods_that_apply(saved):
    model = LlavaOnevisionForConditionalGeneration.from_pretrained(saved["onevision"]).eval()
    with pytest.raises(PruneError, match="cls_attention") as error:
        zooprune.prune(model, "visionzip", keep=4)
    usable = str(error.value).split("methods that apply: ")[1].split(", ")
    assert usable == sorted(set(METHODS) - {"visionzip"})
    assert "forward" not in model.__dict__


def test_bad_layout_options_are_refused(saved, model):
    next_model = LlavaNextForConditionalGeneration.from_pretrained(saved["llava-next"]).eval()
    with pytest.raises(PruneError, match="crop_budget must be one of split, global"):
        zooprune.prune(next_model, "zoo", keep=4, crop_budget="per-row")
    with pytest.raises(PruneError, match="separators must be one of all, nonempty"):
        zooprune.prune(next_model, "zoo", keep=4, separators="none")
    with pytest.raises(PruneError, match="no option 'crop_budget'"):  # LLaVA-1.5 has no crops
        zooprune.prune(model, "zoo", keep=4, crop_budget="global")
    assert "forward" not in next_model.__dict__ and "forward" not in model.__dict__


def test_images_with_videos_are_refused(saved, pictures):
    model = LlavaOnevisionForConditionalGeneration.from_pretrained(saved["onevision"]).eval()
    batch = inputs(processor_for("onevision"), [pictures[:1]], PROMPTS[:1])
    with zooprune.prune(model, "zoo", keep=4):
        with pytest.raises(PruneError, match="both images and videos"):
            model(**batch, pixel_values_videos=torch.zeros(1, 1, 3, CROP, CROP))


def test_gradients_reach_the_projector_and_newline(vlm, proc, pictures):
    batch = inputs(proc, [pictures[:1]], PROMPTS[:1])
    with zooprune.prune(vlm, "zoo", keep=6):
        vlm(**batch, labels=batch["input_ids"]).loss.backward()
    assert vlm.model.multi_modal_projector.linear_1.weight.grad.abs().sum() > 0
    assert vlm.model.image_newline.grad.abs().sum() > 0  # kept separators are the model's own


def test_bfloat16_model_end_to_end(saved, pictures):
    model = LlavaNextForConditionalGeneration.from_pretrained(
        saved["llava-next"], dtype=torch.bfloat16
    ).eval()
    batch = inputs(processor_for("llava-next"), [pictures[:1], pictures[3:4]], PROMPTS[:2])
    batch["pixel_values"] = batch["pixel_values"].bfloat16()
    with zooprune.prune(model, "zoo", keep=8) as handle:
        out = greedy(model, batch, steps=3)
    assert out.shape[1] == batch["input_ids"].shape[1] + 3
    assert handle.selection.scores[0].dtype == torch.float32
