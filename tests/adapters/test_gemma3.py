"""Gemma 3: the conformance suite on its pooled grid, and what is Gemma's own (the
bidirectional image block, pooled cells, the token-wise projector after the pool).

A tiny random ``Gemma3ForConditionalGeneration`` (SigLIP 8 x 8 patches pooled to 4 x 4
tokens, one sliding-window and one global layer) is built here, saved with
``save_pretrained`` and loaded back with ``from_pretrained``.
"""

import pytest
import torch
from transformers import (
    Gemma3Config,
    Gemma3ForConditionalGeneration,
    Gemma3Processor,
    Gemma3TextConfig,
    SiglipVisionConfig,
)
from transformers.models.gemma3.image_processing_pil_gemma3 import Gemma3ImageProcessorPil

import zooprune
from tests.adapters.conformance import AdapterConformance, FamilyTester, random_pictures
from zooprune import PruneError
from zooprune.families.gemma3 import PooledProjector
from zooprune.tiny import SPECIAL, WORDS, word_tokenizer

SIZE, PATCH, SIDE = 32, 4, 4  # 8 x 8 patches, pooled 2 x 2 -> 4 x 4 tokens
N = SIDE * SIDE
IMAGE = SPECIAL.index("<image>")  # the soft image token
EOS = SPECIAL.index("</s>")
MARKERS = ["<start_of_image>", "<end_of_image>"]
#: the newline runs vLLM's Gemma 3 processor looks up (the tokenizer never makes them here)
NEWLINES = ["\n", "\n\n", "\n\n\n", "\n\n\n\n"]
VOCAB = SPECIAL + MARKERS + WORDS + NEWLINES


def processor() -> Gemma3Processor:
    tokenizer = word_tokenizer(
        VOCAB,
        SPECIAL + MARKERS,
        boi_token="<start_of_image>",
        eoi_token="<end_of_image>",
        image_token="<image>",
    )
    images = Gemma3ImageProcessorPil(size={"height": SIZE, "width": SIZE})
    return Gemma3Processor(image_processor=images, tokenizer=tokenizer, image_seq_length=N)


class Gemma3Tester(FamilyTester):
    name = "gemma3"
    model_class = Gemma3ForConditionalGeneration
    image_token = IMAGE
    banned = (IMAGE, EOS)  # </s> too: a prompt alone would stop early
    image_text = "<start_of_image>"
    keep = 7

    def build(self, path, text_width=32, head_dim=16):
        config = Gemma3Config(
            vision_config=SiglipVisionConfig(
                image_size=SIZE,
                patch_size=PATCH,
                hidden_size=16,
                intermediate_size=32,
                num_hidden_layers=1,
                num_attention_heads=2,
            ),
            text_config=Gemma3TextConfig(
                vocab_size=len(VOCAB),
                hidden_size=text_width,
                intermediate_size=2 * text_width,
                num_hidden_layers=2,
                num_attention_heads=2,
                num_key_value_heads=1,
                head_dim=head_dim,
                query_pre_attn_scalar=head_dim,
                # Larger than any prompt here: see the adapter's note on sliding windows.
                sliding_window=512,
                layer_types=["sliding_attention", "full_attention"],
                pad_token_id=0,
                bos_token_id=2,
                eos_token_id=3,
            ),
            mm_tokens_per_image=N,
            boi_token_index=VOCAB.index("<start_of_image>"),
            eoi_token_index=VOCAB.index("<end_of_image>"),
            image_token_index=IMAGE,
        )
        model = Gemma3ForConditionalGeneration(config)
        # The projection matrix is initialised to zeros (all images alike): make it random.
        with torch.no_grad():
            model.model.multi_modal_projector.mm_input_projection_weight.normal_(std=0.5)
        model.generation_config.pad_token_id = 0
        model.eval().save_pretrained(path)
        return path

    def processor(self):
        return processor()

    def vllm_build(self, path):
        self.build(path, text_width=64, head_dim=32)
        processor().save_pretrained(path)
        return path

    def vllm_projector_width(self, model):
        return model.config.vision_config.hidden_size

    def vllm_hf_inputs(self, batch):
        # vLLM 0.32 attends bidirectionally within an image block only on its GPU attention
        # backends; its CPU runner attends causally there. The HF reference does the same
        # without token_type_ids, so that only the pruning is compared.
        return {k: v for k, v in batch.items() if k != "token_type_ids"}

    def pictures(self):
        return random_pictures(2, [(40, 60), (50, 30), (36, 36), (30, 80)])

    def step_inputs(self, input_ids):
        return {"token_type_ids": (input_ids == IMAGE).long()}


