"""Idefics3 and SmolVLM: the conformance suite on split images with text markers, and what is
their own (crops read off the prompt's markers, crop cells, the Linear connector).

Tiny random models of both classes are built here (a 32 px crop of 8 x 8 patches,
pixel-shuffled 2 x 2 to 4 x 4 tokens; images up to 64 px are split into up to 2 x 2 crops
plus the global crop), saved with ``save_pretrained`` and loaded back with
``from_pretrained``. Both use the Idefics3 processor: SmolVLM's own needs ``num2words``
and a torchvision video processor, and builds the same image prompt string
(``get_image_prompt_string``) from the same splitting.
"""

import pytest
import torch
from transformers import (
    Idefics3Config,
    Idefics3ForConditionalGeneration,
    Idefics3Processor,
    SmolVLMConfig,
    SmolVLMForConditionalGeneration,
)
from transformers.models.idefics3.image_processing_pil_idefics3 import Idefics3ImageProcessorPil

import zooprune
from tests.adapters.conformance import (
    CROP_BATCH_CASES,
    CROP_CASES,
    AdapterConformance,
    FamilyTester,
    UnsplitConformance,
    random_pictures,
)
from zooprune.budget import split_evenly
from zooprune.errors import PlaceholderMismatchError
from zooprune.tiny import SPECIAL, WORDS, word_tokenizer

CROP, PATCH, SCALE = 32, 4, 2
SIDE = CROP // PATCH // SCALE  # 4 x 4 tokens per crop
S = SIDE * SIDE
IMAGE = SPECIAL.index("<image>")
EOS = SPECIAL.index("</s>")
MARKERS = ["<fake_token_around_image>", "<global-img>", "<end_of_utterance>"] + [
    f"<row_{i}_col_{j}>" for i in range(1, 7) for j in range(1, 7)
]
VOCAB = SPECIAL + MARKERS + WORDS
CLASSES = {
    "idefics3": (Idefics3Config, Idefics3ForConditionalGeneration),
    "smolvlm": (SmolVLMConfig, SmolVLMForConditionalGeneration),
}


def processor() -> Idefics3Processor:
    images = Idefics3ImageProcessorPil(
        size={"longest_edge": 2 * CROP},
        max_image_size={"longest_edge": CROP},
        do_image_splitting=True,
    )
    return Idefics3Processor(
        image_processor=images, tokenizer=word_tokenizer(VOCAB, SPECIAL + MARKERS), image_seq_len=S
    )


def build(family, path, text_width=32, text_heads=4):
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
            "hidden_size": text_width,
            "intermediate_size": 2 * text_width,
            "num_hidden_layers": 2,
            "num_attention_heads": text_heads,
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


def crop_count(batch, row):
    """Crops the processor made for prompt ``row`` (the rest of pixel_values is padding)."""
    return int((batch["pixel_values"][row].flatten(1) != 0).any(-1).sum())


class Idefics3Tester(FamilyTester):
    image_token = IMAGE
    banned = (IMAGE, EOS)  # </s> too: a prompt alone would stop early
    keep = 9
    pruned_cases = CROP_CASES
    batch_cases = CROP_BATCH_CASES
    unsplit = {"do_image_splitting": False}
    crop_grid = (SIDE, SIDE)

    def __init__(self, family):
        self.name = family
        self.model_class = CLASSES[family][1]

    def build(self, path):
        return build(self.name, path)

    def processor(self):
        return processor()

    def pictures(self):
        # Wide (1 x 2 sub-crops + the global crop), tall (2 x 1 + 1), and two of 2 x 2 + 1.
        return random_pictures(3, [(20, 70), (70, 20), (40, 60), (50, 50)])

    # Unpruned, vLLM's tower already parts from HF's on a crop padded by the split (the
    # tall picture): first-step log-probabilities 3.5e-4 apart, 1e-4 on the others.
    vllm_logprob_tolerance = 1e-2
    vllm_rounding_ranked = {
        ("zoo", "zo"): "the connector is one Linear: its Jacobian is the same at every "
        "token, so finite differences differ between tokens by rounding only"
    }

    def vllm_build(self, path):
        build(self.name, path, text_width=64, text_heads=2)
        self.vllm_hf_processor(path).save_pretrained(path)
        return path

    def vllm_hf_processor(self, path):
        if self.name == "idefics3":
            return processor()
        # vLLM reads SmolVLM's own processor (it needs num2words, and its video processor
        # torchvision: there in vLLM's environment only); it lays images out as Idefics3's.
        from transformers import SmolVLMProcessor, SmolVLMVideoProcessor
        from transformers.models.smolvlm.image_processing_pil_smolvlm import (
            SmolVLMImageProcessorPil,
        )

        images = SmolVLMImageProcessorPil(
            size={"longest_edge": 2 * CROP},
            max_image_size={"longest_edge": CROP},
            do_image_splitting=True,
        )
        tokenizer = word_tokenizer(VOCAB, SPECIAL + MARKERS)
        return SmolVLMProcessor(images, tokenizer, SmolVLMVideoProcessor(), image_seq_len=S)


