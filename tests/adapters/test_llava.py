"""LLaVA-1.5 layout: the conformance suite, and what is LLaVA's own (VisionZip's CLS
attention and CLS token, the estimators, the loss, the record, bfloat16).

The tiny random LLaVA (``zooprune.tiny``: CLIP 48 px / 6 px patches, 8 x 8 = 64 visual
tokens, CLS dropped) is saved with ``save_pretrained`` and loaded with ``from_pretrained``.
"""

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import LlavaForConditionalGeneration

import zooprune
from tests.adapters.conformance import AdapterConformance, FamilyTester, random_pictures
from zooprune import PruneError
from zooprune.tiny import SPECIAL, llava_layout_config, save_tiny_llava, tiny_llava_processor

IMAGE = SPECIAL.index("<image>")
N = 64  # the tiny model's 8 x 8 patch grid


class LlavaTester(FamilyTester):
    name = "llava"
    model_class = LlavaForConditionalGeneration
    image_token = IMAGE
    banned = (IMAGE,)
    keep = 7
    pruned_cases = (
        ("zoo", {}),
        ("divprune", {}),
        ("random", {}),
        ("grid", {}),
        ("visionzip", {"contextual": 0}),
        ("cdpruner", {}),
        ("dart", {}),
    )
    batch_cases = (("zoo", {}), ("pool", {}), ("visionzip", {}), ("cdpruner", {}), ("dart", {}))

    def build(self, path: Path) -> Path:
        return save_tiny_llava(path)

    def processor(self):
        return tiny_llava_processor()

    def pictures(self) -> list[Image.Image]:
        return random_pictures(0, [(52 + 7 * i, 60) for i in range(4)])

    def vllm_build(self, path: Path) -> Path:
        # The layout of zooprune.tiny's LLaVA with a language model vLLM's CPU attention
        # runs (head dim 32).
        processor = tiny_llava_processor()
        config = llava_layout_config(
            image_size=48,
            patch_size=6,
            vision=(32, 2, 4, 64),
            text=(64, 2, 2, 2, 128),
            vocab_size=len(processor.tokenizer),
            image_token_id=IMAGE,
        )
        model = LlavaForConditionalGeneration(config).eval()
        model.generation_config.pad_token_id = 0
        model.save_pretrained(path)
        processor.save_pretrained(path)
        return path


