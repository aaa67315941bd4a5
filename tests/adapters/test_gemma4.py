"""Gemma 4: the conformance suite on its pooled grids of varying size, and what is Gemma 4's
own (the pooling by patch position, pooled cells in the record, ``embed_vision`` as the
token-wise projector, the bidirectional image block through ``mm_token_type_ids``, videos
and audio).

A tiny random ``Gemma4ForConditionalGeneration`` is built here (4 px patches pooled 3 x 3,
so one token per 12 x 12 processed pixels and at most 70 tokens per image; one
sliding-window layer with the bidirectional image block, two global layers, the last one
reusing the other's keys and values; per-layer embeddings on), saved with
``save_pretrained`` and loaded back with ``from_pretrained``. ``Gemma4Processor`` needs a
video processor, and the real one needs torchvision: a subclass that accepts none is used
with the PIL image processor, the real audio feature extractor and a word-level tokenizer.
"""

import pytest
import torch
from transformers import (
    Gemma4Config,
    Gemma4ForConditionalGeneration,
    Gemma4Processor,
    Gemma4TextConfig,
    Gemma4VisionConfig,
)
from transformers.models.gemma4.feature_extraction_gemma4 import Gemma4AudioFeatureExtractor
from transformers.models.gemma4.image_processing_pil_gemma4 import Gemma4ImageProcessorPil

import zooprune
from tests.adapters.conformance import (
    AdapterConformance,
    FamilyTester,
    JvpEstimatorConformance,
    random_pictures,
    without_video_processor,
)
from zooprune import PruneError
from zooprune.adapters import adapter_for
from zooprune.select.sensitivity import jvp_sensitivity
from zooprune.tiny import SPECIAL, WORDS, word_tokenizer

PATCH, KERNEL = 4, 3
WIDTH = 16  # the vision tower's state size (d_v)
IMAGE = SPECIAL.index("<image>")
EOS = SPECIAL.index("</s>")
MARKERS = ["<start_of_image>", "<end_of_image>", "<start_of_audio>", "<end_of_audio>"]
MARKERS += ["<|audio|>", "<|video|>"]
VOCAB = SPECIAL + MARKERS + WORDS
VIDEO = VOCAB.index("<|video|>")
AUDIO = VOCAB.index("<|audio|>")
BANNED = (IMAGE, EOS, VIDEO, AUDIO)  # a generated placeholder would not match the inputs
# The processor resizes to at most 70 pooled tokens, keeping the aspect ratio: pooled
# grids 6 x 10, 13 x 5, 8 x 8 and 5 x 11 (N = 60, 65, 64, 55), both orientations.
SHAPES = [(40, 60), (60, 24), (36, 36), (45, 90)]
GRIDS = [(6, 10), (13, 5), (8, 8), (5, 11)]


def processor(video_processor=None) -> Gemma4Processor:
    tokenizer = word_tokenizer(
        VOCAB,
        SPECIAL + MARKERS,
        boi_token="<start_of_image>",
        eoi_token="<end_of_image>",
        image_token="<image>",
        boa_token="<start_of_audio>",
        eoa_token="<end_of_audio>",
        audio_token="<|audio|>",
    )
    images = Gemma4ImageProcessorPil(
        patch_size=PATCH, pooling_kernel_size=KERNEL, max_soft_tokens=70
    )
    return without_video_processor(Gemma4Processor)(
        feature_extractor=Gemma4AudioFeatureExtractor(),
        image_processor=images,
        tokenizer=tokenizer,
        video_processor=video_processor,
    )