class Idefics3Specifics(UnsplitConformance, AdapterConformance):
    """What Idefics3 and SmolVLM check beyond the suite."""

    @pytest.mark.parametrize("crop_budget", ["split", "global"])
    def test_budget_counts_visual_tokens_and_is_split_evenly_over_crops(
        self, vlm, proc, pictures, crop_budget
    ):
        batch = self.tester.inputs(proc, [pictures[:1], pictures[3:4]], self.tester.prompts[:2])
        with zooprune.prune(vlm, "zoo", keep=7, crop_budget=crop_budget) as handle:
            vlm(**batch)
        for image in handle.selection.images:
            crops = crop_count(batch, image.prompt)
            # N is every placeholder of the image: the markers are text, not placeholders.
            assert (
                image.num_tokens
                == crops * S
                == int((batch["input_ids"][image.prompt] == IMAGE).sum())
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

    def test_record_maps_kept_tokens_to_crop_cells(self, vlm, proc, pictures):
        """Each kept token's (crop, cell) names the connector output the model put at its place."""
        batch = self.tester.inputs(proc, [pictures[:1], pictures[1:2]], self.tester.prompts[:2])
        with zooprune.prune(vlm, "divprune", keep=12) as handle:
            prepared = handle.prepare(dict(batch), for_generate=False)
        with torch.no_grad():
            full = vlm.model.get_image_features(
                batch["pixel_values"], batch["pixel_attention_mask"]
            ).pooler_output  # every real crop's S tokens, prompt by prompt
        full = torch.cat([f.reshape(-1, f.shape[-1]) for f in full])
        images = handle.selection.images
        placed = prepared["mm_encoder_outputs"]["image"].pooler_output[:, 0]
        placed = placed.split([image.kept for image in images])
        counts = [crop_count(batch, image.prompt) for image in images]
        firsts = [sum(counts[:i]) for i in range(len(counts))]
        for image, tokens, crops, first in zip(images, placed, counts, firsts, strict=True):
            assert bool((image.cells >= 0).all() & (image.cells < SIDE).all())
            assert image.boxes is None and image.regions() is None
            # The processor's crop order: sub-crops in raster order, then the global crop.
            pixel_crop = torch.where(image.crops == 0, crops - 1, image.crops - 1)
            per_crop = full[first * S : (first + crops) * S].view(crops, S, -1)
            expected = per_crop[pixel_crop, image.cells[:, 0] * SIDE + image.cells[:, 1]]
            torch.testing.assert_close(tokens, expected, rtol=0, atol=0)
            # And the kept positions are the placeholders of those runs in the prompt.
            run = (batch["input_ids"][image.prompt] == IMAGE).nonzero().flatten()
            assert torch.equal(
                run[pixel_crop * S + image.cells[:, 0] * SIDE + image.cells[:, 1]], image.positions
            )

    def test_the_projector_is_the_linear_after_the_pixel_shuffle(self, vlm, proc, pictures):
        # Without splitting an image is its global crop alone.
        batch = proc(
            images=[pictures[2:3]],
            text=self.tester.prompts[:1],
            return_tensors="pt",
            do_image_splitting=False,
        )
        with torch.no_grad():
            patches = vlm.model.vision_model(
                batch["pixel_values"][0]
            ).last_hidden_state  # [1, 64, d]
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

    def test_a_prompt_without_its_markers_is_refused(self, vlm, proc, pictures):
        batch = self.tester.inputs(proc, [pictures[:1]], self.tester.prompts[:1])
        ids = batch["input_ids"].clone()
        first = int((ids[0] == IMAGE).nonzero()[0])
        ids[0, first - 1] = IMAGE  # a run now starts one token early
        with zooprune.prune(vlm, "zoo", keep=4):
            with pytest.raises(PlaceholderMismatchError):
                vlm(**batch | {"input_ids": ids})


class TestIdefics3(Idefics3Specifics):
    tester = Idefics3Tester("idefics3")


class TestSmolVLM(Idefics3Specifics):
    tester = Idefics3Tester("smolvlm")
