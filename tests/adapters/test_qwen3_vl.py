"""Qwen3-VL dense and MoE: the conformance suite and the Qwen families' checks
(``QwenConformance``: 3-D M-RoPE positions, ``prepare``'s positions and ``rope_deltas``,
merged cells, the estimators, videos), and what is their own (the DeepStack rows that go
with the kept tokens, the masked reference's handling of DeepStack, the merger as
projector).

Tiny random models of both classes are built here from one config (4 px patches merged
2 x 2, so one token per 8 x 8 pixels; a 3-block tower whose blocks 0 and 1 feed two
DeepStack levels, added after text layers 0 and 1 of 3; the MoE class with 4 experts, 2
per token), saved with ``save_pretrained`` and loaded back with ``from_pretrained``. The
vocabulary, pictures, prompts and videos are Qwen2-VL's tests' (the same image processor),
each frame of a video written as its own run, as Qwen3-VL's processor does.
``Qwen3VLProcessor`` cannot be built without torchvision (its video processor), so a
subclass that accepts no video processor is used with the PIL image processor and a
word-level tokenizer.
"""

import torch
from transformers import (
    Qwen3VLConfig,
    Qwen3VLForConditionalGeneration,
    Qwen3VLMoeConfig,
    Qwen3VLMoeForConditionalGeneration,
    Qwen3VLProcessor,
)

import zooprune
from tests.adapters.test_qwen2_vl import (
    IMAGE,
    MERGE,
    PATCH,
    VIDEO,
    VIDEO_SIZE,
    VOCAB,
    WIDTH,
    QwenConformance,
    QwenTester,
    _sections,
    masked_reference,
    named_processor,
    processor,
)
from zooprune.adapters import adapter_for
from zooprune.families.qwen import Qwen3MergerProjector

DEEPSTACK = [0, 1]  # the tower blocks whose states feed the DeepStack levels
CLASSES = {
    "qwen3-vl": (Qwen3VLConfig, Qwen3VLForConditionalGeneration),
    "qwen3-vl-moe": (Qwen3VLMoeConfig, Qwen3VLMoeForConditionalGeneration),
}


def qwen3_processor():
    """Qwen3-VL's processor (Qwen3.5's too), its vision markers named."""
    return processor(
        Qwen3VLProcessor, vision_start_token="<vision_start>", vision_end_token="<vision_end>"
    )