class TestLlava(AdapterConformance):
    tester = LlavaTester()

    def test_visionzip_ranks_by_the_feature_layers_cls_attention(self, saved, proc, pictures):
        eager = self.tester.load(saved, attn_implementation="eager")
        batch = self.batch(proc, pictures, 0)
        tower = eager.model.vision_tower(batch["pixel_values"], output_attentions=True)
        # vision_feature_layer = -2: the features are the output of layers[-2]
        expected = tower.attentions[-2][0, :, 0, 1:].sum(dim=0)
        with zooprune.prune(eager, "visionzip", keep=12, contextual=2) as handle:
            eager(**batch)
        chosen = handle.selection.images[0]
        torch.testing.assert_close(chosen.scores, expected, atol=1e-5, rtol=1e-5)
        dominant = set(expected.argsort(descending=True)[:10].tolist())
        assert dominant <= set(chosen.indices.tolist())

    def test_visionzip_can_keep_the_cls_token_as_its_authors_do(self, vlm, proc, pictures):
        batch = self.batch(proc, pictures, 0)
        with torch.no_grad():
            tower = vlm.model.vision_tower(batch["pixel_values"], output_hidden_states=True)
            cls = vlm.model.multi_modal_projector(tower.hidden_states[-2][0, 0])
        with zooprune.prune(vlm, "visionzip", keep=12, contextual=2, cls_token=True) as handle:
            prepared = handle.prepare(dict(batch), for_generate=False)
            authors = handle.selection.images[0]
        with zooprune.prune(vlm, "visionzip", keep=12, contextual=2) as handle:
            vlm(**batch)
            ours = handle.selection.images[0]
        assert handle.selection.details["cls_token"] is False
        placed = prepared["mm_encoder_outputs"]["image"].pooler_output[0]
        # The CLS token fills the image's first placeholder: first, as in the authors' code.
        assert authors.kept == 12 and int(authors.indices[0]) == 0
        torch.testing.assert_close(placed[0], cls, rtol=0, atol=1e-5)
        # Dominant: the CLS token and the 9 patches (not 10) the CLS attends to most,
        # patch 0 aside (its placeholder holds the CLS token).
        attention = ours.scores.clone()
        attention[0] = -1
        top9 = set(attention.argsort(descending=True)[:9].tolist())
        assert top9 <= set(authors.indices.tolist())
        assert top9 | {int(attention.argsort(descending=True)[9])} <= set(ours.indices.tolist())

    def test_cls_token_is_refused_where_the_tower_has_none(self, tmp_path):
        from transformers import LlamaConfig, LlavaConfig, SiglipVisionConfig

        config = LlavaConfig(
            vision_config=SiglipVisionConfig(
                image_size=24,
                patch_size=6,
                hidden_size=16,
                intermediate_size=32,
                num_hidden_layers=2,
                num_attention_heads=2,
            ),
            text_config=LlamaConfig(
                vocab_size=32,
                hidden_size=16,
                intermediate_size=32,
                num_hidden_layers=1,
                num_attention_heads=2,
            ),
            image_token_id=5,
            vision_feature_select_strategy="full",
        )
        siglip = LlavaForConditionalGeneration(config)
        usable = "methods that apply: cdpruner, dart, divprune"
        with pytest.raises(PruneError, match=f"needs cls_attention.*{usable}"):
            zooprune.prune(siglip, "visionzip", keep=4)
        with pytest.raises(PruneError, match="cls_token must be True or False"):
            zooprune.prune(siglip, "visionzip", keep=4, cls_token="yes")
        assert "forward" not in siglip.__dict__
        zooprune.prune(siglip, "zoo", keep=4).remove()

    def test_labels_are_shortened_and_the_loss_is_the_masked_one(self, vlm, proc, pictures):
        batch = self.batch(proc, pictures, 0)
        labels = batch["input_ids"].clone()
        labels[labels == IMAGE] = -100
        with zooprune.prune(vlm, "zoo", keep=6, positions="original") as handle:
            pruned = vlm(**batch, labels=labels)
        kept = handle.selection.images[0].positions
        place = torch.arange(labels.shape[1])[None]
        reference_logits = self.tester.masked_reference(vlm, batch, kept, place)
        keep = batch["input_ids"][0] != IMAGE
        keep[kept] = True
        reference = torch.nn.functional.cross_entropy(
            reference_logits[0, keep][:-1], labels[0, keep][1:], ignore_index=-100
        )
        torch.testing.assert_close(pruned.loss, reference, atol=1e-5, rtol=1e-5)

    def test_ratio_budget_uses_the_authors_rounding(self, vlm, proc, pictures):
        with zooprune.prune(vlm, "divprune", ratio=0.1112) as handle:
            vlm(**self.batch(proc, pictures, 0))
        assert handle.selection.kept == int(0.1112 * N) == 7

    def test_numpy_integer_budgets_and_options_are_accepted(self, vlm, proc, pictures):
        batch = self.batch(proc, pictures, 0)
        with zooprune.prune(
            vlm,
            "zoo",
            keep=np.int64(9),
            num_directions=np.int64(4),
            estimator="zo",
            seed=np.int32(3),
        ) as handle:
            vlm(**batch)
        assert handle.selection.kept == 9
        assert handle.options == {"num_directions": 4, "estimator": "zo", "seed": 3}
        assert type(handle.options["num_directions"]) is int

    def test_selection_record(self, vlm, proc, pictures):
        batch = self.batch(proc, pictures, 0, 1)
        with zooprune.prune(vlm, "zoo", keep=6, estimator="zo", num_directions=8) as handle:
            vlm(**batch)
        selection = handle.selection
        assert selection.method == "zoo" and selection.details["estimator"] == "zo"
        ids = batch["input_ids"]
        for image in selection.images:
            assert image.grid == (8, 8) and image.num_tokens == N
            assert image.indices.tolist() == sorted(set(image.indices.tolist()))
            assert image.scores.shape == (N,) and bool((image.scores > 0).all())
            # The kept positions are image placeholders of the image's own prompt, in order.
            assert bool((ids[image.prompt, image.positions] == IMAGE).all())
            assert image.positions.tolist() == sorted(image.positions.tolist())

    def test_selection_is_reproducible(self, vlm, proc, pictures):
        batch = self.batch(proc, pictures, 0)
        picks = []
        for _ in range(2):
            with zooprune.prune(vlm, "zoo", keep=6, num_directions=8, seed=3) as handle:
                vlm(**batch)
            picks.append(handle.selection.indices[0])
        assert torch.equal(*picks)

    @pytest.mark.parametrize("estimator", ["exact", "zo", "jvp", "lowrank"])
    def test_every_estimator_runs_and_is_recorded(self, vlm, proc, pictures, estimator):
        options = {"estimator": estimator, "num_directions": 8, "rank": 4}
        with zooprune.prune(vlm, "zoo", keep=5, **options) as handle:
            vlm(**self.batch(proc, pictures, 0))
        assert handle.selection.details["estimator"] == estimator
        assert bool((handle.selection.scores[0] > 0).all())

    def test_scores_that_rank_nothing_are_refused(self, vlm, proc, pictures):
        # A step below float32's resolution leaves every input unperturbed: every score is
        # 0, and the min-max normalisation would silently turn zoo into diversity alone.
        with zooprune.prune(vlm, "zoo", keep=5, estimator="zo", num_directions=4, step=1e-30):
            with pytest.raises(PruneError, match="scored image 0 0 for every token"):
                vlm(**self.batch(proc, pictures, 0))

    def test_bfloat16_model_end_to_end(self, saved, proc, pictures):
        model = self.tester.load(saved, dtype=torch.bfloat16)
        batch = self.batch(proc, pictures, 0, 1)
        batch["pixel_values"] = batch["pixel_values"].bfloat16()
        with zooprune.prune(model, "zoo", keep=N) as handle:
            out = self.greedy(model, batch, steps=3)
        assert out.shape[1] == batch["input_ids"].shape[1] + 3
        assert handle.selection.details["estimator"] == "exact"
        assert handle.selection.scores[0].dtype == torch.float32

    def test_observers_see_every_pruned_call_and_every_refusal(self, vlm, proc, pictures):
        import copy

        seen = []
        batch = self.batch(proc, pictures, 0, 1)
        with zooprune.prune(vlm, "grid", keep=5) as handle:
            handle.observe(lambda selection, error: seen.append((selection, error)))
            vlm(**batch)
            self.greedy(vlm, batch, steps=2)  # the cached steps carry no image: not pruned
            assert [(s.kept, e) for s, e in seen] == [(10, None), (10, None)]
            with pytest.raises(PruneError, match="max_length"):
                vlm.generate(**batch, max_length=3)
            assert seen[-1][0] is None and isinstance(seen[-1][1], PruneError)
            assert zooprune.handle_of(copy.deepcopy(vlm))._observers == []  # not copied

            def stop(selection, error):
                raise KeyboardInterrupt  # an observer may end the call its own way

            handle.observe(stop)
            with pytest.raises(KeyboardInterrupt):
                vlm(**batch)
