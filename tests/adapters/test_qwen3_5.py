"""Qwen3.5 (dense and MoE): the conformance suite and the Qwen families' checks
(``QwenConformance``: ``prepare``'s positions and ``rope_deltas``, merged cells,
estimators, videos) against the shortened-sequence reference, and what is Qwen3.5's own
(its merger, the positions against the stock model step by step).

Tiny random models of both classes are built here (4 px patches merged 2 x 2, so one
token per 8 x 8 pixels; a language model of Gated DeltaNet linear-attention layers around
a full-attention layer, the MoE one with 4 experts), saved with ``save_pretrained`` and
loaded back with ``from_pretrained``. The vocabulary, pictures, prompts, videos and
processor are Qwen3-VL's tests' (``Qwen3VLProcessor`` is Qwen3.5's processor).

Why the reference is not the suite's masked model: masking a token out of a linear-
attention layer is not removing it. Those layers have no attention mask; they zero a
masked token's input, and the zero still occupies a slot of the causal convolution's
window and decays the recurrent state (the gate does not depend on the input alone).
The pruned model is exactly "the dropped placeholders never existed", so its reference
is the unpruned model fed the shortened sequence: the model's own embeddings with the
model's own image tokens in place, only the kept rows, each with its original 3-D
position (:func:`shortened_logits`). That reference reproduces the unpruned model when
nothing is dropped; when something is, the masked model differs from it, and agrees with
it once every layer is full attention.
"""

import copy

import torch
from transformers import (
    Qwen3_5Config,
    Qwen3_5ForConditionalGeneration,
    Qwen3_5MoeConfig,
    Qwen3_5MoeForConditionalGeneration,
    Qwen3_5VisionConfig,
)
from transformers.models.qwen3_5.modeling_qwen3_5 import Qwen3_5VisionPatchMerger

import zooprune
from tests.adapters.test_qwen2_vl import (
    BANNED,
    IMAGE,
    MERGE,
    PATCH,
    VIDEO,
    VOCAB,
    WIDTH,
    QwenConformance,
    masked_reference,
)
from tests.adapters.test_qwen3_vl import Qwen3VLTester
from zooprune.adapters import adapter_for
from zooprune.families.qwen import Qwen3MergerProjector

# Linear attention around full attention: a dropped token would reach the full layer's
# queries through the first and leave its trace in the last.
LAYERS = ["linear_attention", "full_attention", "linear_attention"]
CLASSES = {
    "qwen3.5": (Qwen3_5Config, Qwen3_5ForConditionalGeneration),
    "qwen3.5-moe": (Qwen3_5MoeConfig, Qwen3_5MoeForConditionalGeneration),
}


