"""Mistral 3: the conformance suite on merged Pixtral grids whose rows are separated by
text tokens, and what is its own (the ``[IMG_BREAK]`` policy against the masked model,
the projector on grouped patches, merged cells, the estimators, prompts not laid out in
rows).

A tiny random model is built here (4 px patches merged 2 x 2, so one token per 8 x 8
pixels), saved with ``save_pretrained`` and loaded back with ``from_pretrained``.
``PixtralProcessor`` cannot be imported without torchvision, so :class:`PixtralLikeProcessor`
does what it does with the PIL image processor and a word-level tokenizer: each image
marker becomes ``gh`` rows of ``gw`` placeholders, a ``[IMG_BREAK]`` after each row but
the last, ``[IMG_END]`` after the last.
"""

import pytest
import torch
from transformers import (
    BatchFeature,
    Mistral3Config,
    Mistral3ForConditionalGeneration,
    MistralConfig,
    PixtralVisionConfig,
)
from transformers.models.pixtral.image_processing_pil_pixtral import PixtralImageProcessorPil

import zooprune
from tests.adapters.conformance import (
    AdapterConformance,
    FamilyTester,
    JvpEstimatorConformance,
    random_pictures,
)
from zooprune import PruneError
from zooprune.adapters import adapter_for
from zooprune.errors import PlaceholderMismatchError
from zooprune.families.mistral3 import MergedPatchProjector
from zooprune.tiny import SPECIAL, WORDS, word_tokenizer

PATCH, MERGE = 4, 2
CELL = PATCH * MERGE  # pixels per side of one merged token
WIDTH = 16  # the tower's state size: a grouped vector has MERGE^2 * WIDTH entries
MARKERS = ["[IMG_BREAK]", "[IMG_END]"]
VOCAB = SPECIAL + MARKERS + WORDS
IMAGE, EOS = VOCAB.index("<image>"), VOCAB.index("</s>")
BREAK, END = VOCAB.index("[IMG_BREAK]"), VOCAB.index("[IMG_END]")
BANNED = (IMAGE, EOS, BREAK, END)  # keeps generation going, and the images' runs intact
# Multiples of 8 px under the 48 px longest edge: processed unchanged, merged grids
# 3x5, 5x3, 4x4, 2x6.
SHAPES = [(24, 40), (40, 24), (32, 32), (16, 48)]


