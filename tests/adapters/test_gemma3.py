"""Gemma 3: the invariants of tests/test_api.py on its pooled grid and bidirectional image block.

A tiny random ``Gemma3ForConditionalGeneration`` (SigLIP 8 x 8 patches pooled to 4 x 4
tokens, one sliding-window and one global layer) is built here, saved with
``save_pretrained`` and loaded back with ``from_pretrained``.
"""

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import (
    Gemma3Config,
    Gemma3ForConditionalGeneration,
    Gemma3Processor,
    Gemma3TextConfig,
    SiglipVisionConfig,
)
from transformers.models.gemma3.image_processing_pil_gemma3 import Gemma3ImageProcessorPil

import zooprune
from tests.adapters.test_llava_next import inputs
from tests.test_api import greedy, masked_reference
from zooprune import METHODS, PruneError
from zooprune.adapters.gemma3 import PooledProjector
from zooprune.tiny import SPECIAL, WORDS, word_tokenizer

SIZE, PATCH, SIDE = 32, 4, 4  # 8 x 8 patches, pooled 2 x 2 -> 4 x 4 tokens
N = SIDE * SIDE
IMAGE = SPECIAL.index("<image>")  # the soft image token: the id test_api.greedy suppresses
EOS = SPECIAL.index("</s>")
MARKERS = ["<start_of_image>", "<end_of_image>"]
VOCAB = SPECIAL + MARKERS + WORDS
PROMPTS = [
    "<s> user <start_of_image> what is in the image ?",
    "<s> user <start_of_image> describe this picture",
    "<s> user what shape is the red square ? <start_of_image> left or right ?",
]


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


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    torch.manual_seed(0)
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
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_key_value_heads=1,
            head_dim=16,
            query_pre_attn_scalar=16,
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
    path = tmp_path_factory.mktemp("gemma3")
    model.eval().save_pretrained(path)
    return path


@pytest.fixture
def vlm(saved):
    return Gemma3ForConditionalGeneration.from_pretrained(saved).eval()


@pytest.fixture(scope="module")
def proc():
    return processor()


@pytest.fixture(scope="module")
def pictures():
    rng = np.random.default_rng(2)
    shapes = [(40, 60), (50, 30), (36, 36), (30, 80)]
    return [Image.fromarray(rng.integers(0, 256, (*s, 3), dtype=np.uint8)) for s in shapes]


# -- the invariants ---------------------------------------------------------------------


@pytest.mark.parametrize("method", sorted(set(METHODS) - {"visionzip"}))
def test_keep_all_tokens_is_a_noop(vlm, proc, pictures, method):
    batch = inputs(proc, [pictures[:1], pictures[1:2]], PROMPTS[:2])
    tokens = greedy(vlm, batch)
    logits = vlm(**batch).logits
    with zooprune.prune(vlm, method, keep=N) as handle:
        torch.testing.assert_close(vlm(**batch).logits, logits, rtol=0, atol=1e-5)
        assert torch.equal(greedy(vlm, batch), tokens)
    assert [s.kept for s in handle.selection.images] == [N, N]


@pytest.mark.parametrize("positions", ["original", "compact"])
@pytest.mark.parametrize("method", ["zoo", "divprune", "random", "grid"])
def test_pruned_forward_equals_masked_unpruned(vlm, proc, pictures, method, positions):
    batch = inputs(proc, [pictures[:1]], PROMPTS[2:3])
    with zooprune.prune(vlm, method, keep=9, positions=positions) as handle:
        pruned = vlm(**batch).logits
        kept = handle.selection.images[0].positions
    ids = batch["input_ids"]
    keep = ids[0] != IMAGE
    keep[kept] = True
    place = torch.arange(ids.shape[1])
    if positions == "compact":
        place = place - (~keep).long().cumsum(0)
    reference = masked_reference(vlm, batch, kept, place[None])
    assert pruned.shape[1] == int(keep.sum()) == ids.shape[1] - (N - 9)
    torch.testing.assert_close(pruned[0], reference[0, keep], rtol=0, atol=1e-5)
    # The reference holds the kept image tokens in one bidirectional block: without
    # token_type_ids (causal image tokens) it differs, so the equality above checks that
    # the pruned prompt kept its image block.
    causal = masked_reference(
        vlm, {k: v for k, v in batch.items() if k != "token_type_ids"}, kept, place[None]
    )
    assert not torch.allclose(causal[0, keep], reference[0, keep], atol=1e-3)


def test_token_type_ids_shrink_with_the_placeholders(vlm, proc, pictures):
    batch = inputs(
        proc, [pictures[:1], pictures[1:3]], [PROMPTS[0], PROMPTS[1] + " <start_of_image>"]
    )
    with zooprune.prune(vlm, "zoo", keep=5) as handle:
        prepared = handle.prepare(dict(batch), for_generate=False)
    ids, types = prepared["input_ids"], prepared["token_type_ids"]
    assert types.shape == ids.shape
    assert torch.equal(types.bool(), ids == IMAGE)
    assert (ids == IMAGE).sum(-1).tolist() == [5, 10]
    # The markers around each image stay, one pair per image.
    for marker, count in zip(MARKERS, ([1, 2], [1, 2]), strict=True):
        assert (ids == VOCAB.index(marker)).sum(-1).tolist() == count


