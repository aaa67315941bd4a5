"""Qwen2-VL and Qwen2.5-VL: the conformance suite with 3-D M-RoPE positions, and what is
their own (the positions against the stock model step by step, ``prepare``'s positions and
``rope_deltas``, merged cells, the merger in raster order, videos).

Tiny random models of both classes are built here (4 px patches merged 2 x 2, so one
token per 8 x 8 pixels; Qwen2.5-VL with 2 x 2-token attention windows, so its tower runs
in a window order that differs from raster order), saved with ``save_pretrained`` and
loaded back with ``from_pretrained``. ``Qwen2VLProcessor`` cannot be built without
torchvision (its video processor), so a subclass that accepts no video processor is used
with the PIL image processor and a word-level tokenizer.
"""

import numpy as np
import pytest
import torch
from transformers import (
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2VLConfig,
    Qwen2VLForConditionalGeneration,
    Qwen2VLProcessor,
)
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

import zooprune
from tests.adapters.conformance import AdapterConformance, FamilyTester, random_pictures
from zooprune import PruneError
from zooprune.adapters import adapter_for
from zooprune.adapters.qwen2_vl import MergerProjector
from zooprune.errors import PlaceholderMismatchError
from zooprune.tiny import SPECIAL, WORDS, word_tokenizer

