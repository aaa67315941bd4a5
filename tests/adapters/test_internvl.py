"""InternVL: the conformance suite on GotOcr2 tiles with a pixel-shuffle connector, and what is
its own (tiles read off the prompt, tile cells and boxes, CLS attention per window).

A tiny random ``InternVLForConditionalGeneration`` is built here (a 32 px tile of 8 x 8
InternViT patches plus CLS, pixel-shuffled 2 x 2 to 4 x 4 tokens; images cut into up to
4 sub-crops plus a thumbnail), saved with ``save_pretrained`` and loaded back with
``from_pretrained``. The processor is ``InternVLProcessor`` over ``GotOcr2ImageProcessorPil``
and a word-level tokenizer, without its video processor (which needs torchvision).
"""

import numpy as np
import pytest
import torch
from transformers import InternVLConfig, InternVLForConditionalGeneration, InternVLProcessor
from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import (
    GotOcr2ImageProcessorPil,
    get_optimal_tiled_canvas,
)

import zooprune
from tests.adapters.conformance import (
    CROP_BATCH_CASES,
    CROP_CASES,
    AdapterConformance,
    FamilyTester,
    UnsplitConformance,
    random_pictures,
)
from zooprune import METHODS, PruneError
from zooprune.adapters import adapter_for
from zooprune.budget import split_evenly
from zooprune.errors import PlaceholderMismatchError
from zooprune.tiny import SPECIAL, WORDS, word_tokenizer

TILE, PATCH = 32, 4  # 8 x 8 patches per tile
P = TILE // PATCH
SIDE = P // 2  # 4 x 4 tokens per tile after the pixel shuffle
S = SIDE * SIDE
MAX_TILES = 4
IMAGE = SPECIAL.index("<image>")  # the context token
EOS = SPECIAL.index("</s>")
MARKERS = ["<img>", "</img>", "<video>"]
VOCAB = SPECIAL + MARKERS + WORDS


class InternVLProcessorWithoutVideo(InternVLProcessor):
    """InternVL's processor for images only: its video processor needs torchvision."""

    def check_argument_for_proper_class(self, name, argument):
        if name == "video_processor" and argument is None:
            return None
        return super().check_argument_for_proper_class(name, argument)


def processor(video_processor=None) -> InternVLProcessor:
    tokenizer = word_tokenizer(
        VOCAB,
        SPECIAL + MARKERS,
        start_image_token="<img>",
        end_image_token="</img>",
        context_image_token="<image>",
        video_token="<video>",
    )
    images = GotOcr2ImageProcessorPil(
        size={"height": TILE, "width": TILE},
        crop_to_patches=True,
        min_patches=1,
        max_patches=MAX_TILES,
    )
    return InternVLProcessorWithoutVideo(
        image_processor=images,
        tokenizer=tokenizer,
        video_processor=video_processor,
        image_seq_length=S,
    )


