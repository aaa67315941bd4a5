"""Qwen2-VL and Qwen2.5-VL: the conformance suite with 3-D M-RoPE positions, and what is
their own (the positions against the stock model step by step, the merger in raster
order); and what every Qwen family shares, for the Qwen3-VL and Qwen3.5 files too: the
vocabulary, pictures, processor and videos (:class:`QwenTester`) and the checks of
``prepare``'s positions and ``rope_deltas``, merged cells and ``mm_token_type_ids``
(:class:`QwenConformance`).

Tiny random models of both classes are built here (4 px patches merged 2 x 2, so one
token per 8 x 8 pixels; Qwen2.5-VL with 2 x 2-token attention windows, so its tower runs
in a window order that differs from raster order), saved with ``save_pretrained`` and
loaded back with ``from_pretrained``. ``Qwen2VLProcessor`` cannot be built without
torchvision (its video processor), so a subclass that accepts no video processor is used
with the PIL image processor and a word-level tokenizer.
"""

from typing import Any

import matplotlib.pyplot as plt
import numpy as np
import pytest
import torch
from matplotlib.patches import Rectangle
from transformers import (
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2VLConfig,
    Qwen2VLForConditionalGeneration,
    Qwen2VLProcessor,
)
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

import zooprune
from tests.adapters.conformance import (
    AdapterConformance,
    FamilyTester,
    JvpEstimatorConformance,
    VideoConformance,
    random_pictures,
    without_video_processor,
)
from zooprune.adapters import adapter_for
from zooprune.adapters.llava import LlavaAdapter
from zooprune.adapters.qwen2_vl import Qwen2VLAdapter
from zooprune.errors import PlaceholderMismatchError, PruneError
from zooprune.families.qwen import MergerProjector
from zooprune.pipeline import ImageLayout, KeptImage
from zooprune.tiny import SPECIAL, WORDS, word_tokenizer
from zooprune.viz import regions_figure

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
#: the video processors' pixel range (the image processor's): frames keep their size
VIDEO_SIZE = {"shortest_edge": CELL * CELL, "longest_edge": 64 * 64}
CLASSES = {
    "qwen2-vl": (Qwen2VLConfig, Qwen2VLForConditionalGeneration),
    "qwen2.5-vl": (Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration),
}


def processor(processor_class: type = Qwen2VLProcessor, **named: str) -> Any:
    """``processor_class`` with the PIL image processor, a word-level tokenizer (``named``:
    its special tokens besides the placeholders) and no video processor."""
    images = Qwen2VLImageProcessorPil(
        size={"shortest_edge": CELL * CELL, "longest_edge": 64 * 64},
        patch_size=PATCH,
        merge_size=MERGE,
        temporal_patch_size=2,
    )
    tokenizer = word_tokenizer(
        VOCAB, SPECIAL + MARKERS, image_token="<image>", video_token="<video>", **named
    )
    return without_video_processor(processor_class)(
        image_processor=images, tokenizer=tokenizer, video_processor=None
    )


#: the vocabulary with Qwen's own marker names (the same ids), for vLLM, whose Qwen3-VL
#: processing writes them by name
QWEN_NAMES = {
    "<image>": "<|image_pad|>",
    "<video>": "<|video_pad|>",
    "<vision_start>": "<|vision_start|>",
    "<vision_end>": "<|vision_end|>",
}
NAMED_RUN = "<|vision_start|><|image_pad|><|vision_end|>"
NAMED_VIDEO = "<|vision_start|><|video_pad|><|vision_end|>"


def named_processor(processor_class: type, video_processor: Any) -> Any:
    """``processor_class`` over :data:`QWEN_NAMES`' vocabulary, with a video processor
    (vLLM's environment has torchvision): what the vLLM tests save with a model."""
    named = [QWEN_NAMES.get(word, word) for word in VOCAB]
    tokenizer = word_tokenizer(
        named,
        [QWEN_NAMES.get(word, word) for word in SPECIAL + MARKERS],
        image_token="<|image_pad|>",
        video_token="<|video_pad|>",
        vision_start_token="<|vision_start|>",
        vision_end_token="<|vision_end|>",
    )
    return processor_class(
        image_processor=processor().image_processor,
        tokenizer=tokenizer,
        video_processor=video_processor,
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
        image_grid_thw=batch.get("image_grid_thw"),
        video_grid_thw=batch.get("video_grid_thw"),
        attention_mask=batch["attention_mask"],
    )[0]