class Gemma4Tester(FamilyTester):
    name = "gemma4"
    model_class = Gemma4ForConditionalGeneration
    image_token = IMAGE
    banned = BANNED
    keep = 7

    def build(self, path, text_width=32, head_dim=16):
        config = Gemma4Config(
            vision_config=Gemma4VisionConfig(
                hidden_size=WIDTH,
                intermediate_size=32,
                num_hidden_layers=1,
                num_attention_heads=2,
                num_key_value_heads=2,
                head_dim=8,
                patch_size=PATCH,
                pooling_kernel_size=KERNEL,
                position_embedding_size=64,
            ),
            text_config=Gemma4TextConfig(
                vocab_size=len(VOCAB),
                hidden_size=text_width,
                intermediate_size=2 * text_width,
                num_hidden_layers=3,
                num_attention_heads=2,
                num_key_value_heads=1,
                head_dim=head_dim,
                global_head_dim=head_dim,
                # Larger than any prompt here: see the adapter's note on sliding windows.
                sliding_window=512,
                layer_types=["sliding_attention", "full_attention", "full_attention"],
                num_kv_shared_layers=1,
                use_bidirectional_attention="vision",
                vocab_size_per_layer_input=len(VOCAB),
                hidden_size_per_layer_input=8,
                pad_token_id=0,
                bos_token_id=2,
                eos_token_id=3,
            ),
            audio_config=None,
            image_token_id=IMAGE,
            video_token_id=VIDEO,
            audio_token_id=AUDIO,
            boi_token_id=VOCAB.index("<start_of_image>"),
            eoi_token_id=VOCAB.index("<end_of_image>"),
            boa_token_id=VOCAB.index("<start_of_audio>"),
            eoa_token_index=VOCAB.index("<end_of_audio>"),
        )
        model = Gemma4ForConditionalGeneration(config)
        with torch.no_grad():
            # The position table starts as ones (every patch alike) and the projection
            # small next to the text embeddings: make both count.
            model.model.vision_tower.patch_embedder.position_embedding_table.normal_(std=0.5)
            model.model.embed_vision.embedding_projection.weight.normal_(std=0.5)
        model.generation_config.pad_token_id = 0
        model.eval().save_pretrained(path)
        return path

    def processor(self):
        return processor()

    def pictures(self):
        return random_pictures(2, SHAPES)

    vllm_picture_size = (40, 60)

    def vllm_build(self, path):
        # The video processor needs torchvision: there in vLLM's environment only.
        self.build(path, text_width=64, head_dim=32)
        self.vllm_hf_processor(path).save_pretrained(path)
        return path

    def vllm_hf_processor(self, path):
        # transformers 5.19's AutoProcessor gives Gemma 4's tokenizer alone: built here.
        from transformers.models.gemma4.video_processing_gemma4 import Gemma4VideoProcessor

        return processor(Gemma4VideoProcessor(patch_size=PATCH, pooling_kernel_size=KERNEL))

    def vllm_hf_inputs(self, batch):
        # vLLM 0.32's CPU runner attends causally within an image block (its bidirectional
        # attention is GPU-only): so does the HF reference, without mm_token_type_ids.
        return {k: v for k, v in batch.items() if k != "mm_token_type_ids"}

    def vllm_projector_width(self, model):
        return WIDTH

    def step_inputs(self, input_ids):
        return {"mm_token_type_ids": (input_ids == IMAGE).long()}


def pooled_by_position(vlm, batch):
    """Per image, ``[rows, cols, d_v]``: the tower's patch states averaged over each
    ``KERNEL x KERNEL`` window of the image as the patches' ``(x, y)`` place them, times
    ``sqrt(d_v)`` (the model's pooling, written out)."""
    captured = {}
    encoder = vlm.model.vision_tower.encoder
    hook = encoder.register_forward_hook(
        lambda module, args, output: captured.update(states=output.last_hidden_state)
    )
    try:
        with torch.no_grad():
            vlm.model.get_image_features(batch["pixel_values"], batch["image_position_ids"])
    finally:
        hook.remove()
    grids = []
    for states, xy in zip(captured["states"], batch["image_position_ids"], strict=True):
        real = (xy != -1).all(-1)
        (x, y), states = xy[real].T, states[real]
        placed = torch.zeros(int(y.max()) + 1, int(x.max()) + 1, WIDTH)
        placed[y, x] = states
        rows, cols = placed.shape[0] // KERNEL, placed.shape[1] // KERNEL
        windows = placed.view(rows, KERNEL, cols, KERNEL, WIDTH).mean(dim=(1, 3))
        grids.append(windows * WIDTH**0.5)
    return grids