def build(path, text_width=32, text_heads=4):
    config = InternVLConfig(
        vision_config={
            "image_size": TILE,
            "patch_size": PATCH,
            "hidden_size": 16,
            "intermediate_size": 32,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "use_qk_norm": True,
        },
        text_config={
            "model_type": "qwen2",
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
        image_token_id=IMAGE,
        image_seq_length=S,
    )
    model = InternVLForConditionalGeneration(config)
    # CLS token and position embeddings start at zero (a CLS that attends uniformly):
    # make them random so that CLS attention differs between patches.
    with torch.no_grad():
        embeddings = model.model.vision_tower.embeddings
        embeddings.cls_token.normal_()
        embeddings.position_embeddings.normal_(std=0.5)
    model.generation_config.pad_token_id = 0
    model.eval().save_pretrained(path)
    return path


def tiles_of(proc, picture):
    """Tiles the processor makes of ``picture``, from its own settings."""
    return proc.image_processor.get_number_of_image_patches(
        picture.height, picture.width, {"crop_to_patches": True}
    )


class InternVLTester(FamilyTester):
    name = "internvl"
    model_class = InternVLForConditionalGeneration
    image_token = IMAGE
    banned = (IMAGE, EOS)  # </s> too: a prompt alone would stop early
    keep = 9
    # Without contextual tokens VisionZip keeps the model's own tokens.
    pruned_cases = (*CROP_CASES, ("visionzip", {"crop_budget": "split", "contextual": 0}))
    batch_cases = CROP_BATCH_CASES
    fast = {"num_directions": 8}
    unsplit = {"crop_to_patches": False}
    crop_grid = (SIDE, SIDE)

    def build(self, path):
        return build(path)

    def processor(self):
        return processor()

    def vllm_build(self, path):
        build(path, text_width=64, text_heads=2)
        self.vllm_hf_processor(path).save_pretrained(path)
        return path

    def vllm_hf_processor(self, path):
        # The video processor needs torchvision: there in vLLM's environment only.
        from transformers import InternVLVideoProcessor

        return processor(InternVLVideoProcessor(size={"height": TILE, "width": TILE}))

    vllm_picture_size = (40, 60)

    def pictures(self):
        # Wide (3 x 1 sub-crops + thumbnail), tall (1 x 4 + 1), and two of 2 x 2 + 1 (one
        # chosen by GotOcr2's tie-break towards more tiles).
        return random_pictures(4, [(20, 70), (70, 20), (40, 60), (50, 50)])


class TestInternVL(UnsplitConformance, AdapterConformance):
    tester = InternVLTester()

    def test_visionzip_without_an_attention_layer_is_refused_naming_the_methods(self, saved):
        # Features taken from the embeddings (layer 0): no attention to read CLS from.
        model = self.tester.load(saved, vision_feature_layer=0)
        with pytest.raises(PruneError, match="cls_attention") as error:
            zooprune.prune(model, "visionzip", keep=4)
        usable = str(error.value).split("methods that apply: ")[1].split(", ")
        # no in-LM stage for fastv, pdrop, sparsevlm; vispruner reads the same CLS attention;
        # no video tower attention for holitom
        in_lm = {"fastv", "pdrop", "sparsevlm"}
        assert usable == sorted(set(METHODS) - {"visionzip", "vispruner", "holitom"} - in_lm)
        assert "forward" not in model.__dict__

    def test_gradients_reach_the_projector_and_tower(self, vlm, proc, pictures):
        batch = self.tester.inputs(proc, [pictures[:1]], self.tester.prompts[:1])
        with zooprune.prune(vlm, "zoo", keep=6):
            vlm(**batch, labels=batch["input_ids"]).loss.backward()
        assert vlm.model.multi_modal_projector.linear_1.weight.grad.abs().sum() > 0
        assert vlm.model.vision_tower.embeddings.cls_token.grad.abs().sum() > 0

    @pytest.mark.parametrize("crop_budget", ["split", "global"])
    def test_budget_counts_visual_tokens_and_is_split_evenly_over_tiles(
        self, vlm, proc, pictures, crop_budget
    ):
        batch = self.tester.inputs(proc, [pictures[:1], pictures[3:4]], self.tester.prompts[:2])
        with zooprune.prune(vlm, "zoo", keep=7, crop_budget=crop_budget) as handle:
            vlm(**batch)
        for image, picture in zip(handle.selection.images, [pictures[0], pictures[3]], strict=True):
            tiles = tiles_of(proc, picture)
            # N is every placeholder of the image: the markers are text, not placeholders.
            placeholders = int((batch["input_ids"][image.prompt] == IMAGE).sum())
            assert image.num_tokens == tiles * S == placeholders
            assert image.kept == 7 and image.patch_grids == ((SIDE, SIDE),) * tiles
            kept_per_crop = torch.bincount(image.crops, minlength=tiles).tolist()
            if crop_budget == "split":  # the thumbnail (crop 0) first, then the sub-crops
                assert kept_per_crop == split_evenly(7, [S] * tiles)
                assert kept_per_crop[0] == 2  # 7 over 4 or 5 tiles: the thumbnail gets a spare
        # The markers all stay.
        with zooprune.prune(vlm, "grid", keep=2) as handle:
            prepared = handle.prepare(dict(batch), for_generate=False)
        for marker in ("<img>", "</img>"):
            token = VOCAB.index(marker)
            before = (batch["input_ids"] == token).sum(-1)
            assert torch.equal((prepared["input_ids"] == token).sum(-1), before)
            assert before.tolist() == [1, 1]

    def test_record_maps_kept_tokens_to_tile_cells_and_boxes(self, vlm, proc, pictures):
        """Each kept token's (crop, cell) names the tile output the model put at its place."""
        group = [pictures[:1], pictures[1:3]]
        batch = self.tester.inputs(
            proc, group, [self.tester.prompts[0], self.tester.prompts[1] + " <image> and this ?"]
        )
        flat = [picture for pictures_ in group for picture in pictures_]
        with zooprune.prune(vlm, "divprune", keep=12) as handle:
            handle.prepare(dict(batch), for_generate=False)
            # The processor gives no image sizes: without them the boxes are unknown.
            assert all(s.boxes is None and s.regions() is None for s in handle.selection.images)
            sizes = torch.tensor([[p.height, p.width] for p in flat])
            prepared = handle.prepare(dict(batch) | {"image_sizes": sizes}, for_generate=False)
        with torch.no_grad():
            full = vlm.model.get_image_features(
                batch["pixel_values"]
            ).pooler_output  # [tiles, S, D]
        placed = prepared["mm_encoder_outputs"]["image"].pooler_output[0]  # [3 * 12, D]
        # Each image's tiles, from the processor's own count (not from the prompt).
        counts = [tiles_of(proc, p) for p in flat]
        firsts = np.cumsum([0] + counts[:-1]).tolist()
        for image, picture, tiles, first in zip(
            handle.selection.images, flat, counts, firsts, strict=True
        ):
            assert bool((image.cells >= 0).all() & (image.cells < SIDE).all())
            # The processor's tile order: sub-crops in raster order, then the thumbnail.
            tile = first + torch.where(image.crops == 0, tiles - 1, image.crops - 1)
            cell = image.cells[:, 0] * SIDE + image.cells[:, 1]
            rows = slice(12 * image.image, 12 * (image.image + 1))
            torch.testing.assert_close(placed[rows], full[tile, cell], rtol=0, atol=0)
            # And the kept positions are the placeholders of those tiles in the prompt.
            run = (batch["input_ids"][image.prompt] == IMAGE).nonzero().flatten()
            if image.image == 2:  # the second image of its prompt
                run = run[counts[1] * S :]
            assert torch.equal(run[(tile - first) * S + cell], image.positions)
            # Boxes: the thumbnail is the whole image; the sub-crops tile it on the grid the
            # processor picks with its own min / max tile settings.
            height, width = picture.height, picture.width
            cols, rows_ = get_optimal_tiled_canvas((height, width), (TILE, TILE), 1, MAX_TILES)
            assert cols * rows_ == tiles - 1
            expected = [(0.0, 0.0, height, width)] + [
                (
                    r * height / rows_,
                    c * width / cols,
                    (r + 1) * height / rows_,
                    (c + 1) * width / cols,
                )
                for r in range(rows_)
                for c in range(cols)
            ]
            expected = torch.tensor(expected, dtype=torch.float64)
            torch.testing.assert_close(torch.tensor(image.boxes, dtype=torch.float64), expected)
            # A kept token's region is its cell of its tile's box.
            step = (expected[image.crops, 2:] - expected[image.crops, :2]) / SIDE
            corner = expected[image.crops, :2] + image.cells.double() * step
            torch.testing.assert_close(image.regions(), torch.cat([corner, corner + step], -1))

    def test_the_projector_is_the_mlp_after_the_pixel_shuffle(self, vlm, proc, pictures):
        batch = self.tester.inputs(proc, [pictures[2:3]], self.tester.prompts[:1])
        adapter = adapter_for(vlm)
        for layer in (-1, 1):
            with torch.no_grad():
                hidden = vlm.model.vision_tower(batch["pixel_values"], output_hidden_states=True)
                states = hidden.last_hidden_state if layer == -1 else hidden.hidden_states[layer]
                patches = states[:, 1:].view(-1, P, P, states.shape[-1])  # CLS dropped
                # Token (i, j) of the shuffled grid holds the 2 x 2 patch window at (2i, 2j).
                window = patches[:, 2:4, 4:6].reshape(patches.shape[0], -1)  # token (1, 2)
                token = vlm.model.multi_modal_projector(window)
                full = vlm.model.get_image_features(
                    batch["pixel_values"], vision_feature_layer=layer
                ).pooler_output
                encoded = adapter.encode(
                    vlm,
                    {"pixel_values": batch["pixel_values"], "vision_feature_layer": layer},
                    frozenset(),
                    input_ids=batch["input_ids"],
                )
            torch.testing.assert_close(token, full[:, 1 * SIDE + 2], rtol=0, atol=1e-6)
            # The adapter's projector inputs are those windows, tile after tile.
            tokens = encoded.features[0].view(-1, S, window.shape[-1])[:, 1 * SIDE + 2]
            torch.testing.assert_close(tokens, window, rtol=0, atol=0)
            projected = vlm.model.multi_modal_projector(encoded.features[0])
            torch.testing.assert_close(projected, full.flatten(0, 1), rtol=0, atol=1e-6)
        with zooprune.prune(vlm, "zoo", keep=5, num_directions=8) as handle:
            vlm(**batch)
        # LayerNorm -> Linear -> GELU -> Linear is not the plain MLP the closed form needs.
        assert handle.selection.details["estimator"] == "jvp"
        with pytest.raises(PruneError, match="use 'jvp' or 'zo'"):
            zooprune.prune(vlm, "zoo", keep=5, estimator="exact")  # refused before any image
        assert zooprune.handle_of(vlm) is None

    @pytest.mark.parametrize("layer", [-1, 1])
    def test_cls_attention_is_the_towers_own_summed_over_each_window(
        self, saved, proc, pictures, layer
    ):
        eager = self.tester.load(saved, attn_implementation="eager")
        batch = self.tester.inputs(proc, [pictures[:1]], self.tester.prompts[:1])
        with torch.no_grad():
            attentions = eager.model.vision_tower(
                batch["pixel_values"], output_attentions=True
            ).attentions
            encoded = adapter_for(eager).encode(
                eager,
                {"pixel_values": batch["pixel_values"], "vision_feature_layer": layer},
                frozenset({"cls_attention"}),
                input_ids=batch["input_ids"],
            )
        # hidden_states[1] is layer 0's output; -1 the last layer's.
        weights = attentions[layer if layer < 0 else layer - 1]  # [tiles, heads, 1 + P^2, ...]
        from_cls = weights[:, :, 0, 1:].sum(1).view(-1, SIDE, 2, SIDE, 2).sum((2, 4))
        torch.testing.assert_close(encoded.cls_attention[0], from_cls.flatten(), rtol=0, atol=1e-5)
        assert encoded.keys[0].shape == (4 * S, 4 * (16 // 2))  # 2 x 2 head-averaged keys
        # With tokens to merge (over the whole image: 2 per tile would leave no dominant
        # one), VisionZip runs and keeps its budget.
        with zooprune.prune(
            eager, "visionzip", keep=8, contextual=2, crop_budget="global"
        ) as handle:
            eager(**batch)
        assert handle.selection.kept == 8

    def test_bad_per_call_inputs_are_refused(self, vlm, proc, pictures):
        batch = self.tester.inputs(proc, [pictures[:1]], self.tester.prompts[:1])
        with zooprune.prune(vlm, "grid", keep=4):
            with pytest.raises(PruneError, match="one \\(height, width\\) per image"):
                vlm(**batch, image_sizes=[(20, 70), (10, 10)])
        with zooprune.prune(vlm, "visionzip", keep=4):  # a per-call layer without attention
            with pytest.raises(PruneError, match="no attention layer"):
                vlm(**batch, vision_feature_layer=0)

    def test_prompts_that_do_not_match_the_images_are_refused(self, vlm, proc, pictures):
        batch = self.tester.inputs(proc, [pictures[:1], pictures[2:3]], self.tester.prompts[:2])
        ids = batch["input_ids"]
        red = VOCAB.index("red")
        with zooprune.prune(vlm, "zoo", keep=4):
            # One placeholder too few.
            fewer = ids.clone()
            fewer[tuple((ids == IMAGE).nonzero()[0])] = red
            with pytest.raises(PlaceholderMismatchError, match="9 tiles of 16 tokens"):
                vlm(**batch | {"input_ids": fewer})
            # The right count, but runs that are not whole tiles: the first image's last
            # placeholder becomes text, the second image's `<img>` a placeholder.
            moved = ids.clone()
            moved[0, (ids[0] == IMAGE).nonzero().max()] = red
            moved[1, (ids[1] == IMAGE).nonzero().min() - 1] = IMAGE
            with pytest.raises(PlaceholderMismatchError, match="runs of whole tiles"):
                vlm(**batch | {"input_ids": moved})
