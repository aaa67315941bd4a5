"""LLaVA-NeXT and LLaVA-OneVision: the conformance suite on AnyRes layouts, and what is
AnyRes's own (crop budgets, the newline policy, crop cells and boxes).

Tiny random models of each family are built here, saved with ``save_pretrained`` and
loaded back with ``from_pretrained``. Three layouts run every invariant: LLaVA-NeXT
(CLIP, CLS dropped), OneVision (SigLIP, no CLS) and OneVision with ``anyres_max_1``, where
the model bilinearly shrinks the sub-crop grid.
"""

import pytest
import torch
from transformers import (
    CLIPVisionConfig,
    LlamaConfig,
    LlavaNextConfig,
    LlavaNextForConditionalGeneration,
    LlavaNextProcessor,
    LlavaOnevisionConfig,
    LlavaOnevisionForConditionalGeneration,
    LlavaOnevisionProcessor,
    Qwen2Config,
    SiglipVisionConfig,
)
from transformers.models.llava_next.image_processing_pil_llava_next import (
    LlavaNextImageProcessorPil,
)
from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches
from transformers.models.llava_onevision.image_processing_pil_llava_onevision import (
    LlavaOnevisionImageProcessorPil,
)

import zooprune
from tests.adapters.conformance import (
    AdapterConformance,
    FamilyTester,
    VideoConformance,
    random_pictures,
)
from zooprune import PruneError
from zooprune.budget import split_evenly
from zooprune.tiny import SPECIAL, WORDS, word_tokenizer