PATCH, MERGE = 4, 2
CELL = PATCH * MERGE  # pixels per side of one merged token
WIDTH = 16  # the vision tower's state size: a grouped vector has MERGE^2 * WIDTH entries
IMAGE = SPECIAL.index("<image>")
EOS = SPECIAL.index("</s>")
MARKERS = ["<vision_start>", "<vision_end>", "<video>"]
VOCAB = SPECIAL + MARKERS + WORDS
VIDEO = VOCAB.index("<video>")
BANNED = [IMAGE, EOS, VIDEO]  # a generated placeholder would no longer match the images
RUN = "<vision_start><image><vision_end>"
# Multiples of 8 px: the processor keeps the size, so merged grids are 3x5, 5x3, 4x4, 2x6.
SHAPES = [(24, 40), (40, 24), (32, 32), (16, 48)]
TOKENS = [(h // CELL) * (w // CELL) for h, w in SHAPES]
CLASSES = {
    "qwen2-vl": (Qwen2VLConfig, Qwen2VLForConditionalGeneration),
    "qwen2.5-vl": (Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration),
}


class Qwen2VLProcessorNoVideo(Qwen2VLProcessor):
    """``Qwen2VLProcessor`` without a video processor (the real one needs torchvision)."""

    def check_argument_for_proper_class(self, name, arg):
        if name == "video_processor" and arg is None:
            return None
        return super().check_argument_for_proper_class(name, arg)


def processor() -> Qwen2VLProcessor:
    images = Qwen2VLImageProcessorPil(
        size={"shortest_edge": CELL * CELL, "longest_edge": 64 * 64},
        patch_size=PATCH,
        merge_size=MERGE,
        temporal_patch_size=2,
    )
    tokenizer = word_tokenizer(
        VOCAB, SPECIAL + MARKERS, image_token="<image>", video_token="<video>"
    )
    return Qwen2VLProcessorNoVideo(
        image_processor=images, tokenizer=tokenizer, video_processor=None
    )


def _sections(head_dim):
    """M-RoPE's three sections (temporal, height, width) over head_dim / 2 frequencies."""
    half = head_dim // 2
    third = 3 * half // 8
    return [half - 2 * third, third, third]


def build(family, path, text_width=32, text_heads=2):
    """The family's tiny model saved to ``path`` (vLLM's CPU attention needs head_dim >= 32:
    its tests pass ``text_width=64``)."""
    config_class, model_class = CLASSES[family]
    vision = {"patch_size": PATCH, "spatial_merge_size": MERGE, "temporal_patch_size": 2}
    if family == "qwen2-vl":
        vision |= {
            "depth": 1,
            "embed_dim": WIDTH,
            "hidden_size": text_width,  # the merger's output: the language model's width
            "num_heads": 2,
            "mlp_ratio": 2,
        }
    else:  # window attention in block 0 (2 x 2 merged tokens = 16 px), full in block 1
        vision |= {
            "depth": 2,
            "hidden_size": WIDTH,
            "out_hidden_size": text_width,
            "intermediate_size": 32,
            "num_heads": 2,
            "window_size": 16,
            "fullatt_block_indexes": [1],
        }
    config = config_class(
        vision_config=vision,
        text_config={
            "vocab_size": len(VOCAB),
            "hidden_size": text_width,
            "intermediate_size": 2 * text_width,
            "num_hidden_layers": 2,
            "num_attention_heads": text_heads,
            "num_key_value_heads": 1,
            # the three M-RoPE sections share head_dim / 2 frequencies (8 at head_dim 16)
            "rope_parameters": {
                "rope_type": "default",
                "mrope_section": _sections(text_width // text_heads),
            },
            "pad_token_id": 0,
            "bos_token_id": 2,
            "eos_token_id": 3,
        },
        image_token_id=IMAGE,
        video_token_id=VIDEO,
        vision_start_token_id=VOCAB.index("<vision_start>"),
        vision_end_token_id=VOCAB.index("<vision_end>"),
    )
    model = model_class(config)
    model.generation_config.pad_token_id = 0
    model.eval().save_pretrained(path)
    return path


def rope(vlm, batch):
    """``[3, B, L]`` the unpruned M-RoPE positions, by the model's own rule."""
    return vlm.model.get_rope_index(
        batch["input_ids"],
        mm_token_type_ids=batch["mm_token_type_ids"],
        image_grid_thw=batch["image_grid_thw"],
        attention_mask=batch["attention_mask"],
    )[0]


def masked_reference(vlm, batch, kept, positions=None):
    """The unpruned model with the dropped image tokens masked out of attention.

    Positions are the unpruned 3-D ones by default, computed with the real mask (the mask
    with holes would make the model number the prompt as if they were gone).
    """
    ids = batch["input_ids"]
    mask = batch["attention_mask"].clone()
    mask[ids == IMAGE] = 0
    mask[0, kept] = 1
    positions = rope(vlm, batch) if positions is None else positions
    return vlm(**batch | {"attention_mask": mask, "position_ids": positions}).logits


class QwenTester(FamilyTester):
    image_token = IMAGE
    banned = tuple(BANNED)
    image_text = RUN
    keep = 5
    position_modes = ("original",)
    fast = {"num_directions": 8}

    def __init__(self, family):
        self.name = family
        self.model_class = CLASSES[family][1]

    def build(self, path):
        return build(self.name, path)

    def processor(self):
        return processor()

    def pictures(self):
        return random_pictures(5, SHAPES)

    def step_inputs(self, input_ids):
        return {"mm_token_type_ids": (input_ids == IMAGE).long()}

    def masked_reference(self, model, batch, kept, positions):
        # Original positions only: the unpruned model's own 3-D positions.
        return masked_reference(model, batch, kept)


class QwenSpecifics(AdapterConformance):
    """What Qwen2-VL and Qwen2.5-VL check beyond the suite."""

    def test_the_kept_tokens_keep_their_3d_positions(self, vlm, proc, pictures):
        batch = self.tester.inputs(proc, [pictures[:1]], self.tester.prompts[2:3])
        with zooprune.prune(vlm, "grid", keep=6) as handle:
            pruned = vlm(**batch).logits
            kept = handle.selection.images[0].positions
        keep = batch["input_ids"][0] != IMAGE
        keep[kept] = True
        torch.testing.assert_close(
            pruned[0], masked_reference(vlm, batch, kept)[0, keep], rtol=0, atol=1e-5
        )
        # The positions matter: the same mask with plain 1-D positions gives other logits.
        flat = torch.arange(batch["input_ids"].shape[1])[None]
        assert not torch.allclose(masked_reference(vlm, batch, kept, flat)[0, keep], pruned[0])

    def test_pruned_generate_equals_the_masked_unpruned_model_step_by_step(
        self, vlm, proc, pictures
    ):
        """Independent of the adapter: the stock model, dropped image tokens masked out, its own
        ``get_rope_index`` positions recomputed on the grown sequence at every step."""
        prompts = [
            self.tester.prompts[0],
            self.tester.prompts[1] + f" {RUN} and this ?",
        ]  # left padding, two images
        batch = self.tester.inputs(proc, [pictures[:1], pictures[1:3]], prompts)
        steps = 5
        with zooprune.prune(vlm, "grid", keep=5) as handle:
            out = self.greedy(
                vlm, batch, steps=steps, output_logits=True, return_dict_in_generate=True
            )
            generated, scores = out.sequences, torch.stack(out.logits, dim=1)  # [B, steps, V]
            kept_by_row = {
                row: torch.cat([s.positions for s in handle.selection.images if s.prompt == row])
                for row in range(2)
            }
        rows_per_image = batch["image_grid_thw"].prod(-1).tolist()
        starts = [0, *torch.tensor(rows_per_image).cumsum(0).tolist()]
        for row, images in ((0, [0]), (1, [1, 2])):
            real = batch["attention_mask"][row].bool()
            ids = batch["input_ids"][row : row + 1, real]
            kept = kept_by_row[row] - int((~real).sum())  # positions in the unpadded prompt
            pixels = batch["pixel_values"][starts[images[0]] : starts[images[-1] + 1]]
            grids = batch["image_grid_thw"][images[0] : images[-1] + 1]
            for _ in range(steps):
                types = (ids == IMAGE).long()
                ones = torch.ones_like(ids)
                positions = vlm.model.get_rope_index(
                    ids, mm_token_type_ids=types, image_grid_thw=grids, attention_mask=ones
                )[0]
                mask = ones.clone()
                mask[ids == IMAGE] = 0
                mask[0, kept] = 1
                logits = vlm(
                    input_ids=ids,
                    pixel_values=pixels,
                    image_grid_thw=grids,
                    mm_token_type_ids=types,
                    attention_mask=mask,
                    position_ids=positions,
                ).logits
                step = ids.shape[1] - real.sum()
                torch.testing.assert_close(
                    scores[row, step, : logits.shape[-1]], logits[0, -1], rtol=0, atol=1e-4
                )
                logits[..., BANNED] = float("-inf")
                ids = torch.cat([ids, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
            assert generated[row, -steps:].tolist() == ids[0, -steps:].tolist()

    def test_prepare_gives_the_unpruned_positions_of_the_kept_tokens(self, vlm, proc, pictures):
        # Left padding and two images in one prompt: every row keeps its own positions.
        prompts = [self.tester.prompts[0], self.tester.prompts[1] + f" {RUN} and this ?"]
        batch = self.tester.inputs(proc, [pictures[:1], pictures[1:3]], prompts)
        assert bool((batch["attention_mask"][:, 0] == 0).any())
        with zooprune.prune(vlm, "divprune", keep=5) as handle:
            prepared = handle.prepare(dict(batch), for_generate=False)
            deltas = vlm.model.rope_deltas  # remove() restores the model's own value
        full = rope(vlm, batch)
        positions, mask = prepared["position_ids"], prepared["attention_mask"].bool()
        assert positions.shape == (4, 2, prepared["input_ids"].shape[1])
        for row in range(2):
            keep = batch["attention_mask"][row].bool() & (batch["input_ids"][row] != IMAGE)
            for image in handle.selection.images:
                if image.prompt == row:
                    keep[image.positions] = True
            real = mask[row]
            assert torch.equal(prepared["input_ids"][row, real], batch["input_ids"][row, keep])
            assert torch.equal(
                prepared["mm_token_type_ids"][row, real],
                (batch["input_ids"][row, keep] == IMAGE).long(),
            )
            # The three M-RoPE rows: the unpruned ones; the first: real tokens counted 0, 1, ...
            assert torch.equal(positions[1:, row, real], full[:, row, keep])
            assert positions[0, row, real].tolist() == list(range(int(real.sum())))
        # The model's rope_deltas as its own prefill would set them for the shortened prompt.
        expected = full.amax(dim=(0, 2)) + 1 - mask.sum(-1)
        assert torch.equal(deltas.flatten(), expected)

    def test_a_cache_from_prepare_continues_with_the_unpruned_positions(self, vlm, proc, pictures):
        """A caller's own cached step without position ids: the model adds rope_deltas.

        While the handle is active: calls without pixel_values pass through to the model, and
        ``remove()`` gives the model its own ``rope_deltas`` back."""
        batch = self.tester.inputs(proc, [pictures[2:3]], self.tester.prompts[2:3])
        with zooprune.prune(vlm, "zoo", keep=7) as handle:
            prepared = handle.prepare(dict(batch), for_generate=False)
            kept = handle.selection.images[0].positions
            prefill = vlm(**prepared, use_cache=True)
            token = prefill.logits[:, -1:].argmax(-1)
            step = vlm(input_ids=token, past_key_values=prefill.past_key_values).logits[0, -1]
        longer = {
            "input_ids": torch.cat([batch["input_ids"], token], 1),
            "attention_mask": torch.cat([batch["attention_mask"], torch.ones_like(token)], 1),
            "mm_token_type_ids": torch.cat(
                [batch["mm_token_type_ids"], torch.zeros_like(token)], 1
            ),
        }
        reference = masked_reference(vlm, batch | longer, kept)[0, -1]
        torch.testing.assert_close(step, reference, rtol=0, atol=1e-5)

    def test_record_maps_kept_tokens_to_merged_cells(self, vlm, proc, pictures):
        """Each kept token's cell, checked three ways: its token, its 3-D position, its pixels."""
        batch = self.tester.inputs(proc, [pictures[:1], pictures[3:4]], self.tester.prompts[:2])
        with zooprune.prune(vlm, "divprune", keep=5) as handle:
            prepared = handle.prepare(dict(batch), for_generate=False)
        with torch.no_grad():
            full = vlm.model.get_image_features(batch["pixel_values"], batch["image_grid_thw"])
        positions = rope(vlm, batch)
        placed = prepared["mm_encoder_outputs"]["image"].pooler_output
        patch_rows = batch["pixel_values"].split([4 * n for n in (TOKENS[0], TOKENS[3])])
        images = handle.selection.images
        for image, tokens, rows, (height, width) in zip(
            images, placed, patch_rows, [SHAPES[0], SHAPES[3]], strict=True
        ):
            grid = (height // CELL, width // CELL)
            assert image.grid == grid and image.patch_grids == (grid,)
            assert image.num_tokens == grid[0] * grid[1] and image.kept == 5
            assert bool((image.crops == 0).all()) and image.boxes is None
            # 1. The token placed there is the model's own token of that cell.
            cell_index = image.cells[:, 0] * grid[1] + image.cells[:, 1]
            assert torch.equal(cell_index, image.indices)
            torch.testing.assert_close(
                tokens, full.pooler_output[image.image][cell_index], rtol=0, atol=0
            )
            # 2. Its unpruned M-RoPE position is (start, start + row, start + column).
            t, h, w = positions[:, image.prompt, image.positions]
            assert bool((t == t[0]).all())
            assert torch.equal(torch.stack([h - t[0], w - t[0]], -1), image.cells)
            # 3. Its four patches are the 8 x 8 pixels at that cell of the image, normalised.
            mean = torch.tensor(proc.image_processor.image_mean).view(3, 1, 1)
            std = torch.tensor(proc.image_processor.image_std).view(3, 1, 1)
            picture = pictures[SHAPES.index((height, width))]
            pixels = (torch.tensor(np.asarray(picture)).permute(2, 0, 1) / 255.0 - mean) / std
            for j, (row, col) in zip(image.indices.tolist(), image.cells.tolist(), strict=True):
                # A token's rows: its 2 x 2 patches, each (channel, time, y, x).
                patches = rows[4 * j : 4 * j + 4].view(MERGE, MERGE, 3, 2, PATCH, PATCH)[:, :, :, 0]
                block = patches.permute(2, 0, 3, 1, 4).reshape(3, CELL, CELL)
                expected = pixels[:, row * CELL : (row + 1) * CELL, col * CELL : (col + 1) * CELL]
                torch.testing.assert_close(block, expected, rtol=0, atol=1e-5)

    def test_the_projector_is_the_merger_on_grouped_states_in_raster_order(
        self, vlm, proc, pictures
    ):
        # Two images of different grids in one call: the window order spans both.
        batch = self.tester.inputs(proc, [pictures[:1], pictures[2:3]], self.tester.prompts[:2])
        adapter = adapter_for(vlm)
        with torch.no_grad():
            image_inputs = {k: batch[k] for k in ("pixel_values", "image_grid_thw")}
            encoded = adapter.encode(vlm, image_inputs, frozenset())
            pooled = vlm.model.get_image_features(**image_inputs).pooler_output
            projector = adapter.projector(vlm)
            assert isinstance(projector, MergerProjector)
            for features, tokens in zip(encoded.features, pooled, strict=True):
                assert features.shape == (tokens.shape[0], MERGE * MERGE * WIDTH)
                torch.testing.assert_close(projector(features), tokens, rtol=0, atol=1e-6)
                # Token-wise: one grouped vector alone gives its token.
                torch.testing.assert_close(projector(features[4]), tokens[4], rtol=0, atol=1e-6)
            # The tower's own order: raster for Qwen2-VL, windows for Qwen2.5-VL.
            states = vlm.model.visual(batch["pixel_values"], grid_thw=batch["image_grid_thw"])
            in_tower_order = vlm.model.visual.merger(states.last_hidden_state)
        in_raster_order = torch.allclose(in_tower_order, torch.cat(pooled), rtol=0, atol=1e-6)
        assert in_raster_order == (self.tester.name == "qwen2-vl")

    def test_estimators_jvp_and_zo_run_and_the_mlp_only_ones_are_refused(self, vlm, proc, pictures):
        batch = self.tester.inputs(proc, [pictures[:1]], self.tester.prompts[:1])
        with zooprune.prune(vlm, "zoo", keep=5, num_directions=8) as handle:
            vlm(**batch)
        assert handle.selection.details["estimator"] == "jvp"  # auto: a norm before the MLP
        jvp = handle.selection.scores[0]
        assert bool((jvp > 0).all())
        with zooprune.prune(vlm, "zoo", keep=5, num_directions=8, estimator="zo") as handle:
            vlm(**batch)
        # The same bank of directions: central differences agree with the derivatives.
        torch.testing.assert_close(handle.selection.scores[0], jvp, rtol=1e-2, atol=1e-4)
        for estimator in ("exact", "lowrank"):
            with zooprune.prune(vlm, "zoo", keep=5, estimator=estimator):
                with pytest.raises(PruneError, match="use 'jvp' or 'zo'"):
                    vlm(**batch)

    def test_inputs_without_consistent_mm_token_type_ids_are_refused(self, vlm, proc, pictures):
        batch = self.tester.inputs(proc, [pictures[:1]], self.tester.prompts[:1])
        with zooprune.prune(vlm, "zoo", keep=4):
            with pytest.raises(PruneError, match="needs mm_token_type_ids"):
                vlm(**{k: v for k, v in batch.items() if k != "mm_token_type_ids"})
            types = batch["mm_token_type_ids"].clone()
            types[0, int((types[0] == 1).nonzero()[0])] = 0
            with pytest.raises(PlaceholderMismatchError, match="mm_token_type_ids"):
                vlm(**batch | {"mm_token_type_ids": types})

    def test_videos_pass_through_unpruned_and_are_refused_beside_images(self, vlm, proc, pictures):
        # A video of 2 temporal patches (4 frames) of 4 x 4 patches: 2 x 2 x 2 merged tokens.
        torch.manual_seed(1)
        thw = torch.tensor([[2, 4, 4]])
        count = int(thw.prod()) // (MERGE * MERGE)
        words = (
            ["<s>", "user", "<vision_start>"] + ["<video>"] * count + ["<vision_end>", "describe"]
        )
        ids = torch.tensor([[VOCAB.index(w) for w in words]])
        video = {
            "input_ids": ids,
            "attention_mask": torch.ones_like(ids),
            "mm_token_type_ids": (ids == VIDEO).long() * 2,
            "pixel_values_videos": torch.randn(int(thw.prod()), 3 * 2 * PATCH * PATCH),
            "video_grid_thw": thw,
        }
        expected = vlm(**video).logits
        with zooprune.prune(vlm, "zoo", keep=2) as handle:
            assert torch.equal(vlm(**video).logits, expected)
            assert handle.selection is None  # nothing was pruned
            batch = self.tester.inputs(proc, [pictures[:1]], self.tester.prompts[:1])
            extra = {k: video[k] for k in ("pixel_values_videos", "video_grid_thw")}
            with pytest.raises(PruneError, match="both images and videos"):
                vlm(**batch, **extra)


class TestQwen2VL(QwenSpecifics):
    tester = QwenTester("qwen2-vl")


class TestQwen25VL(QwenSpecifics):
    tester = QwenTester("qwen2.5-vl")