class TestGemma4(AdapterConformance, JvpEstimatorConformance):
    tester = Gemma4Tester()

    def test_pooled_grids_follow_the_aspect_ratio(self, vlm, proc, pictures):
        """N differs per image; ``ratio=`` keeps int(r * N) of each, ``keep=`` K of each."""
        t = self.tester
        batch = t.inputs(proc, [pictures[:2], pictures[2:]], [t.prompts[1] + " <image>"] * 2)
        for budget, expected in (({"ratio": 0.25}, [15, 16, 16, 13]), ({"keep": 9}, [9] * 4)):
            with zooprune.prune(vlm, "zoo", **budget, **t.fast) as handle:
                vlm(**batch)
            images = handle.selection.images
            assert [s.grid for s in images] == GRIDS
            assert [s.num_tokens for s in images] == [h * w for h, w in GRIDS]
            assert [s.kept for s in images] == expected
        # The model's own placeholder runs agree: one run of N per image.
        assert (batch["input_ids"] == IMAGE).sum(-1).tolist() == [60 + 65, 64 + 55]

    def test_the_projector_is_embed_vision_on_the_pooled_states(self, vlm, proc, pictures):
        # Two images of different grids in one call: the tower pads both to one length.
        t = self.tester
        batch = t.inputs(proc, [pictures[:1], pictures[3:4]], t.prompts[:2])
        adapter = adapter_for(vlm)
        projector = adapter.projector(vlm)
        assert projector is vlm.model.embed_vision
        with torch.no_grad():
            image_inputs = {k: batch[k] for k in ("pixel_values", "image_position_ids")}
            encoded = adapter.encode(vlm, image_inputs, frozenset())
            tokens = vlm.model.get_image_features(**image_inputs).pooler_output
            by_hand = pooled_by_position(vlm, batch)
            assert encoded.grids == [GRIDS[0], GRIDS[3]]
            for features, own, grid, hand in zip(
                encoded.features, tokens, encoded.grids, by_hand, strict=True
            ):
                assert hand.shape[:2] == grid and features.shape == (own.shape[0], WIDTH)
                # X is the pooled grid in raster order ...
                torch.testing.assert_close(features, hand.flatten(0, 1), rtol=0, atol=1e-5)
                # ... and the projector maps it to the model's own tokens, row for row.
                torch.testing.assert_close(projector(features), own, rtol=0, atol=1e-6)
                # Token-wise: one pooled state alone gives its token.
                torch.testing.assert_close(projector(features[4]), own[4], rtol=0, atol=1e-6)

    def test_record_maps_kept_tokens_to_pooled_cells(self, vlm, proc, pictures):
        """Each kept token's cell names the window of patches the model pooled into it."""
        t = self.tester
        batch = t.inputs(proc, [pictures[:1], pictures[1:2]], t.prompts[:2])
        with zooprune.prune(vlm, "divprune", keep=6) as handle:
            prepared = handle.prepare(dict(batch), for_generate=False)
        placed = prepared["mm_encoder_outputs"]["image"].pooler_output
        by_hand = pooled_by_position(vlm, batch)
        for image, tokens, hand in zip(handle.selection.images, placed, by_hand, strict=True):
            grid = GRIDS[image.image]
            assert image.grid == grid and image.patch_grids == (grid,) and image.kept == 6
            assert bool((image.crops == 0).all()) and image.boxes is None
            assert torch.equal(image.cells[:, 0] * grid[1] + image.cells[:, 1], image.indices)
            assert bool((batch["input_ids"][image.prompt, image.positions] == IMAGE).all())
            with torch.no_grad():
                expected = vlm.model.embed_vision(hand[image.cells[:, 0], image.cells[:, 1]])
            torch.testing.assert_close(tokens, expected, rtol=0, atol=1e-5)

    def test_the_kept_image_tokens_stay_one_bidirectional_block(
        self, vlm, proc, pictures, positions
    ):
        batch = self.batch(proc, pictures, 2)
        with zooprune.prune(vlm, "zoo", keep=9, positions=positions) as handle:
            pruned = vlm(**batch).logits
            kept = handle.selection.images[0].positions
        keep = batch["input_ids"][0] != IMAGE
        keep[kept] = True
        place = torch.arange(batch["input_ids"].shape[1])
        if positions == "compact":
            place = place - (~keep).long().cumsum(0)
        masked = self.tester.masked_reference
        reference = masked(vlm, batch, kept, place[None])
        torch.testing.assert_close(pruned[0], reference[0, keep], rtol=0, atol=1e-5)
        # Without mm_token_type_ids (causal image tokens) the reference differs: the
        # equality above holds only because the pruned prompt kept its image block.
        causal = {k: v for k, v in batch.items() if k != "mm_token_type_ids"}
        causal = masked(vlm, causal, kept, place[None])
        assert not torch.allclose(causal[0, keep], reference[0, keep], atol=1e-3)

    def test_mm_token_type_ids_shrink_with_the_placeholders(self, vlm, proc, pictures):
        prompts = self.tester.prompts
        batch = self.tester.inputs(
            proc, [pictures[:1], pictures[1:3]], [prompts[0], prompts[1] + " <image>"]
        )
        with zooprune.prune(vlm, "zoo", keep=5, **self.tester.fast) as handle:
            prepared = handle.prepare(dict(batch), for_generate=False)
        ids, types = prepared["input_ids"], prepared["mm_token_type_ids"]
        assert types.shape == ids.shape
        assert torch.equal(types.bool(), ids == IMAGE)
        assert (ids == IMAGE).sum(-1).tolist() == [5, 10]
        # The markers around each image stay, one pair per image.
        for marker in MARKERS[:2]:
            assert (ids == VOCAB.index(marker)).sum(-1).tolist() == [1, 2]

    def test_the_sensitivity_falls_as_the_norm_grows(self, vlm, proc, pictures):
        # embed_vision's RMSNorm has no scale: M(c x) = M(x), so S(c x) = S(x) / c.
        batch = self.batch(proc, pictures, 0)
        encoded = adapter_for(vlm).encode(
            vlm, {k: batch[k] for k in ("pixel_values", "image_position_ids")}, frozenset()
        )
        x = encoded.features[0][None].detach()
        projector = vlm.model.embed_vision
        with torch.no_grad():
            once = jvp_sensitivity(projector, x, num_directions=8)
            twice = jvp_sensitivity(projector, 2 * x, num_directions=8)
        torch.testing.assert_close(twice, once / 2, rtol=1e-4, atol=0)

    def test_bfloat16_model_end_to_end(self, saved, proc, pictures):
        model = self.tester.load(saved, dtype=torch.bfloat16)
        batch = self.batch(proc, pictures, 0, 1)
        batch["pixel_values"] = batch["pixel_values"].bfloat16()
        with zooprune.prune(model, "zoo", ratio=1.0, num_directions=8) as handle:
            out = self.greedy(model, batch, steps=3)
        assert out.shape[1] == batch["input_ids"].shape[1] + 3
        assert [s.kept for s in handle.selection.images] == [60, 65]
        assert handle.selection.details["estimator"] == "jvp"
        assert handle.selection.scores[0].dtype == torch.float32

    def test_inputs_without_a_patch_grid_are_refused(self, vlm, proc, pictures):
        batch = self.batch(proc, pictures, 0)
        with zooprune.prune(vlm, "grid", keep=4) as handle:
            with pytest.raises(PruneError, match="needs image_position_ids"):
                vlm(**{k: v for k, v in batch.items() if k != "image_position_ids"})
            torn = batch["image_position_ids"].clone()
            torn[0, 5] = -1  # a hole in the patch grid
            with pytest.raises(PruneError, match="full patch grid"):
                vlm(**batch | {"image_position_ids": torn})
            assert handle.selection is None
            assert vlm(**batch).logits.shape[1] < batch["input_ids"].shape[1]

    def test_videos_and_audio_pass_through_unpruned_and_are_refused_beside_images(
        self, vlm, proc, pictures
    ):
        # A 2-frame video of 6 x 6 patches: 2 x 2 pooled tokens per frame.
        torch.manual_seed(1)
        frames, side = 2, 2 * KERNEL
        count = frames * (side // KERNEL) ** 2
        words = ["<s>", "user", "<start_of_image>"] + ["<|video|>"] * count
        ids = torch.tensor([[VOCAB.index(w) for w in [*words, "<end_of_image>", "describe"]]])
        y, x = torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij")
        xy = torch.stack([x.flatten(), y.flatten()], -1)
        video = {
            "input_ids": ids,
            "attention_mask": torch.ones_like(ids),
            "mm_token_type_ids": (ids == VIDEO).long() * 2,
            "pixel_values_videos": torch.rand(frames, side * side, 3 * PATCH * PATCH),
            "video_position_ids": xy.expand(frames, -1, -1),
            "num_frames_per_video": torch.tensor([frames]),
        }
        expected = vlm(**video).logits
        with zooprune.prune(vlm, "zoo", keep=2) as handle:
            assert torch.equal(vlm(**video).logits, expected)
            assert handle.selection is None  # nothing was pruned
            batch = self.batch(proc, pictures, 0)
            extra = {k: video[k] for k in video if "video" in k}
            with pytest.raises(PruneError, match="both images and videos"):
                vlm(**batch, **extra)
            audio = {"input_features": torch.zeros(1, 8, 128), "input_features_mask": None}
            audio["input_features_mask"] = torch.ones(1, 8, dtype=torch.bool)
            with pytest.raises(PruneError, match="both images and audio"):
                vlm(**batch, **audio)
            assert handle.selection is None
            # The refusals changed nothing: the next call with images prunes.
            assert vlm(**batch).logits.shape[1] < batch["input_ids"].shape[1]