CROP, PATCH = 24, 6  # 4 x 4 patches per crop
SIDE = CROP // PATCH
PINPOINTS = [[24, 48], [48, 24], [48, 48]]
IMAGE = SPECIAL.index("<image>")
VIDEO = IMAGE + 1  # "<video>", right after the special tokens
POOLED = -(-SIDE // 2)  # a video frame's side after OneVision's pooling


def tokenizer():
    # <video> is a special word here, so that OneVision's processor finds its video token
    # and the run it expands it into splits into one token per placeholder.
    return word_tokenizer(SPECIAL + ["<video>"] + WORDS, SPECIAL + ["<video>"])


def text_config(cls, vocab_size, width=32, heads=4):
    return cls(
        vocab_size=vocab_size,
        hidden_size=width,
        intermediate_size=2 * width,
        num_hidden_layers=2,
        num_attention_heads=heads,
        num_key_value_heads=2,
        pad_token_id=0,
        bos_token_id=2,
        eos_token_id=3,
    )


def vision(cls):
    return cls(
        image_size=CROP,
        patch_size=PATCH,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
    )


class OnevisionProcessorWithoutVideo(LlavaOnevisionProcessor):
    """OneVision's processor for images only: its video processor needs torchvision."""

    def check_argument_for_proper_class(self, name, argument):
        if name == "video_processor" and argument is None:
            return None
        return super().check_argument_for_proper_class(name, argument)


def build(family, path, text_width=32, text_heads=4):
    """The family's tiny model saved to ``path`` (vLLM's CPU attention needs head_dim >= 32:
    its tests pass ``text_width=64, text_heads=2``)."""
    torch.manual_seed(0)
    vocab = len(tokenizer())
    if family == "llava-next":
        config = LlavaNextConfig(
            vision_config=vision(CLIPVisionConfig),
            text_config=text_config(LlamaConfig, vocab, text_width, text_heads),
            image_token_id=IMAGE,
            image_grid_pinpoints=PINPOINTS,
            vision_feature_layer=-2,
            vision_feature_select_strategy="default",
        )
        model = LlavaNextForConditionalGeneration(config)
    else:
        config = LlavaOnevisionConfig(
            vision_config=vision(SiglipVisionConfig),
            text_config=text_config(Qwen2Config, vocab, text_width, text_heads),
            image_token_id=IMAGE,
            video_token_id=VIDEO,
            image_grid_pinpoints=PINPOINTS,
            vision_feature_layer=-1,
            vision_feature_select_strategy="full",
        )
        model = LlavaOnevisionForConditionalGeneration(config)
    model.generation_config.pad_token_id = 0
    model.eval().save_pretrained(path)
    return path


def processor_for(family):
    if family == "llava-next":
        images = LlavaNextImageProcessorPil(
            size={"shortest_edge": CROP},
            crop_size={"height": CROP, "width": CROP},
            image_grid_pinpoints=PINPOINTS,
        )
        return LlavaNextProcessor(
            image_processor=images,
            tokenizer=tokenizer(),
            patch_size=PATCH,
            vision_feature_select_strategy="default",
            image_token="<image>",
            num_additional_image_tokens=1,
        )
    images = LlavaOnevisionImageProcessorPil(
        size={"height": CROP, "width": CROP}, image_grid_pinpoints=PINPOINTS
    )
    return OnevisionProcessorWithoutVideo(
        image_processor=images,
        tokenizer=tokenizer(),
        video_processor=None,
        num_image_tokens=SIDE * SIDE,
        vision_feature_select_strategy="full",
        image_token="<image>",
        vision_aspect_ratio="anyres_max_1" if family == "onevision-shrunk" else "anyres_max_9",
    )


class AnyResTester(FamilyTester):
    """LLaVA-NeXT (``family="llava-next"``) or OneVision (``"onevision"``, and
    ``"onevision-shrunk"``: the same weights loaded with ``anyres_max_1``)."""

    image_token = IMAGE
    banned = (IMAGE,)
    keep = 7
    pruned_cases = (
        ("zoo", {"crop_budget": "split", "separators": "all"}),
        ("divprune", {"crop_budget": "global", "separators": "nonempty"}),
        ("grid", {"crop_budget": "split", "separators": "nonempty"}),
        ("random", {"crop_budget": "global", "separators": "all"}),
    )
    batch_cases = (("zoo", {"crop_budget": "split"}), ("pool", {"crop_budget": "global"}))
    loop_cases = (("zoo", {"separators": "all"}), ("zoo", {"separators": "nonempty"}))

    def __init__(self, family: str) -> None:
        self.name = family
        self.family = family
        self.model_class = (
            LlavaNextForConditionalGeneration
            if family == "llava-next"
            else LlavaOnevisionForConditionalGeneration
        )

    def build(self, path):
        return build("onevision" if self.family == "onevision-shrunk" else self.family, path)

    def load(self, path, **config):
        # The config change makes the model shrink large sub-crop grids.
        if self.family == "onevision-shrunk":
            config = {"vision_aspect_ratio": "anyres_max_1"} | config
        return super().load(path, **config)

    def processor(self):
        return processor_for(self.family)

    def pictures(self):
        # Wide, tall, square and very wide: different pinpoints, crops and unpadding.
        return random_pictures(1, [(40, 60), (50, 30), (36, 36), (30, 80)])

    @property
    def vllm_images_alone(self):
        if self.family == "llava-next":
            return ""
        return (
            "transformers' OneVision gives each image of a several-image prompt its base "
            "crop only (batch_num_images); vLLM's gives it every crop, as to one image alone"
        )

    def vllm_build(self, path):
        build(self.family, path, text_width=64, text_heads=2)
        if self.family == "llava-next":
            processor_for(self.family).save_pretrained(path)
            return path
        # OneVision: the stock processor, videos and all (vLLM loads it; its video
        # processor needs torchvision, there in vLLM's environment only).
        from transformers.models.llava_onevision.video_processing_llava_onevision import (
            LlavaOnevisionVideoProcessor,
        )

        LlavaOnevisionProcessor(
            image_processor=processor_for(self.family).image_processor,
            tokenizer=tokenizer(),
            video_processor=LlavaOnevisionVideoProcessor(size={"height": CROP, "width": CROP}),
            num_image_tokens=SIDE * SIDE,
            vision_feature_select_strategy="full",
            image_token="<image>",
            video_token="<video>",
        ).save_pretrained(path)
        return path


class AnyResSpecifics(AdapterConformance):
    """What every AnyRes layout checks beyond the suite: budgets, newlines, the record."""

    @pytest.mark.parametrize("crop_budget", ["split", "global"])
    def test_budget_counts_visual_tokens_and_is_split_evenly_over_crops(
        self, vlm, proc, pictures, crop_budget
    ):
        batch = self.batch(proc, pictures, 0, 1)
        with zooprune.prune(vlm, "random", ratio=1.0) as full:
            vlm(**batch)
        with zooprune.prune(vlm, "zoo", keep=7, crop_budget=crop_budget) as handle:
            vlm(**batch)
        for image, everything in zip(handle.selection.images, full.selection.images, strict=True):
            row = batch["input_ids"][image.prompt]
            placeholders = int((row == IMAGE).sum())
            # N counts the visual tokens only: the separators are the rest of the run.
            assert image.num_tokens + everything.separators.numel() == placeholders
            assert image.kept == 7
            sizes = torch.bincount(everything.crops, minlength=len(image.patch_grids)).tolist()
            kept_per_crop = torch.bincount(image.crops, minlength=len(sizes)).tolist()
            if crop_budget == "split":
                assert len(sizes) > 1 and kept_per_crop == split_evenly(7, sizes)
            assert all(k <= n for k, n in zip(kept_per_crop, sizes, strict=True))

    @pytest.mark.parametrize("separators", ["all", "nonempty"])
    def test_separators_policy(self, vlm, proc, pictures, separators):
        batch = self.tester.inputs(proc, [pictures[3:4]], self.tester.prompts[:1])
        with zooprune.prune(vlm, "random", ratio=1.0) as full:
            vlm(**batch)
        every = full.selection.images[0]
        with zooprune.prune(vlm, "grid", keep=3, separators=separators) as handle:
            vlm(**batch)
        image = handle.selection.images[0]
        assert bool((batch["input_ids"][0, image.separators] == IMAGE).all())
        if separators == "all":
            assert torch.equal(image.separators, every.separators)
            return
        # A newline stays exactly when the row it closes keeps a token: the first newline at
        # or after a kept sub-crop token (base-crop tokens have none of their own, unless the
        # image is its base crop alone).
        rows = every.separators
        closing = set()
        for position, crop in zip(image.positions.tolist(), image.crops.tolist(), strict=True):
            after = rows[rows > position]
            if after.numel() and (crop > 0 or len(every.patch_grids) == 1):
                closing.add(int(after[0]))
        assert image.separators.tolist() == sorted(closing)
        assert image.separators.numel() < every.separators.numel()

    def test_record_maps_kept_tokens_to_crop_cells(self, vlm, proc, pictures):
        """Each kept token's (crop, cell) names the tower output the model put at its place."""
        batch = self.batch(proc, pictures, 0, 1)
        with zooprune.prune(vlm, "divprune", keep=12) as handle:
            vlm(**batch)
        config = vlm.config
        counts = [
            image_size_to_num_patches(size, config.image_grid_pinpoints, CROP)
            for size in batch["image_sizes"]
        ]
        with torch.no_grad():
            pixels = torch.cat([p[:n] for p, n in zip(batch["pixel_values"], counts, strict=True)])
            hidden = vlm.model.vision_tower(pixels, output_hidden_states=True).hidden_states
            feats = hidden[config.vision_feature_layer]
            if config.vision_feature_select_strategy == "default":
                feats = feats[:, 1:]
            projected = vlm.model.multi_modal_projector(feats)  # [crops, SIDE * SIDE, D]
            packed = vlm.model.get_image_features(
                pixel_values=batch["pixel_values"], image_sizes=batch["image_sizes"]
            ).pooler_output
        first = 0
        for image, n in zip(handle.selection.images, counts, strict=True):
            assert image.patch_grids == ((SIDE, SIDE),) * n
            assert bool((image.cells >= 0).all() & (image.cells < SIDE).all())
            height, width = batch["image_sizes"][image.image].tolist()
            assert image.boxes[0] == (0.0, 0.0, height, width)  # the base crop: the whole image
            regions = image.regions()
            assert regions.shape == (12, 4) and bool((regions[:, 2:] > regions[:, :2]).all())
            # Sub-crop boxes tile a canvas that covers the image.
            boxes = torch.tensor(image.boxes[1:])
            assert boxes[:, 0].min() <= 0 and boxes[:, 1].min() <= 0
            assert boxes[:, 2].max() >= height and boxes[:, 3].max() >= width
            if self.tester.family != "onevision-shrunk":  # shrunk tokens mix cells
                run = (batch["input_ids"][image.prompt] == IMAGE).nonzero().flatten()
                slot = torch.searchsorted(run, image.positions)
                cell = image.cells[:, 0] * SIDE + image.cells[:, 1]
                expected = projected[first + image.crops, cell]
                torch.testing.assert_close(packed[image.image][slot], expected, rtol=0, atol=1e-5)
            first += n

    def test_gradients_reach_the_newline(self, vlm, proc, pictures):
        batch = self.batch(proc, pictures, 0)
        with zooprune.prune(vlm, "zoo", keep=6):
            vlm(**batch, labels=batch["input_ids"]).loss.backward()
        assert vlm.model.image_newline.grad.abs().sum() > 0  # kept separators are the model's own


class TestLlavaNext(AnyResSpecifics):
    tester = AnyResTester("llava-next")

    def test_visionzip_batch_equals_each_prompt_alone(self, vlm, proc, pictures):
        prompts, per_prompt = self.tester.prompts[:2], [pictures[:1], pictures[1:2]]
        batch = self.tester.inputs(proc, per_prompt, prompts)
        with zooprune.prune(vlm, "visionzip", keep=20, contextual=1) as handle:
            together = vlm(**batch).logits[:, -1]
            assert handle.selection.kept == 40
            for row, (prompt, group) in enumerate(zip(prompts, per_prompt, strict=True)):
                alone = vlm(**self.tester.inputs(proc, [group], [prompt])).logits[0, -1]
                torch.testing.assert_close(together[row], alone, rtol=0, atol=1e-4)

    def test_visionzip_has_no_cls_token_option_on_anyres(self, vlm):
        with pytest.raises(PruneError, match="needs cls_token"):
            zooprune.prune(vlm, "visionzip", keep=8, cls_token=True)

    def test_bfloat16_model_end_to_end(self, saved, proc, pictures):
        model = self.tester.load(saved, dtype=torch.bfloat16)
        batch = self.tester.inputs(proc, [pictures[:1], pictures[3:4]], self.tester.prompts[:2])
        batch["pixel_values"] = batch["pixel_values"].bfloat16()
        with zooprune.prune(model, "zoo", keep=8) as handle:
            out = self.greedy(model, batch, steps=3)
        assert out.shape[1] == batch["input_ids"].shape[1] + 3
        assert handle.selection.scores[0].dtype == torch.float32


class OnevisionTester(AnyResTester):
    """OneVision with videos: ``videos`` are (frames, seed) of random frames; a call's
    videos share one tensor, so they have the same number of frames."""

    video_token = VIDEO
    video_text = "<video>"
    banned = (IMAGE, VIDEO)
    vllm_video_separators = 1  # the newline closing a video
    videos = [(3, 0), (3, 1)]

    def frames_of(self, spec):
        return spec[0]

    def tokens_per_frame(self, spec):
        return POOLED * POOLED

    def step_inputs(self, input_ids):
        return {}

    def video_inputs(self, proc, images, videos, prompts):
        """The processor's batch for the images; each video's placeholders written out as
        the processor would (its video processor needs torchvision): ``<unk>`` words the
        processor lets through, turned into ``<video>`` ids."""
        run = "<unk>" * (3 * POOLED * POOLED + 1)
        texts = [prompt.replace("<video>", run) for prompt in prompts]
        flat = [image for group in images for image in group]
        counts = [len(group) for group in images]
        if not flat:
            batch = dict(proc(text=texts, return_tensors="pt", padding=True))
        elif 0 in counts:  # prompts without images: the images go flat, counted per prompt
            batch = dict(proc(images=flat, text=texts, return_tensors="pt", padding=True))
            batch["batch_num_images"] = torch.tensor(counts)
        else:
            batch = dict(self.inputs(proc, images, texts))
        ids = batch["input_ids"]
        batch["input_ids"] = ids.masked_fill(ids == SPECIAL.index("<unk>"), VIDEO)
        clips = [clip for group in videos for clip in group]
        if clips:
            frames = [
                torch.randn(f, 3, CROP, CROP, generator=torch.Generator().manual_seed(seed))
                for f, seed in clips
            ]
            batch["pixel_values_videos"] = torch.stack(frames)
        return batch


class TestOnevision(AnyResSpecifics, VideoConformance):
    tester = OnevisionTester("onevision")


class TestOnevisionShrunk(AnyResSpecifics):
    tester = AnyResTester("onevision-shrunk")


class TestOnevisionHolitom:
    """HoliTom on OneVision's videos: the tower's attention it ranks by is the model's own
    (``output_attentions``), and the pruned call is the unpruned model given the merged
    run, the other placeholders masked out."""

    tester = OnevisionTester("onevision")

    @pytest.fixture(scope="class")
    @classmethod
    def vlm(cls, tmp_path_factory):
        torch.manual_seed(0)
        return cls.tester.load(cls.tester.build(tmp_path_factory.mktemp("onevision-holitom")))

    @pytest.fixture(scope="class")
    @classmethod
    def proc(cls):
        return cls.tester.processor()

    def reference(self, vlm, videos):
        """The unpruned video run and each token's attention received, from the model's
        own attention maps (mean over heads and queries), pooled as the model pools."""
        layer = vlm.config.vision_feature_layer
        with torch.no_grad():
            run = vlm.model.get_video_features(
                videos,
                vision_feature_layer=layer,
                vision_feature_select_strategy=vlm.config.vision_feature_select_strategy,
                return_dict=True,
            ).pooler_output[0]
            tower = vlm.model.vision_tower
            tower.set_attn_implementation("eager")
            try:
                maps = tower(videos.flatten(0, 1), output_attentions=True).attentions
            finally:
                tower.set_attn_implementation("sdpa")
        received = maps[layer].mean(dim=(1, 2))  # [frames, T]
        return run, vlm.model.apply_pooling(received[..., None])[..., 0]

    @pytest.mark.parametrize(("keep", "options"), [(5, {}), (7, {"tau": 0.0}), (12, {})])
    def test_the_pruned_call_is_the_unpruned_model_given_the_merged_run(
        self, vlm, proc, keep, options
    ):
        from transformers.modeling_outputs import BaseModelOutputWithPooling

        from zooprune.select.holitom import holitom_select

        batch = self.tester.video_inputs(proc, [[]], [[(3, 4)]], ["<s> user <video> describe"])
        run, attention = self.reference(vlm, batch["pixel_values_videos"])
        frames, per_frame = 3, POOLED * POOLED
        with zooprune.prune(vlm, "holitom", keep=keep, positions="original", **options) as handle:
            pruned = vlm(**batch).logits
        (video,) = handle.selection.videos
        assert (video.kind, video.num_tokens, video.kept) == ("video", frames * per_frame, keep)
        tokens = run[: frames * per_frame].reshape(frames, per_frame, -1)
        indices, merged, _ = holitom_select(
            tokens, attention.reshape(frames, per_frame), keep, **options
        )
        assert torch.equal(video.indices, indices)
        filled = run.clone()
        filled[indices] = merged
        ids = batch["input_ids"][0]
        slots = (ids == VIDEO).nonzero().flatten()
        mask = batch["attention_mask"].clone()
        mask[0, slots] = 0
        mask[0, slots[indices]] = 1
        mask[0, slots[-1]] = 1  # the closing newline stays
        given = {k: v for k, v in batch.items() if k != "pixel_values_videos"}
        outputs = {"video": BaseModelOutputWithPooling(pooler_output=filled[None])}
        place = torch.arange(ids.shape[0])[None]  # positions="original"
        reference = vlm(
            **given | {"attention_mask": mask, "position_ids": place, "mm_encoder_outputs": outputs}
        ).logits
        torch.testing.assert_close(pruned[0], reference[0, mask[0].bool()], rtol=0, atol=1e-5)

    def test_video_budget_and_images_are_refused_and_the_model_is_untouched(self, vlm, proc):
        with pytest.raises(PruneError, match="it takes no video_budget"):
            zooprune.prune(vlm, "holitom", keep=4, video_budget="global")
        pictures = random_pictures(1, [(36, 36)])
        batch = self.tester.video_inputs(
            proc, [pictures], [[(3, 4)]], ["<s> user <image> <video> describe"]
        )
        with zooprune.prune(vlm, "holitom", keep=4):
            with pytest.raises(PruneError, match="prunes videos only, and this call has images"):
                vlm(**batch)