def build(family, path, text_width=32):
    """The family's tiny model saved to ``path``: dense and MoE share everything but the
    text model's MLPs."""
    config_class, model_class = CLASSES[family]
    text = {
        "vocab_size": len(VOCAB),
        "hidden_size": text_width,
        "intermediate_size": 2 * text_width,
        "num_hidden_layers": 3,
        "num_attention_heads": 2,
        "num_key_value_heads": 1,
        "head_dim": text_width // 2,
        # the three M-RoPE sections share head_dim / 2 frequencies ([2, 3, 3] at 16)
        # interleaved, as Qwen3-VL always is (and its released configs say: vLLM reads it)
        "rope_parameters": {
            "rope_type": "default",
            "mrope_section": _sections(text_width // 2),
            "mrope_interleaved": True,
        },
        "pad_token_id": 0,
        "bos_token_id": 2,
        "eos_token_id": 3,
    }
    if family == "qwen3-vl-moe":
        # Non-square experts: vLLM would load square ones transposed without an error.
        text |= {
            "num_experts": 4,
            "num_experts_per_tok": 2,
            "moe_intermediate_size": text_width * 3 // 4,
        }
    config = config_class(
        vision_config={
            "patch_size": PATCH,
            "spatial_merge_size": MERGE,
            "temporal_patch_size": 2,
            "depth": 3,
            "hidden_size": WIDTH,
            "intermediate_size": 32,
            "num_heads": 2,
            "out_hidden_size": text_width,
            "num_position_embeddings": 16,  # a 4 x 4 grid, resampled to each image's
            "deepstack_visual_indexes": DEEPSTACK,
        },
        text_config=text,
        image_token_id=IMAGE,
        video_token_id=VIDEO,
        vision_start_token_id=VOCAB.index("<vision_start>"),
        vision_end_token_id=VOCAB.index("<vision_end>"),
    )
    model = model_class(config)
    model.generation_config.pad_token_id = 0
    model.eval().save_pretrained(path)
    return path


class Qwen3VLTester(QwenTester):
    """Qwen2-VL's tester on Qwen3-VL. Its masked reference is Qwen2-VL's too: the model
    still adds every placeholder's DeepStack rows there, the masked ones included, and a
    masked placeholder is a key no token attends to in an otherwise token-wise decoder,
    so those rows reach no other token, while each kept token gets its own rows where
    the pruned model must add them (checked below)."""

    classes = CLASSES
    # Qwen3-VL's processor writes each frame of a video as its own run after a timestamp.
    video_text = "<video>"
    run_per_frame = True

    def build(self, path):
        return build(self.name, path)

    def processor(self):
        return qwen3_processor()

    def vllm_model(self, path):
        build(self.name, path, text_width=64)

    def vllm_processor(self):
        from transformers.models.qwen3_vl.video_processing_qwen3_vl import Qwen3VLVideoProcessor

        # The image processor's mean and std, as in the released models: vLLM normalises
        # every modality's pixels inside the tower with the image processor's.
        images = processor().image_processor
        video = Qwen3VLVideoProcessor(
            patch_size=PATCH,
            merge_size=MERGE,
            temporal_patch_size=2,
            size=VIDEO_SIZE,
            image_mean=images.image_mean,
            image_std=images.image_std,
        )
        return named_processor(Qwen3VLProcessor, video)


class Qwen3VLSpecifics(QwenConformance):
    """What Qwen3-VL checks beyond the Qwen families' checks: DeepStack."""

    def test_deepstack_rows_go_with_the_kept_tokens(self, vlm, proc, pictures):
        batch = self.two_prompts(proc, pictures)
        with zooprune.prune(vlm, "divprune", keep=5) as handle:
            prepared = handle.prepare(dict(batch), for_generate=False)
            pruned = vlm(**batch).logits
        with torch.no_grad():
            full = vlm.model.get_image_features(batch["pixel_values"], batch["image_grid_thw"])
        placed = prepared["mm_encoder_outputs"]["image"]
        assert len(placed.deepstack_features) == len(DEEPSTACK)
        for image in handle.selection.images:
            i, rows = image.image, image.indices
            assert image.kept == 5 < image.num_tokens
            assert torch.equal(placed.pooler_output[i], full.pooler_output[i][rows])
            for level, every in zip(
                placed.deepstack_features, full.deepstack_features, strict=True
            ):
                assert torch.equal(level[i], every[i][rows])
        torch.testing.assert_close(vlm(**prepared).logits, pruned, rtol=0, atol=0)

    def test_the_masked_reference_reads_no_deepstack_row_of_a_dropped_token(
        self, vlm, proc, pictures
    ):
        """The suite's masked reference is valid for DeepStack: noise in the dropped
        tokens' rows changes nothing, while a kept token's row changes the logits (so
        the suite's comparison does check that the pruned model adds the right rows)."""
        t = self.tester
        batch = t.inputs(proc, [pictures[:1]], t.prompts[2:3])
        with zooprune.prune(vlm, "grid", keep=t.keep) as handle:
            pruned = vlm(**batch).logits
        image = handle.selection.images[0]
        kept = image.positions
        keep = batch["input_ids"][0] != IMAGE
        keep[kept] = True
        reference = masked_reference(vlm, batch, kept)
        torch.testing.assert_close(pruned[0], reference[0, keep], rtol=0, atol=1e-5)
        with torch.no_grad():
            own = vlm.model.get_image_features(batch["pixel_values"], batch["image_grid_thw"])
        dropped = torch.ones(image.num_tokens, dtype=torch.bool)
        dropped[image.indices] = False
        generator = torch.Generator().manual_seed(0)

        def with_noise_at(where):
            """The masked reference given the model's own encoding, with noise in the
            rows ``where`` of every DeepStack level."""
            levels = []
            for (level,) in own.deepstack_features:
                level = level.clone()
                level[where] = 100 * torch.randn(level[where].shape, generator=generator)
                levels.append((level,))
            encoded = type(own)(pooler_output=own.pooler_output, deepstack_features=levels)
            return masked_reference(vlm, batch, kept, mm_encoder_outputs={"image": encoded})

        noisy_dropped = with_noise_at(dropped)
        torch.testing.assert_close(noisy_dropped[0, keep], reference[0, keep], rtol=0, atol=1e-5)
        one_kept = torch.zeros_like(dropped)
        one_kept[image.indices[0]] = True
        changed = with_noise_at(one_kept)[0, keep]
        assert not torch.allclose(changed, reference[0, keep], rtol=0, atol=1e-3)

    def test_pool_places_its_tokens_with_the_deepstack_rows_of_their_cells(
        self, vlm, proc, pictures
    ):
        batch = self.tester.inputs(proc, [pictures[2:3]], self.tester.prompts[:1])
        with zooprune.prune(vlm, "pool", keep=4) as handle:
            prepared = handle.prepare(dict(batch), for_generate=False)
        with torch.no_grad():
            full = vlm.model.get_image_features(batch["pixel_values"], batch["image_grid_thw"])
        placed = prepared["mm_encoder_outputs"]["image"]
        rows = handle.selection.images[0].indices
        # The pooled tokens are built (averages of 4 cells each), their levels are the cells'.
        assert not torch.allclose(placed.pooler_output[0], full.pooler_output[0][rows])
        for level, every in zip(placed.deepstack_features, full.deepstack_features, strict=True):
            assert torch.equal(level[0], every[0][rows])

    def test_the_projector_is_the_merger_and_deepstack_shares_its_rows(self, vlm, proc, pictures):
        # Two images of different grids in one call.
        batch = self.tester.inputs(proc, [pictures[:1], pictures[2:3]], self.tester.prompts[:2])
        adapter = adapter_for(vlm)
        visual = vlm.model.visual
        unit = MERGE * MERGE
        states = {}
        hooks = [
            visual.blocks[block].register_forward_hook(
                lambda module, args, output, block=block: states.__setitem__(block, output)
            )
            for block in DEEPSTACK
        ]
        try:
            with torch.no_grad():
                image_inputs = {k: batch[k] for k in ("pixel_values", "image_grid_thw")}
                encoded = adapter.encode(vlm, image_inputs, frozenset())
                own = vlm.model.get_image_features(**image_inputs)
        finally:
            for hook in hooks:
                hook.remove()
        with torch.no_grad():
            projector = adapter.projector(vlm)
            assert isinstance(projector, Qwen3MergerProjector)
            for features, tokens in zip(encoded.features, own.pooler_output, strict=True):
                assert features.shape == (tokens.shape[0], unit * WIDTH)
                torch.testing.assert_close(projector(features), tokens, rtol=0, atol=1e-6)
                # Token-wise: one grouped vector alone gives its token.
                torch.testing.assert_close(projector(features[4]), tokens[4], rtol=0, atol=1e-6)
            # The tower keeps raster order: the merger on its last states gives the tokens.
            last = visual(batch["pixel_values"], grid_thw=batch["image_grid_thw"])
            in_tower_order = visual.merger(last.last_hidden_state)
            torch.testing.assert_close(in_tower_order, torch.cat(own.pooler_output), rtol=0, atol=0)
            # Row j of every level comes from window j of its block's states: the same cell.
            for k, block in enumerate(DEEPSTACK):
                grouped = states[block].reshape(-1, unit * WIDTH)
                level = Qwen3MergerProjector(visual.deepstack_merger_list[k], unit)(grouped)
                torch.testing.assert_close(
                    level, torch.cat(own.deepstack_features[k]), rtol=0, atol=1e-6
                )


class TestQwen3VL(Qwen3VLSpecifics):
    tester = Qwen3VLTester("qwen3-vl")


class TestQwen3VLMoe(Qwen3VLSpecifics):
    tester = Qwen3VLTester("qwen3-vl-moe")