def build(family, path, vllm=False):
    """The family's tiny model saved to ``path``. With ``vllm``, the widths vLLM's CPU
    build runs: linear-attention heads of 64 (its Gated DeltaNet kernel takes 64 or 128)
    and attention heads of 64, rotary on half of them (16 frequencies, interleaved)."""
    config_class, model_class = CLASSES[family]
    head, linear, sections = (64, 64, [6, 5, 5]) if vllm else (16, 8, [2, 1, 1])
    text = {
        "vocab_size": len(VOCAB),
        "hidden_size": 64 if vllm else 32,
        "num_hidden_layers": len(LAYERS),
        "layer_types": LAYERS,
        "num_attention_heads": 2,
        "num_key_value_heads": 1,
        "head_dim": head,
        "linear_conv_kernel_dim": 4,
        "linear_key_head_dim": linear,
        "linear_value_head_dim": linear,
        "linear_num_key_heads": 2,
        "linear_num_value_heads": 4,
        # Rotary on half of head_dim, its frequencies shared by the three M-RoPE sections.
        "rope_parameters": {
            "rope_type": "default",
            "rope_theta": 10000.0,
            "partial_rotary_factor": 0.5,
            "mrope_section": sections,
            "mrope_interleaved": True,
        },
        "pad_token_id": 0,
        "bos_token_id": 2,
        "eos_token_id": 3,
    }
    if family == "qwen3.5":
        text["intermediate_size"] = 64
    else:
        text |= {
            "num_experts": 4,
            "num_experts_per_tok": 2,
            "moe_intermediate_size": 48 if vllm else 16,
            "shared_expert_intermediate_size": 16,
        }
    config = config_class(
        vision_config={
            "depth": 2,
            "hidden_size": WIDTH,
            "intermediate_size": 32,
            "num_heads": 2,
            "patch_size": PATCH,
            "spatial_merge_size": MERGE,
            "temporal_patch_size": 2,
            "out_hidden_size": text["hidden_size"],
            "num_position_embeddings": 16,
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


def shortened_logits(vlm, inputs, keep):
    """The stock model fed only the tokens of prompt 0 where ``keep`` holds.

    Args:
        inputs: the batch: ``input_ids [B, L]`` (every item's placeholders present), its
            ``attention_mask``, and the images' and videos' pixel inputs and grids.
        keep: ``[L]`` bool over prompt 0, on real tokens only.

    Returns:
        ``[1, keep.sum(), V]``: the model run on its own embeddings of the batch, its own
        image and video tokens in their placeholders, prompt 0's rows where ``keep``
        holds, each at its unpruned 3-D position (the one ``get_rope_index`` gives it in
        the whole prompt); the first position row counts the kept tokens 0, 1, ... as the
        model's own 1-D row.
    """
    ids = inputs["input_ids"]
    embeds = vlm.get_input_embeddings()(ids)
    encoders = (
        (IMAGE, "pixel_values", "image_grid_thw", vlm.model.get_image_features),
        (VIDEO, "pixel_values_videos", "video_grid_thw", vlm.model.get_video_features),
    )
    for token, pixels, grid, encode in encoders:
        if inputs.get(pixels) is not None:
            tokens = torch.cat(encode(inputs[pixels], inputs[grid]).pooler_output)
            embeds = embeds.masked_scatter((ids == token)[..., None], tokens)
    positions = vlm.model.get_rope_index(
        ids,
        mm_token_type_ids=(ids == IMAGE).long() + 2 * (ids == VIDEO).long(),
        image_grid_thw=inputs.get("image_grid_thw"),
        video_grid_thw=inputs.get("video_grid_thw"),
        attention_mask=inputs.get("attention_mask", torch.ones_like(ids)),
    )[0]
    count = int(keep.sum())
    flat = torch.arange(count)[None, None]
    return vlm(
        inputs_embeds=embeds[:1, keep],
        attention_mask=torch.ones(1, count, dtype=torch.long),
        position_ids=torch.cat([flat, positions[:, :1, keep]]),
    ).logits


def kept_mask(ids, kept, attention_mask=None):
    """``[L]`` True for the text of prompt 0 and its kept placeholders (real tokens only)."""
    keep = (ids[0] != IMAGE) & (ids[0] != VIDEO)
    if attention_mask is not None:
        keep &= attention_mask[0].bool()
    keep[kept] = True
    return keep


class Qwen3_5Tester(Qwen3VLTester):
    """Qwen3-VL's tester (processor, each video frame its own run after a timestamp) on
    Qwen3.5, against the shortened-sequence reference."""

    classes = CLASSES

    def build(self, path):
        return build(self.name, path)

    # vLLM's CPU Gated DeltaNet runs in bfloat16 only: both engines run the family so.
    vllm_dtype = "bfloat16"

    def vllm_model(self, path):
        build(self.name, path, vllm=True)

    def masked_reference(self, model, batch, kept, positions):
        # Not the masked model: its linear-attention layers cannot hide a token (see the
        # module docstring). The suites compare prompt 0's kept real rows only; the
        # others are NaN.
        keep = kept_mask(batch["input_ids"], kept, batch["attention_mask"])
        short = shortened_logits(model, batch, keep)
        full = short.new_full((1, keep.numel(), short.shape[-1]), float("nan"))
        full[0, keep] = short[0]
        return full


class Qwen3_5Specifics(QwenConformance):
    """What Qwen3.5 checks beyond the Qwen families' checks."""

    def one_prompt(self, proc, pictures):
        return self.tester.inputs(proc, [pictures[:1]], self.tester.prompts[2:3])

    def test_the_shortened_reference_keeping_everything_is_the_model_itself(
        self, vlm, proc, pictures
    ):
        # The reference's own check: nothing dropped, it is the stock model on pixel_values
        # (so the merger's tokens in the placeholders are all the image gives the model).
        batch = self.one_prompt(proc, pictures)
        everything = torch.ones_like(batch["input_ids"][0], dtype=torch.bool)
        torch.testing.assert_close(
            shortened_logits(vlm, batch, everything), vlm(**batch).logits, rtol=0, atol=1e-5
        )

    def test_masking_a_token_out_is_not_removing_it(self, vlm, proc, pictures):
        # Why the tester overrides masked_reference: the pruned model equals the shortened
        # reference, and the masked model differs from both, through the linear layers.
        batch = self.one_prompt(proc, pictures)
        with zooprune.prune(vlm, "grid", keep=5) as handle:
            pruned = vlm(**batch).logits[0]
            kept = handle.selection.images[0].positions
        keep = kept_mask(batch["input_ids"], kept)
        torch.testing.assert_close(pruned, shortened_logits(vlm, batch, keep)[0], rtol=0, atol=1e-5)
        masked = masked_reference(vlm, batch, kept)[0, keep]
        assert not torch.allclose(masked, pruned, rtol=0, atol=1e-3)
        # Before the first dropped placeholder the three agree: the difference is the
        # dropped tokens' trace, not a different model.
        first = int((~keep).nonzero()[0])
        torch.testing.assert_close(masked[:first], pruned[:first], rtol=0, atol=1e-5)
        # The linear layers leave that trace: with full attention in every layer, masking
        # is removing, and the two references agree.
        config = copy.deepcopy(vlm.config)
        config.text_config.layer_types = ["full_attention"] * len(LAYERS)
        torch.manual_seed(3)
        attention_only = type(vlm)(config).eval()
        torch.testing.assert_close(
            masked_reference(attention_only, batch, kept)[0, keep],
            shortened_logits(attention_only, batch, keep)[0],
            rtol=0,
            atol=1e-5,
        )

    def test_the_kept_tokens_keep_their_3d_positions(self, vlm, proc, pictures):
        # The Qwen families' test, against the shortened reference.
        batch = self.one_prompt(proc, pictures)
        with zooprune.prune(vlm, "grid", keep=6) as handle:
            pruned = vlm(**batch).logits
            kept = handle.selection.images[0].positions
        keep = kept_mask(batch["input_ids"], kept)
        torch.testing.assert_close(pruned, shortened_logits(vlm, batch, keep), rtol=0, atol=1e-5)
        # The positions matter: the shortened prompt numbered 0, 1, ... gives other logits.
        count = int(keep.sum())
        flat = torch.arange(count)[None, None].expand(4, 1, count)
        embeds = vlm.get_input_embeddings()(batch["input_ids"])
        images = vlm.model.get_image_features(batch["pixel_values"], batch["image_grid_thw"])
        embeds = embeds.masked_scatter(
            (batch["input_ids"] == IMAGE)[..., None], torch.cat(images.pooler_output)
        )
        renumbered = vlm(inputs_embeds=embeds[:, keep], position_ids=flat).logits
        assert not torch.allclose(renumbered, pruned, rtol=0, atol=1e-3)

    def test_pruned_generate_equals_the_shortened_unpruned_model_step_by_step(
        self, vlm, proc, pictures
    ):
        """Independent of the adapter: the stock model fed the kept tokens and what it has
        generated, every token at the position ``get_rope_index`` gives it in the grown
        unpruned prompt, recomputed from scratch at every step."""
        batch = self.two_prompts(proc, pictures)  # left padded
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
            inputs = {
                "pixel_values": batch["pixel_values"][starts[images[0]] : starts[images[-1] + 1]],
                "image_grid_thw": batch["image_grid_thw"][images[0] : images[-1] + 1],
            }
            kept = kept_by_row[row] - int((~real).sum())  # positions in the unpadded prompt
            for _ in range(steps):
                logits = shortened_logits(vlm, inputs | {"input_ids": ids}, kept_mask(ids, kept))
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
        # Two images of different grids in one call.
        batch = self.tester.inputs(proc, [pictures[:1], pictures[2:3]], self.tester.prompts[:2])
        adapter = adapter_for(vlm)
        with torch.no_grad():
            image_inputs = {k: batch[k] for k in ("pixel_values", "image_grid_thw")}
            encoded = adapter.encode(vlm, image_inputs, frozenset())
            pooled = vlm.model.get_image_features(**image_inputs).pooler_output
            projector = adapter.projector(vlm)
            assert isinstance(projector, Qwen3MergerProjector)
            for features, tokens in zip(encoded.features, pooled, strict=True):
                assert features.shape == (tokens.shape[0], MERGE * MERGE * WIDTH)
                torch.testing.assert_close(projector(features), tokens, rtol=0, atol=1e-6)
                # Token-wise: one grouped vector alone gives its token.
                torch.testing.assert_close(projector(features[4]), tokens[4], rtol=0, atol=1e-6)
            # The tower's own order is raster order (no attention windows to undo), and
            # the grouped features are its last states, merge^2 rows at a time.
            states = vlm.model.visual(batch["pixel_values"], grid_thw=batch["image_grid_thw"])
            grouped = states.last_hidden_state.reshape(-1, MERGE * MERGE * WIDTH)
            torch.testing.assert_close(torch.cat(encoded.features), grouped, rtol=0, atol=0)
            torch.testing.assert_close(
                vlm.model.visual.merger(states.last_hidden_state),
                torch.cat(pooled),
                rtol=0,
                atol=1e-6,
            )

    def test_a_merger_that_normalises_whole_vectors_is_wrapped_too(self):
        # use_postshuffle_norm (one LayerNorm over the grouped vector) is the merger's
        # other form; the wrapper follows it row for row.
        torch.manual_seed(2)
        config = Qwen3_5VisionConfig(
            hidden_size=WIDTH, out_hidden_size=32, spatial_merge_size=MERGE
        )
        for whole in (False, True):
            merger = Qwen3_5VisionPatchMerger(config, use_postshuffle_norm=whole).eval()
            with torch.no_grad():
                merger.norm.weight.normal_()  # not the identity affine of a fresh norm
                merger.norm.bias.normal_()
                states = torch.randn(MERGE * MERGE * 6, WIDTH)
                grouped = states.reshape(6, MERGE * MERGE * WIDTH)
                wrapped = Qwen3MergerProjector(merger, MERGE * MERGE)(grouped)
                torch.testing.assert_close(wrapped, merger(states), rtol=0, atol=1e-6)


class TestQwen3_5(Qwen3_5Specifics):
    tester = Qwen3_5Tester("qwen3.5")


class TestQwen3_5Moe(Qwen3_5Specifics):
    tester = Qwen3_5Tester("qwen3.5-moe")