class TestGemma3(AdapterConformance):
    tester = Gemma3Tester()

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
        # Without token_type_ids (causal image tokens) the reference differs: the equality
        # above holds only because the pruned prompt kept its image block.
        causal = {k: v for k, v in batch.items() if k != "token_type_ids"}
        causal = masked(vlm, causal, kept, place[None])
        assert not torch.allclose(causal[0, keep], reference[0, keep], atol=1e-3)

    def test_token_type_ids_shrink_with_the_placeholders(self, vlm, proc, pictures):
        prompts = self.tester.prompts
        batch = self.tester.inputs(
            proc, [pictures[:1], pictures[1:3]], [prompts[0], prompts[1] + " <start_of_image>"]
        )
        with zooprune.prune(vlm, "zoo", keep=5) as handle:
            prepared = handle.prepare(dict(batch), for_generate=False)
        ids, types = prepared["input_ids"], prepared["token_type_ids"]
        assert types.shape == ids.shape
        assert torch.equal(types.bool(), ids == IMAGE)
        assert (ids == IMAGE).sum(-1).tolist() == [5, 10]
        # The markers around each image stay, one pair per image.
        for marker in MARKERS:
            assert (ids == VOCAB.index(marker)).sum(-1).tolist() == [1, 2]

    def test_record_maps_kept_tokens_to_pooled_cells(self, vlm, proc, pictures):
        """Each kept token's cell names the pooled-grid token the model computed there."""
        batch = self.batch(proc, pictures, 0, 1)
        with zooprune.prune(vlm, "divprune", keep=6) as handle:
            prepared = handle.prepare(dict(batch), for_generate=False)
        with torch.no_grad():
            full = vlm.model.get_image_features(batch["pixel_values"]).pooler_output  # [2, N, D]
        placed = prepared["mm_encoder_outputs"]["image"].pooler_output[0].split(6)
        for image, tokens in zip(handle.selection.images, placed, strict=True):
            assert image.num_tokens == N and image.kept == 6 and image.grid == (SIDE, SIDE)
            assert image.patch_grids == ((SIDE, SIDE),) and bool((image.crops == 0).all())
            assert torch.equal(image.cells[:, 0] * SIDE + image.cells[:, 1], image.indices)
            assert bool((batch["input_ids"][image.prompt, image.positions] == IMAGE).all())
            torch.testing.assert_close(tokens, full[image.image, image.indices], rtol=0, atol=0)

    def test_the_projector_is_the_token_wise_part_after_the_pool(self, vlm, proc, pictures):
        batch = self.batch(proc, pictures, 0)
        with torch.no_grad():
            patches = vlm.model.vision_tower(batch["pixel_values"]).last_hidden_state  # [1, 64, d]
            grid = patches.transpose(1, 2).reshape(1, -1, 8, 8)
            pooled = torch.nn.functional.avg_pool2d(grid, 2).flatten(2).transpose(1, 2)
            expected = vlm.model.multi_modal_projector(patches)
            token_wise = PooledProjector(vlm.model.multi_modal_projector)
            torch.testing.assert_close(token_wise(pooled), expected, rtol=0, atol=1e-6)
            # Token-wise: one pooled token alone gives the same output row.
            torch.testing.assert_close(token_wise(pooled[:, 5]), expected[:, 5], rtol=0, atol=1e-6)
        with zooprune.prune(vlm, "zoo", keep=5, num_directions=8) as handle:
            vlm(**batch)
        assert handle.selection.details["estimator"] == "jvp"  # auto: not a GELU MLP
        assert bool((handle.selection.scores[0] > 0).all())
        with pytest.raises(PruneError, match="use 'jvp' or 'zo'"):
            zooprune.prune(vlm, "zoo", keep=5, estimator="exact")  # refused before any image
        assert zooprune.handle_of(vlm) is None