class PixtralLikeProcessor:
    """What ``PixtralProcessor`` does, without its torchvision import: pixels from the PIL
    image processor, and each ``<image>`` of a prompt expanded into the image's rows."""

    def __init__(self) -> None:
        self.image_processor = PixtralImageProcessorPil(
            size={"longest_edge": 48}, patch_size={"height": CELL, "width": CELL}
        )
        self.tokenizer = word_tokenizer(VOCAB, SPECIAL + MARKERS, image_token="<image>")

    def __call__(self, images, text, return_tensors="pt", padding=True) -> BatchFeature:
        pixels = self.image_processor(images=images, return_tensors="pt")
        sizes = iter(pixels["image_sizes"].tolist())
        expanded = []
        for prompt in text:
            head, *rest = prompt.split("<image>")
            for tail in rest:
                height, width = next(sizes)
                rows = [" ".join(["<image>"] * (width // CELL))] * (height // CELL)
                head += " " + " [IMG_BREAK] ".join(rows) + " [IMG_END] " + tail
            expanded.append(head)
        words = self.tokenizer(expanded, return_tensors=return_tensors, padding=padding)
        return BatchFeature({**words, **pixels})


def build(path, text_width=32, text_heads=4):
    torch.manual_seed(0)
    config = Mistral3Config(
        vision_config=PixtralVisionConfig(
            hidden_size=WIDTH,
            intermediate_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            image_size=64,
            patch_size=PATCH,
        ),
        text_config=MistralConfig(
            vocab_size=len(VOCAB),
            hidden_size=text_width,
            intermediate_size=2 * text_width,
            num_hidden_layers=2,
            num_attention_heads=text_heads,
            num_key_value_heads=2,
            head_dim=text_width // text_heads,
            sliding_window=None,
            pad_token_id=0,
            bos_token_id=2,
            eos_token_id=3,
        ),
        image_token_index=IMAGE,
        spatial_merge_size=MERGE,
        vision_feature_layer=-1,
    )
    model = Mistral3ForConditionalGeneration(config)
    model.generation_config.pad_token_id = 0
    model.eval().save_pretrained(path)
    return path


class Mistral3Tester(FamilyTester):
    name = "mistral3"
    model_class = Mistral3ForConditionalGeneration
    image_token = IMAGE
    banned = BANNED
    keep = 5
    fast = {"num_directions": 8}
    pruned_cases = (
        ("zoo", {"separators": "all"}),
        ("divprune", {"separators": "all"}),
        ("random", {}),
        ("grid", {}),
    )
    # "nonempty" drops text tokens the suite's masked reference keeps: the masked
    # reference of that policy is this file's own test.
    batch_cases = (("zoo", {"separators": "nonempty"}), ("pool", {"separators": "all"}))
    loop_cases = (("zoo", {"separators": "all"}), ("zoo", {"separators": "nonempty"}))

    def build(self, path):
        return build(path)

    def processor(self):
        return PixtralLikeProcessor()

    def pictures(self):
        return random_pictures(7, SHAPES)

    def vllm_build(self, path):
        build(path, text_width=64, text_heads=2)
        self.vllm_hf_processor(path).save_pretrained(path)
        return path

    def vllm_served_prompt(self, pruned):
        # vLLM holds the kept breaks as placeholders it fills with the break's embedding.
        return [IMAGE if token == BREAK else token for token in pruned]

    def vllm_projector_width(self, model):
        return MERGE * MERGE * WIDTH  # one merge window's patch states

    def vllm_hf_processor(self, path):
        # vLLM reads the real processor (it imports torchvision: there in vLLM's
        # environment only); it lays images out as PixtralLikeProcessor does.
        from transformers import PixtralProcessor

        like = PixtralLikeProcessor()
        return PixtralProcessor(
            like.image_processor,
            like.tokenizer,
            patch_size=PATCH,
            spatial_merge_size=MERGE,
            image_token="<image>",
        )


def rows_of(input_ids, first):
    """``(gh, gw)``'s prompt layout read back: the breaks' positions after ``first``."""
    after = input_ids[first:]
    end = int((after == END).nonzero()[0])
    return first + (after[:end] == BREAK).nonzero().flatten(), first + end


def masked(vlm, batch, hidden, positions):
    """Unpruned logits with the ``hidden`` positions of prompt 0 masked out of attention."""
    mask = batch["attention_mask"].clone()
    mask[0, hidden] = 0
    return vlm(**batch | {"attention_mask": mask, "position_ids": positions}).logits


class TestMistral3(AdapterConformance, JvpEstimatorConformance):
    tester = Mistral3Tester()

    @pytest.mark.parametrize("separators", ["all", "nonempty"])
    def test_separators_policy_against_the_masked_model(
        self, vlm, proc, pictures, separators, positions
    ):
        """A row that keeps no token keeps its break under "all" and loses it under
        "nonempty"; [IMG_END] always stays; the pruned forward is the unpruned one with
        the dropped placeholders and breaks masked out."""
        batch = self.tester.inputs(proc, [pictures[1:2]], self.tester.prompts[2:3])
        ids = batch["input_ids"][0]
        with zooprune.prune(
            vlm, "grid", keep=3, separators=separators, positions=positions
        ) as handle:
            prepared = handle.prepare(dict(batch), for_generate=False)
            pruned = vlm(**batch).logits
        image = handle.selection.images[0]
        first = int((ids == IMAGE).nonzero()[0])
        breaks, end = rows_of(ids, first)
        assert breaks.numel() == 4  # 5 x 3 grid: a break after each row but the last
        rows_kept = set((image.cells[:, 0]).tolist())
        assert len(rows_kept) < 5  # some rows lost all their tokens
        if separators == "all":
            expected = breaks
        else:
            expected = breaks[[r for r in range(4) if r in rows_kept]]
            assert expected.numel() < breaks.numel()
        assert torch.equal(image.separators, expected)
        assert bool((ids[image.separators] == BREAK).all())
        # The prompt the model gets: the kept tokens, the kept breaks, the end, the text.
        keep = torch.ones_like(ids, dtype=torch.bool)
        keep[first:end] = False
        keep[image.positions] = True
        keep[image.separators] = True
        assert torch.equal(prepared["input_ids"][0], ids[keep])
        assert int((prepared["input_ids"] == END).sum()) == 1
        assert prepared["mm_encoder_outputs"]["image"].pooler_output[0].shape[0] == 3
        place = torch.arange(ids.numel())
        if positions == "compact":
            place = place - (~keep).long().cumsum(0)
        reference = masked(vlm, batch, ~keep, place[None])
        torch.testing.assert_close(pruned[0], reference[0, keep], rtol=0, atol=1e-5)

    def test_the_projector_is_the_merger_on_grouped_patches(self, vlm, proc, pictures):
        # Two images of different grids in one call: the tower packs both in one sequence.
        batch = self.tester.inputs(proc, [pictures[:1], pictures[3:4]], self.tester.prompts[:2])
        adapter = adapter_for(vlm)
        inputs = {k: batch[k] for k in ("pixel_values", "image_sizes")}
        with torch.no_grad():
            encoded = adapter.encode(vlm, inputs, frozenset())
            pooled = vlm.model.get_image_features(**inputs).pooler_output
            states = vlm.model.vision_tower(
                batch["pixel_values"], image_sizes=batch["image_sizes"]
            ).last_hidden_state[0]
            projector = adapter.projector(vlm)
            assert isinstance(projector, MergedPatchProjector)
            first = 0
            for features, tokens, (height, width) in zip(
                encoded.features, pooled, [SHAPES[0], SHAPES[3]], strict=True
            ):
                gh, gw = height // CELL, width // CELL
                assert features.shape == (gh * gw, MERGE * MERGE * WIDTH) == (tokens.shape[0], 64)
                torch.testing.assert_close(projector(features), tokens, rtol=0, atol=1e-6)
                # Token-wise: one grouped vector alone gives its token.
                torch.testing.assert_close(projector(features[4]), tokens[4], rtol=0, atol=1e-6)
                # Vector j holds the 2 x 2 patches of merged cell j, in raster order.
                patches = states[first : first + 4 * gh * gw].view(2 * gh, 2 * gw, WIDTH)
                for j in (0, gw + 1, gh * gw - 1):
                    r, c = divmod(j, gw)
                    window = patches[2 * r : 2 * r + 2, 2 * c : 2 * c + 2].reshape(-1)
                    assert torch.equal(features[j], window)
                first += 4 * gh * gw

    def test_record_maps_kept_tokens_to_merged_cells(self, vlm, proc, pictures):
        """Each kept token's cell, checked two ways: its token, its place among the rows."""
        batch = self.tester.inputs(proc, [pictures[:1], pictures[2:3]], self.tester.prompts[:2])
        with zooprune.prune(vlm, "divprune", keep=6) as handle:
            prepared = handle.prepare(dict(batch), for_generate=False)
        with torch.no_grad():
            full = vlm.model.get_image_features(
                batch["pixel_values"], batch["image_sizes"]
            ).pooler_output
        placed = prepared["mm_encoder_outputs"]["image"].pooler_output
        for image, tokens, (height, width) in zip(
            handle.selection.images, placed, [SHAPES[0], SHAPES[2]], strict=True
        ):
            grid = (height // CELL, width // CELL)
            assert image.grid == grid and image.patch_grids == (grid,)
            assert image.num_tokens == grid[0] * grid[1] and image.kept == 6
            assert bool((image.crops == 0).all()) and image.boxes is None
            # 1. The token placed there is the model's own token of that cell.
            cell_index = image.cells[:, 0] * grid[1] + image.cells[:, 1]
            assert torch.equal(cell_index, image.indices)
            torch.testing.assert_close(tokens, full[image.image][cell_index], rtol=0, atol=0)
            # 2. Its prompt position: row r after r breaks, column c after the row's start.
            ids = batch["input_ids"][image.prompt]
            first = int((ids == IMAGE).nonzero()[0])
            breaks, _ = rows_of(ids, first)
            starts = torch.cat([torch.tensor([first]), breaks + 1])
            assert torch.equal(image.positions, starts[image.cells[:, 0]] + image.cells[:, 1])

    def test_placeholders_not_in_rows_are_refused(self, vlm, proc, pictures):
        batch = self.tester.inputs(proc, [pictures[:1]], self.tester.prompts[:1])
        ids = batch["input_ids"][0]
        gone = int((ids == BREAK).nonzero()[0])  # the first break: rows run together
        rowless = {
            name: torch.cat([batch[name][:, :gone], batch[name][:, gone + 1 :]], dim=1)
            for name in ("input_ids", "attention_mask")
        }
        with zooprune.prune(vlm, "grid", keep=5) as handle:
            with pytest.raises(PlaceholderMismatchError, match="not laid out as the image's rows"):
                vlm(**batch | rowless)
            assert handle.selection is None
        with pytest.raises(PruneError, match="needs image_sizes"):
            with zooprune.prune(vlm, "grid", keep=5):
                vlm(**{k: v for k, v in batch.items() if k != "image_sizes"})