@pytest.mark.parametrize("positions", ["original", "compact"])
def test_generate_with_cache_equals_no_cache_loop(vlm, proc, pictures, positions):
    batch = inputs(proc, [pictures[3:4]], PROMPTS[:1])
    with zooprune.prune(vlm, "zoo", keep=6, positions=positions):
        # </s> is banned too: the loop below runs all six steps.
        generated = vlm.generate(
            **batch, max_new_tokens=6, do_sample=False, suppress_tokens=[IMAGE, EOS]
        )
        ids = batch["input_ids"]
        for _ in range(6):
            logits = vlm(
                input_ids=ids,
                pixel_values=batch["pixel_values"],
                token_type_ids=(ids == IMAGE).long(),
                use_cache=False,
            ).logits
            logits[..., [IMAGE, EOS]] = float("-inf")
            ids = torch.cat([ids, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(generated, ids)


@pytest.mark.parametrize(("method", "positions"), [("zoo", "compact"), ("pool", "original")])
def test_batch_equals_each_prompt_alone(vlm, proc, pictures, method, positions):
    # Left padding, prompts of different lengths and one with two images: the pruned
    # prompts lose different numbers of tokens and must be re-padded.
    prompts = [PROMPTS[0], PROMPTS[1] + " <start_of_image> and this ?", PROMPTS[2]]
    per_prompt = [pictures[:1], pictures[1:3], pictures[3:4]]
    batch = inputs(proc, per_prompt, prompts)
    assert bool((batch["attention_mask"][:, 0] == 0).any())
    # </s> is banned: a prompt alone would stop early, and the last four tokens not align.
    options = {"max_new_tokens": 4, "do_sample": False, "suppress_tokens": [IMAGE, EOS]}
    options |= {"output_scores": True, "return_dict_in_generate": True}
    with zooprune.prune(vlm, method, keep=7, positions=positions) as handle:
        together = vlm.generate(**batch, **options)
        assert [s.prompt for s in handle.selection.images] == [0, 1, 1, 2]
        for row, (prompt, group) in enumerate(zip(prompts, per_prompt, strict=True)):
            alone = vlm.generate(**inputs(proc, [group], [prompt]), **options)
            assert torch.equal(together.sequences[row, -4:], alone.sequences[0, -4:])
            torch.testing.assert_close(
                together.scores[0][row], alone.scores[0][0], rtol=0, atol=1e-4
            )


def test_remove_restores_the_model_exactly(vlm, proc, pictures, saved):
    batch = inputs(proc, [pictures[:1]], PROMPTS[:1])
    before = vlm(**batch).logits
    attributes = set(vlm.__dict__)
    handle = zooprune.prune(vlm, "zoo", keep=4)
    assert vlm(**batch).logits.shape[1] == before.shape[1] - (N - 4)
    handle.remove()
    handle.remove()  # harmless twice
    assert set(vlm.__dict__) == attributes
    assert vlm.forward.__func__ is type(vlm).forward
    assert torch.equal(vlm(**batch).logits, before)
    fresh = Gemma3ForConditionalGeneration.from_pretrained(saved).eval()
    assert torch.equal(greedy(vlm, batch), greedy(fresh, batch))
    zooprune.prune(vlm, "grid", keep=3).remove()  # can be pruned again after removal


# -- the record, the projector, what the family cannot serve ----------------------------


def test_record_maps_kept_tokens_to_pooled_cells(vlm, proc, pictures):
    """Each kept token's cell names the pooled-grid token the model computed there."""
    batch = inputs(proc, [pictures[:1], pictures[1:2]], PROMPTS[:2])
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


def test_the_projector_is_the_token_wise_part_after_the_pool(vlm, proc, pictures):
    batch = inputs(proc, [pictures[:1]], PROMPTS[:1])
    with torch.no_grad():
        patches = vlm.model.vision_tower(batch["pixel_values"]).last_hidden_state  # [1, 64, d_v]
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
    with zooprune.prune(vlm, "zoo", keep=5, estimator="exact"):
        with pytest.raises(PruneError, match="use 'jvp' or 'zo'"):
            vlm(**batch)


def test_visionzip_is_refused_naming_the_methods_that_apply(vlm):
    with pytest.raises(PruneError, match="cls_attention") as error:
        zooprune.prune(vlm, "visionzip", keep=4)
    usable = str(error.value).split("methods that apply: ")[1].split(", ")
    assert usable == sorted(set(METHODS) - {"visionzip"})
    assert "forward" not in vlm.__dict__