def masked_reference(vlm, batch, kept, positions=None, **encoded):
    """The unpruned model with the dropped image and video tokens of prompt 0 masked out
    of attention (``kept``: where its kept placeholders stand).

    Positions are the unpruned 3-D ones by default, computed with the real mask (the mask
    with holes would make the model number the prompt as if they were gone). ``encoded``
    may replace ``pixel_values`` by ``mm_encoder_outputs``.
    """
    ids = batch["input_ids"]
    mask = batch["attention_mask"].clone()
    mask[(ids == IMAGE) | (ids == VIDEO)] = 0
    mask[0, kept] = 1
    positions = rope(vlm, batch) if positions is None else positions
    inputs = batch | {"attention_mask": mask, "position_ids": positions}
    if encoded:
        inputs = {k: v for k, v in inputs.items() if k != "pixel_values"} | encoded
    return vlm(**inputs).logits


def video_inputs(proc, images, videos, prompts, run_per_frame=False):
    """The processor's batch with videos of ``(t, h, w)`` patch grids (random patch rows).

    Its video processor needs torchvision, so each video's placeholders are written out
    here as the processor would: as ``<unk>`` words the processor lets through, then
    turned into ``<video>`` ids with ``mm_token_type_ids`` 2. One run per video (the
    prompt's ``<video>`` stands for it), or with ``run_per_frame`` as Qwen3-VL's
    processor writes them: each frame its own run between vision markers after a
    timestamp (the word "of" stands for ``<t seconds>``).
    """
    texts = []
    for prompt, clips in zip(prompts, videos, strict=True):
        pieces = prompt.split("<video>")
        text = pieces[0]
        for (t, h, w), piece in zip(clips, pieces[1:], strict=True):
            if run_per_frame:
                frame = "<vision_start>" + "<unk>" * (h * w // (MERGE * MERGE)) + "<vision_end>"
                text += " ".join(f"of {frame}" for _ in range(t)) + piece
            else:
                text += "<unk>" * (t * h * w // (MERGE * MERGE)) + piece
        texts.append(text)
    flat = [image for group in images for image in group]
    batch = dict(proc(images=flat or None, text=texts, return_tensors="pt", padding=True))
    is_video = batch["input_ids"] == SPECIAL.index("<unk>")
    batch["input_ids"] = batch["input_ids"].masked_fill(is_video, VIDEO)
    batch["mm_token_type_ids"] = batch["mm_token_type_ids"].masked_fill(is_video, 2)
    clips = [clip for group in videos for clip in group]
    if clips:
        rows = [
            torch.randn(
                t * h * w, 3 * 2 * PATCH * PATCH, generator=torch.Generator().manual_seed(t)
            )
            for t, h, w in clips
        ]
        batch["pixel_values_videos"] = torch.cat(rows)
        batch["video_grid_thw"] = torch.tensor(clips)
    return batch


#: Qwen2.5-VL spaces a video's temporal positions by its seconds per frame group: after the
#: video, transformers 5 goes on from the start plus the grid's larger side, vLLM from its
#: largest position plus one (they part where the temporal extent is the larger)
QWEN25_TEXT_AFTER_VIDEO = (
    "after a video, transformers 5 counts on from max(h, w) past its start, vLLM from its "
    "largest (time-scaled) position"
)


class QwenTester(FamilyTester):
    """Qwen2-VL / Qwen2.5-VL; the Qwen3-VL and Qwen3.5 testers change the model, the
    processor and how a video is written in the prompt."""

    #: family name -> (config class, model class)
    classes = CLASSES
    image_token = IMAGE
    video_token = VIDEO
    banned = tuple(BANNED)
    image_text = RUN
    video_text = "<vision_start><video><vision_end>"
    #: whether the processor writes each frame of a video as its own run (Qwen3-VL's)
    run_per_frame = False
    # (t, h, w) patch grids: 3 frames of 2 x 2 merged tokens, 2 frames of 2 x 3
    videos = [(3, 4, 4), (2, 4, 6)]
    keep = 5
    position_modes = ("original",)
    fast = {"num_directions": 8}

    def __init__(self, family):
        self.name = family
        self.model_class = self.classes[family][1]
        if family == "qwen2.5-vl":
            self.vllm_text_after_video = QWEN25_TEXT_AFTER_VIDEO

    def frames_of(self, spec):
        return spec[0]

    def tokens_per_frame(self, spec):
        return spec[1] * spec[2] // (MERGE * MERGE)

    def video_inputs(self, proc, images, videos, prompts):
        return video_inputs(proc, images, videos, prompts, run_per_frame=self.run_per_frame)

    def build(self, path):
        return build(self.name, path)

    def processor(self):
        return processor()

    def pictures(self):
        return random_pictures(5, SHAPES)

    def step_inputs(self, input_ids):
        return {"mm_token_type_ids": (input_ids == IMAGE).long() + 2 * (input_ids == VIDEO).long()}

    def masked_reference(self, model, batch, kept, positions):
        # Original positions only: the unpruned model's own 3-D positions.
        return masked_reference(model, batch, kept)

    vllm_picture_size = (24, 32)

    def vllm_processor(self) -> Any:
        """The stock processor vLLM loads, over Qwen's marker names, with its video
        processor (which needs torchvision: there in vLLM's environment only)."""
        from transformers.models.qwen2_vl.video_processing_qwen2_vl import Qwen2VLVideoProcessor

        video = Qwen2VLVideoProcessor(
            patch_size=PATCH, merge_size=MERGE, temporal_patch_size=2, size=VIDEO_SIZE
        )
        return named_processor(Qwen2VLProcessor, video)

    def vllm_model(self, path) -> None:
        """Save the family's tiny model with a language model vLLM's CPU build runs."""
        build(self.name, path, text_width=64)

    def vllm_build(self, path):
        self.vllm_model(path)
        self.vllm_processor().save_pretrained(path)
        return path

    @property
    def vllm_prompt(self):
        return f"<s> user {NAMED_RUN} what is in the image ?"

    @property
    def vllm_two_images_prompt(self):
        return f"<s> user {NAMED_RUN} and {NAMED_RUN} describe"

    vllm_video_prompt = f"<s> user {NAMED_VIDEO} what is in the video ?"
    vllm_image_and_video_prompt = f"<s> user {NAMED_RUN} then {NAMED_VIDEO} describe"

    def vllm_projector_width(self, model):
        return MERGE * MERGE * WIDTH


class QwenConformance(AdapterConformance, VideoConformance, JvpEstimatorConformance):
    """What every Qwen family checks beyond the suite: the kept tokens' 3-D positions
    (against the stock masked model; Qwen3.5 overrides that test with its own reference),
    ``prepare``'s positions and ``rope_deltas``, a cache continued from ``prepare``,
    merged cells, ``mm_token_type_ids``."""

    def two_prompts(self, proc, pictures):
        """Left padding, three images of three sizes, two of them in one prompt."""
        prompts = [self.tester.prompts[0], self.tester.prompts[1] + f" {RUN} and this ?"]
        return self.tester.inputs(proc, [pictures[:1], pictures[1:3]], prompts)

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

    def test_prepare_gives_the_unpruned_positions_of_the_kept_tokens(self, vlm, proc, pictures):
        # Left padding and two images in one prompt: every row keeps its own positions.
        batch = self.two_prompts(proc, pictures)
        assert bool((batch["attention_mask"][:, 0] == 0).any())
        saved = vlm.model.rope_deltas
        with zooprune.prune(vlm, "divprune", keep=5) as handle:
            prepared = handle.prepare(dict(batch), for_generate=False)
            deltas = vlm.model.rope_deltas
        assert vlm.model.rope_deltas is saved  # remove() gives the model its own value back
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
        """A caller's own cached step (and Qwen3.5's linear-attention states) without
        position ids: the model adds rope_deltas. While the handle is active, calls
        without pixel_values pass through to the model."""
        t = self.tester
        batch = t.inputs(proc, [pictures[2:3]], t.prompts[2:3])
        with zooprune.prune(vlm, "zoo", keep=7, **t.fast) as handle:
            prepared = handle.prepare(dict(batch), for_generate=False)
            kept = handle.selection.images[0].positions
            prefill = vlm(**prepared, use_cache=True)
            last = prefill.logits[:, -1:].clone()
            last[..., BANNED] = float("-inf")  # a new placeholder would match no image
            token = last.argmax(-1)
            step = vlm(input_ids=token, past_key_values=prefill.past_key_values).logits[0, -1]
        longer = {
            "input_ids": torch.cat([batch["input_ids"], token], 1),
            "attention_mask": torch.cat([batch["attention_mask"], torch.ones_like(token)], 1),
            "mm_token_type_ids": torch.cat(
                [batch["mm_token_type_ids"], torch.zeros_like(token)], 1
            ),
        }
        reference = t.masked_reference(vlm, batch | longer, kept, None)[0, -1]
        torch.testing.assert_close(step, reference, rtol=0, atol=1e-5)

    def test_record_maps_kept_tokens_to_merged_cells(self, vlm, proc, pictures):
        """Each kept token's cell, checked against its token, its 3-D position and its
        pixels, and drawn where those pixels are (what ``zooprune run --show`` draws)."""
        batch = self.tester.inputs(proc, [pictures[:1], pictures[3:4]], self.tester.prompts[:2])
        with zooprune.prune(vlm, "divprune", keep=5) as handle:
            prepared = handle.prepare(dict(batch), for_generate=False)
        with torch.no_grad():
            full = vlm.model.get_image_features(batch["pixel_values"], batch["image_grid_thw"])
        positions = rope(vlm, batch)
        placed = prepared["mm_encoder_outputs"]["image"].pooler_output
        patch_rows = batch["pixel_values"].split([4 * n for n in (TOKENS[0], TOKENS[3])])
        mean = torch.tensor(proc.image_processor.image_mean).view(3, 1, 1)
        std = torch.tensor(proc.image_processor.image_std).view(3, 1, 1)
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
            picture = np.asarray(pictures[SHAPES.index((height, width))])
            pixels = (torch.tensor(picture).permute(2, 0, 1) / 255.0 - mean) / std
            for j, (row, col) in zip(image.indices.tolist(), image.cells.tolist(), strict=True):
                # A token's rows: its 2 x 2 patches, each (channel, time, y, x).
                patches = rows[4 * j : 4 * j + 4].view(MERGE, MERGE, 3, 2, PATCH, PATCH)[:, :, :, 0]
                block = patches.permute(2, 0, 3, 1, 4).reshape(3, CELL, CELL)
                expected = pixels[:, row * CELL : (row + 1) * CELL, col * CELL : (col + 1) * CELL]
                torch.testing.assert_close(block, expected, rtol=0, atol=1e-5)
            # 4. The figure of the record draws those pixels' boxes.
            figure = regions_figure(picture, image)
            drawn = sorted(
                (round(p.get_y() + 0.5), round(p.get_x() + 0.5), p.get_height(), p.get_width())
                for p in figure.axes[0].patches
                if isinstance(p, Rectangle)
            )
            plt.close(figure)
            assert drawn == sorted(
                (r * CELL, c * CELL, CELL, CELL) for r, c in image.cells.tolist()
            )

    def test_inputs_without_consistent_mm_token_type_ids_are_refused(self, vlm, proc, pictures):
        batch = self.tester.inputs(proc, [pictures[:1]], self.tester.prompts[:1])
        with zooprune.prune(vlm, "zoo", keep=4):
            with pytest.raises(PruneError, match="needs mm_token_type_ids"):
                vlm(**{k: v for k, v in batch.items() if k != "mm_token_type_ids"})
            types = batch["mm_token_type_ids"].clone()
            types[0, int((types[0] == 1).nonzero()[0])] = 0
            with pytest.raises(PlaceholderMismatchError, match="mm_token_type_ids"):
                vlm(**batch | {"mm_token_type_ids": types})


class QwenSpecifics(QwenConformance):
    """What Qwen2-VL and Qwen2.5-VL check beyond the Qwen families' checks."""

    def test_pruned_generate_equals_the_masked_unpruned_model_step_by_step(
        self, vlm, proc, pictures
    ):
        """Independent of the adapter: the stock model, dropped image tokens masked out, its own
        ``get_rope_index`` positions recomputed on the grown sequence at every step."""
        batch = self.two_prompts(proc, pictures)
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


class TestQwen2VL(QwenSpecifics):
    tester = QwenTester("qwen2-vl")


class TestQwen25VL(QwenSpecifics):
    tester = QwenTester("qwen2.5-vl")


def test_each_kind_gets_its_own_encoder_output_and_an_unknown_kind_fails():
    """``mm_encoder_outputs`` per kind, in the items' order within a kind; a family that
    encodes videos but has no encoder output for them fails, never filing them as images."""

    def item(kind, tokens, seed):
        run = torch.randn(tokens, 4, generator=torch.Generator().manual_seed(seed))
        if kind == "image":
            layout = ImageLayout.single(run, (1, tokens))
        else:
            layout = ImageLayout.frames(run, (1, tokens // 2), 2)
        index = torch.arange(tokens)
        return KeptImage(index, None, index, run, index[:0], layout, (1, tokens))

    image, first, second = item("image", 3, 0), item("video", 4, 1), item("video", 6, 2)
    outputs = Qwen2VLAdapter().encoder_outputs(None, [image, first, second])
    assert list(outputs) == ["image", "video"]
    for kind, runs in (("image", [image.run]), ("video", [first.run, second.run])):
        placed = outputs[kind].pooler_output
        assert len(placed) == len(runs) and all(a is b for a, b in zip(placed, runs, strict=True))
    assert list(LlavaAdapter().encoder_outputs(None, [image])) == ["image"]
    with pytest.raises(RuntimeError, match="LlavaAdapter encoded videos but has no encoder"):
        LlavaAdapter().encoder_outputs(None, [image, first])
