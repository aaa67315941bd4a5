"""The adapter conformance suite: every invariant and refusal of a pruned model, written once.

A family's test file defines a small tester (:class:`FamilyTester`: how to build and save
its tiny model, its processor, pictures and prompts, the sequence inputs its uncached loop
needs, its masked reference where it differs) and one class per model class,
``class TestX(AdapterConformance): tester = XTester()``, which inherits every test below.
What a family cannot do is said by the tester's fields (``position_modes``, the cases) and
checked as a refusal, never skipped. The family file then holds only what is its own.

The invariants: keeping every token is a no-op; the pruned forward equals the unpruned
forward with the dropped placeholders masked out; cached generate equals the uncached
loop; a batch equals its prompts one by one (left and right padding); ``remove()``
restores the model. And the contract with the caller: copies and pickles are independent
pruned models, ``max_length`` and streamers see the caller's prompt, a method reference
outlives ``remove()`` correctly, masked placeholders and non-finite features are refused.
"""

from __future__ import annotations

import copy
import pickle
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn
from transformers.generation.streamers import BaseStreamer

import zooprune
from zooprune import METHODS, NonFiniteFeaturesError, PruneError
from zooprune.adapters import adapter_for

#: inputs that run along the sequence (everything else in a batch is an image input)
SEQUENCE_INPUTS = ("input_ids", "attention_mask", "token_type_ids", "mm_token_type_ids")


#: the cases of a family whose images are several crops: each method under each budget split
CROP_CASES = (
    ("zoo", {"crop_budget": "split"}),
    ("divprune", {"crop_budget": "global"}),
    ("grid", {"crop_budget": "split"}),
    ("random", {"crop_budget": "global"}),
    ("cdpruner", {"crop_budget": "split"}),
    ("dart", {"crop_budget": "global"}),
)
CROP_BATCH_CASES = (
    ("zoo", {"crop_budget": "split"}),
    ("pool", {"crop_budget": "global"}),
    ("cdpruner", {"crop_budget": "split"}),
)


class FamilyTester:
    """How to build and drive a tiny model of one family. Subclasses fill it in."""

    #: names the saved model's folder
    name: str
    #: the transformers class :meth:`load` loads the saved model with
    model_class: type
    #: the placeholder token id of one visual token
    image_token: int
    #: tokens greedy generation may not emit (a new placeholder would not match the images)
    banned: tuple[int, ...]
    #: what stands for one image in a prompt
    image_text: str = "<image>"
    #: visual tokens kept by the invariants: at most the N of every test picture
    keep: int = 6
    #: the ``positions=`` modes the family accepts (the others are refused)
    position_modes: tuple[str, ...] = ("compact", "original")
    #: (method, options) whose pruned forward is checked against the masked model (only
    #: methods that keep the model's own tokens: VisionZip with ``contextual=0``)
    pruned_cases: tuple[tuple[str, dict[str, Any]], ...] = (
        ("zoo", {}),
        ("divprune", {}),
        ("random", {}),
        ("grid", {}),
        ("cdpruner", {}),
        ("dart", {}),
    )
    #: (method, options) whose batch is checked against its prompts alone
    batch_cases: tuple[tuple[str, dict[str, Any]], ...] = (
        ("zoo", {}),
        ("pool", {}),
        ("cdpruner", {}),
        ("dart", {}),
    )
    #: (method, options) whose cached generate is checked against the uncached loop
    loop_cases: tuple[tuple[str, dict[str, Any]], ...] = (("zoo", {}),)
    #: options for the sensitivity methods that keep them quick (fewer jvp directions)
    fast: dict[str, Any] = {}
    #: for :class:`UnsplitConformance`: the processor option that leaves an image one
    #: crop, and that crop's token grid
    unsplit: dict[str, Any] = {}
    crop_grid: tuple[int, int] = (0, 0)

    @property
    def prompts(self) -> list[str]:
        image = self.image_text
        return [
            f"<s> user {image} what is in the image ?",
            f"<s> user {image} describe this picture",
            f"<s> user what shape is the red square ? {image} left or right ?",
        ]

    def build(self, path: Path) -> Path:
        """Build the tiny random model, ``save_pretrained`` it to ``path``; return ``path``."""
        raise NotImplementedError

    def load(self, path: Path, **config: Any) -> nn.Module:
        """``model_class.from_pretrained(path, **config)``, in eval mode."""
        return self.model_class.from_pretrained(path, **config).eval()

    def processor(self) -> Any:
        raise NotImplementedError

    def pictures(self) -> list[Any]:
        """Four PIL images of different sizes (different N where the family allows)."""
        raise NotImplementedError

    def inputs(self, proc: Any, per_prompt: list[list[Any]], prompts: list[str]) -> dict:
        """The processor's batch for images grouped by prompt, left padded."""
        return proc(images=per_prompt, text=prompts, return_tensors="pt", padding=True)

    def step_inputs(self, input_ids: torch.Tensor) -> dict[str, torch.Tensor]:
        """Sequence inputs an uncached forward on ``input_ids`` needs besides the ids
        (e.g. Gemma 3's ``token_type_ids``, Qwen2-VL's ``mm_token_type_ids``)."""
        return {}

    def masked_reference(
        self, model: nn.Module, batch: dict, kept: torch.Tensor, positions: torch.Tensor
    ) -> torch.Tensor:
        """Unpruned logits of prompt 0 with its dropped placeholders masked out of attention.

        Args:
            kept: positions in prompt 0 of the kept placeholders (tokens and separators).
            positions: ``[1, L]`` the position ids the pruned model gave the prompt.
        """
        ids = batch["input_ids"]
        mask = batch["attention_mask"].clone()
        mask[placeholders(ids, self)] = 0
        mask[0, kept] = 1
        return model(**batch | {"attention_mask": mask, "position_ids": positions}).logits

    def options_for(self, method: str) -> dict[str, Any]:
        return dict(self.fast) if "num_directions" in METHODS[method].options else {}

    # -- for the vLLM parity suite (tests/integrations/vllm_parity.py), where opted in ----

    #: the dtype both engines run the family in on a CPU
    vllm_dtype: str = "float32"
    #: a picture size whose N the family prunes (every served method is run on one)
    vllm_picture_size: tuple[int, int] = (44, 52)
    #: how far the engines' first-step log-probabilities may part (None: the dtype's
    #: default, ``vllm_parity.LOGPROBS``); a family whose towers differ sets it, saying why
    vllm_logprob_tolerance: float | None = None
    #: served (method, options) cases that rank the family's tokens by float rounding alone,
    #: with the reason: two engines' roundings differ, so only the kept count is compared
    vllm_rounding_ranked: dict[tuple[str, str], str] = {}
    #: where stock vLLM gives each image of a several-image prompt what the image gets
    #: alone and transformers does not, the reason: the two-image check then compares each
    #: image with the HF handle's one-image prompt (kept tokens and placeholders)
    vllm_images_alone: str = ""
    #: why the two stock engines place the text after a video at other M-RoPE positions
    #: ("" where they agree): the video parity suite compares that text up to a shift
    vllm_text_after_video: str = ""

    def vllm_build(self, path: Path) -> Path:
        """Save a tiny model vLLM's CPU build can run (head dim >= 32) with its processor."""
        raise NotImplementedError

    @property
    def vllm_architecture(self) -> str:
        return self.model_class.__name__

    @property
    def vllm_prompt(self) -> str:
        """One image, text after it (its positions follow the image's)."""
        return self.prompts[0]

    @property
    def vllm_two_images_prompt(self) -> str:
        return f"{self.prompts[1]} {self.image_text} and this ?"

    # -- for the video parity suite (vllm_parity.VllmVideoParity), video testers only ------

    #: how many of a video's kept separators are placeholders (OneVision's newline)
    vllm_video_separators: int = 0

    @property
    def vllm_video_prompt(self) -> str:
        """One video (``video_text``), text after it."""
        return f"<s> user {self.video_text} what is in the image ?"

    @property
    def vllm_image_and_video_prompt(self) -> str:
        return f"<s> user {self.image_text} and {self.video_text} describe this picture"

    def vllm_hf_processor(self, path: Path) -> Any:
        """The processor the HF reference uses for the model ``vllm_build`` saved."""
        from transformers import AutoProcessor

        return AutoProcessor.from_pretrained(path)

    def vllm_hf_inputs(self, batch: dict) -> dict:
        """The HF reference's inputs from the processor's, where the two engines' language
        models differ in a way that is not pruning's (the default changes nothing)."""
        return batch

    def vllm_served_prompt(self, pruned: list[int]) -> list[int]:
        """The prompt vLLM runs, from the HF handle's pruned ``input_ids`` (the default:
        the same)."""
        return pruned

    def vllm_separator_slots(self, separators: int) -> int:
        """How many of an image's kept separators are placeholders (not text)."""
        return separators

    def vllm_projector_width(self, model: nn.Module) -> int:
        """The width of the scored projector's input."""
        first = next(adapter_for(model).projector(model).parameters())
        return first.shape[-1]


def random_pictures(seed: int, shapes: list[tuple[int, int]]) -> list[Any]:
    """Noise images of the given (height, width), reproducible from ``seed``."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (*s, 3), dtype=np.uint8)) for s in shapes]


def placeholders(ids: torch.Tensor, tester: FamilyTester) -> torch.Tensor:
    """Where the image (and video) placeholders of ``ids`` are."""
    found = ids == tester.image_token
    video = getattr(tester, "video_token", None)
    return found if video is None else found | (ids == video)


def untouched(model: nn.Module) -> bool:
    return not {"forward", "generate", "_zooprune_handle"} & set(model.__dict__)


def image_inputs(batch: dict) -> dict:
    return {k: v for k, v in batch.items() if k not in SEQUENCE_INPUTS}


def kept_positions(selection: zooprune.ImageSelection) -> torch.Tensor:
    """Where the kept placeholders (tokens and separators) of an image stood."""
    return torch.cat([selection.positions, selection.separators]).sort().values


def without_video_processor(processor_class: type) -> type:
    """``processor_class`` accepting no video processor (the real ones need torchvision)."""

    class NoVideo(processor_class):
        def check_argument_for_proper_class(self, name: str, arg: Any) -> Any:
            if name == "video_processor" and arg is None:
                return None
            return super().check_argument_for_proper_class(name, arg)

    NoVideo.__name__ = NoVideo.__qualname__ = f"{processor_class.__name__}NoVideo"
    return NoVideo


def greedy(
    model: nn.Module, tester: FamilyTester, batch: dict, steps: int = 5, **options: Any
) -> Any:
    """``model.generate``: ``steps`` greedy tokens, the tester's banned tokens suppressed."""
    return model.generate(
        **batch,
        max_new_tokens=steps,
        do_sample=False,
        suppress_tokens=list(tester.banned),
        **options,
    )


def uncached_greedy(
    model: nn.Module, tester: FamilyTester, batch: dict, steps: int
) -> torch.Tensor:
    """What :func:`greedy` must give, by hand: ``steps`` forwards without a cache, each on
    the whole grown sequence with the batch's image inputs, banned tokens never chosen."""
    ids = batch["input_ids"]
    for _ in range(steps):
        logits = model(
            input_ids=ids, **image_inputs(batch), **tester.step_inputs(ids), use_cache=False
        ).logits
        logits[..., list(tester.banned)] = float("-inf")
        ids = torch.cat([ids, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    return ids


class Recorder(BaseStreamer):
    """A streamer that keeps what it is given."""

    def __init__(self) -> None:
        self.values: list[torch.Tensor] = []
        self.ended = False

    def put(self, value: torch.Tensor) -> None:
        self.values.append(value.clone())

    def end(self) -> None:
        self.ended = True


class AdapterConformance:
    """Every invariant of a pruned model; a family's ``TestX`` sets ``tester``."""

    tester: FamilyTester

    @pytest.fixture(scope="class")
    @classmethod
    def saved(cls, tmp_path_factory: pytest.TempPathFactory) -> Path:
        torch.manual_seed(0)
        return cls.tester.build(tmp_path_factory.mktemp(cls.tester.name))

    @pytest.fixture
    def vlm(self, saved: Path) -> nn.Module:
        return self.tester.load(saved)

    @pytest.fixture(scope="class")
    @classmethod
    def proc(cls) -> Any:
        return cls.tester.processor()

    @pytest.fixture(scope="class")
    @classmethod
    def pictures(cls) -> list[Any]:
        return cls.tester.pictures()

    def batch(self, proc: Any, pictures: list, *prompt_rows: int) -> dict:
        """One image per prompt: picture i with prompt i for each given row."""
        t = self.tester
        return t.inputs(
            proc, [pictures[r : r + 1] for r in prompt_rows], [t.prompts[r] for r in prompt_rows]
        )

    def greedy(self, model: nn.Module, batch: dict, steps: int = 5, **options: Any) -> Any:
        return greedy(model, self.tester, batch, steps, **options)

    # -- the invariants -----------------------------------------------------------------

    @pytest.mark.parametrize("method", sorted(METHODS))
    def test_keep_all_tokens_is_a_noop(self, vlm, proc, pictures, method):
        provided = adapter_for(vlm).available(vlm)
        if not METHODS[method].needs <= provided:
            # What the family cannot serve is refused, naming what it can.
            with pytest.raises(PruneError, match="methods that apply: ") as error:
                zooprune.prune(vlm, method, ratio=1.0)
            usable = str(error.value).split("methods that apply: ")[1].split(", ")
            assert usable == sorted(m for m, s in METHODS.items() if s.needs <= provided)
            assert untouched(vlm)
            return
        batch = self.batch(proc, pictures, 0, 1)
        if METHODS[method].videos_only:  # images refused before the tower runs, named
            projected = []
            projector = adapter_for(vlm).projector(vlm)
            with zooprune.prune(vlm, method, ratio=1.0) as handle:
                hook = projector.register_forward_hook(lambda *args: projected.append(1))
                try:
                    with pytest.raises(PruneError, match="prunes videos only, and this call"):
                        vlm(**batch)
                finally:
                    hook.remove()
            assert not projected and handle.selection is None and untouched(vlm)
            return
        tokens = self.greedy(vlm, batch)
        logits = vlm(**batch).logits
        options = self.tester.options_for(method)
        with zooprune.prune(vlm, method, ratio=1.0, **options) as handle:  # K = N of each image
            # VisionZip projects its (here one-token) merges again in float32: rounding only.
            atol = 1e-4 if method == "visionzip" else 1e-5
            torch.testing.assert_close(vlm(**batch).logits, logits, rtol=0, atol=atol)
            if method != "visionzip":
                assert torch.equal(self.greedy(vlm, batch), tokens)
        assert [s.kept for s in handle.selection.images] == [
            s.num_tokens for s in handle.selection.images
        ]

    def test_pruned_forward_equals_masked_unpruned(
        self, vlm, proc, pictures, pruned_case, positions
    ):
        method, options = pruned_case
        t = self.tester
        batch = t.inputs(proc, [pictures[:1]], t.prompts[2:3])
        options = t.options_for(method) | options
        with zooprune.prune(vlm, method, keep=t.keep, positions=positions, **options) as handle:
            pruned = vlm(**batch).logits
            kept = kept_positions(handle.selection.images[0])
        ids = batch["input_ids"]
        keep = ids[0] != t.image_token
        keep[kept] = True
        place = torch.arange(ids.shape[1])
        if positions == "compact":
            place = place - (~keep).long().cumsum(0)
        reference = t.masked_reference(vlm, batch, kept, place[None])
        assert handle.selection.kept == t.keep
        assert pruned.shape[1] == int(keep.sum()) < ids.shape[1]
        torch.testing.assert_close(pruned[0], reference[0, keep], rtol=0, atol=1e-5)

    def test_ratio_counts_the_visual_tokens_not_the_slots(self, vlm, proc, pictures):
        # N is each image's placeholders in the prompt less its separators (LLaVA-NeXT's
        # newlines are placeholders too; Mistral 3's breaks are text): ratio=r keeps
        # int(r * N) of them, as the authors round, whatever the separators add.
        t = self.tester
        batch = self.batch(proc, pictures, 0, 1)
        ids = batch["input_ids"]

        def separator_slots(image: zooprune.ImageSelection) -> int:
            """The image's separators that are placeholders of the prompt."""
            if image.separators is None:
                return 0
            return int((ids[image.prompt, image.separators] == t.image_token).sum())

        with zooprune.prune(vlm, "grid", ratio=1.0) as handle:
            vlm(**batch)
        images = handle.selection.images
        assert [image.prompt for image in images] == [0, 1]
        separators = [separator_slots(image) for image in images]
        counts = [int((ids[row] == t.image_token).sum()) - separators[row] for row in (0, 1)]
        ratio = 0.3
        with zooprune.prune(vlm, "zoo", ratio=ratio, **t.fast) as handle:
            logits = vlm(**batch).logits
        kept = [int(ratio * n) for n in counts]
        images = handle.selection.images
        assert [image.num_tokens for image in images] == counts
        assert [image.kept for image in images] == kept
        assert 0 < min(kept) and all(k < n for k, n in zip(kept, counts, strict=True))
        # Each prompt loses its dropped tokens and separators; rows are padded to the longest.
        lengths = [
            ids.shape[1] - (counts[row] - kept[row]) - (separators[row] - separator_slots(image))
            for row, image in enumerate(images)
        ]
        assert logits.shape[1] == max(lengths)

    def test_generate_with_cache_equals_no_cache_loop(
        self, vlm, proc, pictures, positions, loop_case
    ):
        method, options = loop_case
        t = self.tester
        batch = t.inputs(proc, [pictures[3:4]], t.prompts[:1])
        options = t.options_for(method) | options
        with zooprune.prune(vlm, method, keep=t.keep, positions=positions, **options):
            generated = self.greedy(vlm, batch, steps=6)
            assert torch.equal(generated, uncached_greedy(vlm, t, batch, steps=6))

    def test_batch_equals_each_prompt_alone(self, vlm, proc, pictures, batch_case):
        # Left padding, prompts of different lengths, images of different sizes and a
        # prompt with two images: the pruned prompts lose different numbers of tokens.
        method, options = batch_case
        t = self.tester
        prompts = [t.prompts[0], f"{t.prompts[1]} {t.image_text} and this ?", t.prompts[2]]
        per_prompt = [pictures[:1], pictures[1:3], pictures[3:4]]
        batch = t.inputs(proc, per_prompt, prompts)
        assert bool((batch["attention_mask"][:, 0] == 0).any())
        scored = {"output_scores": True, "return_dict_in_generate": True}
        options = t.options_for(method) | options
        with zooprune.prune(vlm, method, keep=t.keep, **options) as handle:
            together = self.greedy(vlm, batch, steps=4, **scored)
            assert [s.prompt for s in handle.selection.images] == [0, 1, 1, 2]
            for row, (prompt, group) in enumerate(zip(prompts, per_prompt, strict=True)):
                alone = self.greedy(vlm, t.inputs(proc, [group], [prompt]), steps=4, **scored)
                assert torch.equal(together.sequences[row, -4:], alone.sequences[0, -4:])
                torch.testing.assert_close(
                    together.scores[0][row], alone.scores[0][0], rtol=0, atol=1e-4
                )

    def test_right_padded_forward_equals_each_prompt_alone(self, vlm, proc, pictures):
        t = self.tester
        proc.tokenizer.padding_side = "right"
        try:
            batch = self.batch(proc, pictures, 0, 2)
        finally:
            proc.tokenizer.padding_side = "left"
        assert bool((batch["attention_mask"][:, -1] == 0).any())
        with zooprune.prune(vlm, "zoo", keep=t.keep, **t.fast):
            together = vlm(**batch).logits
            for row, prompt in enumerate((0, 2)):
                alone = vlm(**self.batch(proc, pictures, prompt)).logits[0]
                real = together[row, : alone.shape[0]]  # right padding: real tokens first
                torch.testing.assert_close(real, alone, rtol=0, atol=1e-4)

    def test_remove_restores_the_model_exactly(self, vlm, proc, pictures, saved):
        t = self.tester
        batch = self.batch(proc, pictures, 0)
        before = vlm(**batch).logits
        attributes = dict(vlm.__dict__)
        adapter = adapter_for(vlm)
        state = adapter.save_state(vlm)
        handle = zooprune.prune(vlm, "zoo", keep=t.keep, **t.fast)
        assert vlm(**batch).logits.shape[1] < before.shape[1]
        handle.remove()
        handle.remove()  # harmless twice
        assert vlm.__dict__.keys() == attributes.keys()
        assert all(vlm.__dict__[k] is v for k, v in attributes.items())
        after = adapter.save_state(vlm)  # what pruned calls rewrote (Qwen's rope_deltas)
        assert after.keys() == state.keys() and all(after[k] is v for k, v in state.items())
        assert vlm.forward.__func__ is type(vlm).forward
        assert torch.equal(vlm(**batch).logits, before)
        assert torch.equal(self.greedy(vlm, batch), self.greedy(t.load(saved), batch))
        zooprune.prune(vlm, "grid", keep=3).remove()  # can be pruned again after removal

    def test_two_models_do_not_interfere(self, vlm, proc, pictures, saved):
        t = self.tester
        other = t.load(saved)
        batch = self.batch(proc, pictures, 0)
        reference = other(**batch).logits
        first = zooprune.prune(vlm, "grid", keep=t.keep)
        second = zooprune.prune(other, "random", ratio=1.0)  # keeps everything: stays exact
        assert vlm(**batch).logits.shape[1] < reference.shape[1]
        assert torch.equal(other(**batch).logits, reference)
        first.remove()
        assert torch.equal(other(**batch).logits, reference)
        assert first.selection.kept == t.keep
        second.remove()

    def test_prepare_gives_the_pruned_arguments(self, vlm, proc, pictures):
        t = self.tester
        batch = self.batch(proc, pictures, 0, 1)
        with zooprune.prune(vlm, "grid", keep=t.keep) as handle:
            expected = vlm(**batch).logits
            prepared = handle.prepare(dict(batch), for_generate=False)
            assert not set(image_inputs(batch)) & set(prepared)
            assert "mm_encoder_outputs" in prepared
            assert ((prepared["input_ids"] == t.image_token).sum(-1) >= t.keep).all()
        torch.testing.assert_close(vlm(**prepared).logits, expected, rtol=0, atol=0)

    def test_gradients_reach_the_projector_through_kept_tokens(self, vlm, proc, pictures):
        t = self.tester
        batch = self.batch(proc, pictures, 0)
        with zooprune.prune(vlm, "zoo", keep=t.keep, **t.fast):
            vlm(**batch, labels=batch["input_ids"]).loss.backward()
        projector = adapter_for(vlm).projector(vlm)
        assert any(bool(p.grad.abs().sum() > 0) for p in projector.parameters())

    # -- the contract with the caller ---------------------------------------------------

    def test_deepcopy_gives_an_independent_pruned_copy(self, vlm, proc, pictures):
        t = self.tester
        batch = self.batch(proc, pictures, 0)
        full = vlm(**batch).logits.shape[1]
        handle = zooprune.prune(vlm, "grid", keep=t.keep)
        pruned = vlm(**batch).logits
        twin = copy.deepcopy(vlm)
        copied = zooprune.handle_of(twin)
        assert copied is not None and copied is not handle and copied.model is twin
        assert torch.equal(twin(**batch).logits, pruned)
        # The copy runs on its own weights.
        with torch.no_grad():
            twin.get_output_embeddings().weight.mul_(2)
        edited = twin(**batch).logits
        assert edited.shape == pruned.shape and not torch.allclose(edited, pruned)
        assert torch.equal(vlm(**batch).logits, pruned)
        # Removing one handle leaves the other model pruned.
        handle.remove()
        assert vlm(**batch).logits.shape[1] == full
        assert twin(**batch).logits.shape[1] == pruned.shape[1]
        copied.remove()
        assert twin(**batch).logits.shape[1] == full and untouched(twin)

    def test_a_pruned_model_pickles_as_the_unpruned_one_does(self, vlm, proc, pictures, saved):
        t = self.tester
        batch = self.batch(proc, pictures, 0)
        handle = zooprune.prune(vlm, "grid", keep=t.keep)
        restored = pickle.loads(pickle.dumps(vlm))  # before any call, as a loaded model
        own = zooprune.handle_of(restored)
        assert own is not None and own is not handle and own.model is restored
        pruned = vlm(**batch).logits
        assert torch.equal(restored(**batch).logits, pruned)
        assert own.selection.kept == t.keep
        own.remove()
        assert restored(**batch).logits.shape[1] > pruned.shape[1] and untouched(restored)
        # After a call, exactly when the unpruned model in the same state pickles.
        unpruned = t.load(saved)
        unpruned(**batch)
        for model in (unpruned, vlm):
            try:
                pickle.dumps(model)
                outcome = None
            except Exception as error:  # noqa: BLE001 (whatever the unpruned model raises)
                outcome = type(error)
            if model is unpruned:
                expected = outcome
        assert outcome == expected
        handle.remove()

    def test_max_length_counts_the_callers_prompt(self, vlm, proc, pictures):
        t = self.tester
        batch = self.batch(proc, pictures, 0)
        length = batch["input_ids"].shape[1]
        suppress = {"suppress_tokens": list(t.banned), "do_sample": False}
        with pytest.raises(ValueError, match="max_length"):  # unpruned refuses it: so must we
            vlm.generate(**batch, max_length=length - 1, **suppress)
        with zooprune.prune(vlm, "grid", keep=t.keep):
            with pytest.raises(ValueError, match="max_length"):
                vlm.generate(**batch, max_length=length - 1, **suppress)
            out = vlm.generate(**batch, max_length=length + 3, min_length=length + 3, **suppress)
        assert out.shape[1] == length + 3

    def test_a_streamer_receives_the_callers_prompt(self, vlm, proc, pictures):
        t = self.tester
        batch = self.batch(proc, pictures, 0)
        unpruned, streamed = Recorder(), Recorder()
        self.greedy(vlm, batch, steps=3, streamer=unpruned)
        with zooprune.prune(vlm, "grid", keep=t.keep):
            out = self.greedy(vlm, batch, steps=3, streamer=streamed)
        assert torch.equal(streamed.values[0], unpruned.values[0])
        assert torch.equal(streamed.values[0], batch["input_ids"])
        new = torch.cat([v.flatten() for v in streamed.values[1:]])
        assert torch.equal(new, out[0, batch["input_ids"].shape[1] :]) and streamed.ended

    def test_a_method_taken_while_pruned_follows_the_model_after_remove(self, vlm, proc, pictures):
        t = self.tester
        batch = self.batch(proc, pictures, 0)
        unpruned = self.greedy(vlm, batch)
        full = vlm(**batch).logits.shape[1]
        handle = zooprune.prune(vlm, "grid", keep=t.keep)
        generate, forward = vlm.generate, vlm.forward
        assert forward(**batch).logits.shape[1] < full
        handle.remove()
        assert torch.equal(
            generate(**batch, max_new_tokens=5, do_sample=False, suppress_tokens=list(t.banned)),
            unpruned,
        )
        assert forward(**batch).logits.shape[1] == full
        with pytest.raises(PruneError, match="removed"):
            handle.prepare(dict(batch))

    def test_placeholders_masked_out_are_refused(self, vlm, proc, pictures):
        t = self.tester
        batch = self.batch(proc, pictures, 0)
        mask = batch["attention_mask"].clone()
        mask[0, int((batch["input_ids"][0] == t.image_token).nonzero()[1])] = 0
        with zooprune.prune(vlm, "grid", keep=t.keep) as handle:
            with pytest.raises(PruneError, match="masked out by attention_mask"):
                vlm(**batch | {"attention_mask": mask})
            assert handle.selection is None
            assert vlm(**batch).logits.shape[1] < batch["input_ids"].shape[1]

    def test_non_finite_features_are_refused(self, vlm, proc, pictures):
        batch = self.batch(proc, pictures, 0)
        batch["pixel_values"] = batch["pixel_values"].clone()
        batch["pixel_values"][0] = float("nan")
        with zooprune.prune(vlm, "zoo", keep=self.tester.keep, **self.tester.fast):
            with pytest.raises(NonFiniteFeaturesError, match="image 0"):
                vlm(**batch)

    def test_bad_positions_and_layout_options_are_refused(self, vlm):
        adapter = adapter_for(vlm)
        assert adapter.position_modes == self.tester.position_modes
        for mode in ("compact", "original", "middle"):
            if mode not in adapter.position_modes:
                with pytest.raises(PruneError, match="positions must be"):
                    zooprune.prune(vlm, "zoo", keep=4, positions=mode)
        for name, bad in (
            ("crop_budget", "per-row"),
            ("separators", "none"),
            ("video_budget", "per-second"),
        ):
            message = (
                f"{name} must be one of"
                if name in adapter.options
                else f"{name} is a layout option this model's family does not take"
            )
            with pytest.raises(PruneError, match=message):
                zooprune.prune(vlm, "zoo", keep=4, **{name: bad})
        assert untouched(vlm)
        for mode in adapter.position_modes:
            zooprune.prune(vlm, "zoo", keep=4, positions=mode).remove()


class UnsplitConformance:
    """For families whose processor can leave an image unsplit: it is then one crop, and
    prunes as a single-crop model does (``tester.unsplit``, ``tester.crop_grid``)."""

    @pytest.mark.parametrize("method", ["zoo", "grid"])
    def test_unsplit_images_prune_like_single_crop_models(self, vlm, proc, pictures, method):
        t = self.tester
        # Two images share a prompt, each one crop.
        batch = proc(
            images=[pictures[:2]],
            text=[f"{t.prompts[1]} {t.image_text} and this ?"],
            return_tensors="pt",
            **t.unsplit,
        )
        with zooprune.prune(vlm, method, keep=5, positions="original") as handle:
            pruned = vlm(**batch).logits
        images = handle.selection.images
        n = t.crop_grid[0] * t.crop_grid[1]
        assert [(s.num_tokens, s.kept, s.grid) for s in images] == [(n, 5, t.crop_grid)] * 2
        assert all(bool((s.crops == 0).all()) for s in images)
        kept = torch.cat([s.positions for s in images])
        keep = batch["input_ids"][0] != t.image_token
        keep[kept] = True
        place = torch.arange(batch["input_ids"].shape[1])[None]
        reference = t.masked_reference(vlm, batch, kept, place)
        torch.testing.assert_close(pruned[0], reference[0, keep], rtol=0, atol=1e-5)


class JvpEstimatorConformance:
    """For families whose projector is more than a GELU MLP (a norm in front): ``auto``
    runs ``jvp``, ``zo`` agrees with it on the same directions, and the estimators that
    assume a GELU MLP (``exact``, ``lowrank``) are refused by ``prune()``, naming the ones
    that apply."""

    def test_estimators_jvp_and_zo_run_and_the_mlp_only_ones_are_refused(self, vlm, proc, pictures):
        batch = self.batch(proc, pictures, 0)
        with zooprune.prune(vlm, "zoo", keep=5, num_directions=8) as handle:
            vlm(**batch)
        assert handle.selection.details["estimator"] == "jvp"  # auto: a norm before the MLP
        jvp = handle.selection.scores[0]
        assert bool((jvp > 0).all())
        with zooprune.prune(vlm, "zoo", keep=5, num_directions=8, estimator="zo") as handle:
            vlm(**batch)
        # The same bank of directions: central differences agree with the derivatives.
        torch.testing.assert_close(handle.selection.scores[0], jvp, rtol=1e-2, atol=1e-4)
        # Refused by prune(), before any image (a server refuses at start, not at a
        # request), and the model is left unpruned.
        for estimator in ("exact", "lowrank"):
            with pytest.raises(PruneError, match="use 'jvp' or 'zo'"):
                zooprune.prune(vlm, "zoo", keep=5, estimator=estimator)
            assert zooprune.handle_of(vlm) is None


class VideoConformance:
    """For families that prune videos: a video is one item of N = all its frames' tokens,
    its budget shared per frame (``video_budget="frame"``) or over the whole video, its
    kept tokens keeping their places; images and videos share calls and prompts.

    The tester adds ``video_token``, ``video_text`` (what stands for one video in a
    prompt), ``videos`` (specs of two videos, of different lengths where the family
    allows, in the tester's own format), ``frames_of(spec)``, ``tokens_per_frame(spec)``
    and ``video_inputs(proc, images_per_prompt, videos_per_prompt, prompts)``.
    """

    tester: FamilyTester

    def video_batch(self, proc: Any, pictures: list, rows: list[tuple[int, list[int]]]) -> dict:
        """One prompt per row ``(picture index or -1, [video indices])``: the picture's
        image first (if any), then the videos."""
        t = self.tester
        prompts, images, videos = [], [], []
        for picture, chosen in rows:
            image = f"{t.image_text} " if picture >= 0 else ""
            clips = " and ".join(t.video_text for _ in chosen)
            prompts.append(f"<s> user {image}{clips} describe")
            images.append([pictures[picture]] if picture >= 0 else [])
            videos.append([t.videos[v] for v in chosen])
        return t.video_inputs(proc, images, videos, prompts)

    def reference(self, vlm, batch, kept: torch.Tensor) -> torch.Tensor:
        """Prompt 0's real kept tokens' logits from the unpruned model with its dropped
        placeholders masked out; ``kept``: where its kept placeholders stand."""
        t = self.tester
        ids, real = batch["input_ids"], batch["attention_mask"][0].bool()
        keep = ~placeholders(ids[0], t) & real
        keep[kept] = True
        place = (batch["attention_mask"][:1].cumsum(-1) - 1).clamp(min=0)
        return t.masked_reference(vlm, batch, kept, place)[0, keep]

    def test_keeping_every_video_token_is_a_noop(self, vlm, proc, pictures):
        batch = self.video_batch(proc, pictures, [(-1, [0])])
        logits = vlm(**batch).logits
        with zooprune.prune(vlm, "zoo", ratio=1.0, **self.tester.fast) as handle:
            torch.testing.assert_close(vlm(**batch).logits, logits, rtol=0, atol=1e-5)
        (video,) = handle.selection.images
        assert video.kind == "video" and video.kept == video.num_tokens
        assert handle.selection.videos == [video]

    @pytest.mark.parametrize("video_budget", ["frame", "global"])
    @pytest.mark.parametrize("method", ["zoo", "divprune", "grid"])
    def test_pruned_video_equals_masked_unpruned(self, vlm, proc, pictures, method, video_budget):
        t = self.tester
        spec = t.videos[0]
        frames, per_frame = t.frames_of(spec), t.tokens_per_frame(spec)
        keep = 2 * frames + 1  # not a multiple of the frames: the remainder goes first
        batch = self.video_batch(proc, pictures, [(-1, [0])])
        options = t.options_for(method) | {"video_budget": video_budget}
        with zooprune.prune(vlm, method, keep=keep, positions="original", **options) as handle:
            pruned = vlm(**batch).logits
        (video,) = handle.selection.images
        assert (video.kind, video.image, video.num_tokens) == ("video", 0, frames * per_frame)
        assert video.kept == keep and video.patch_grids == (video.patch_grids[0],) * frames
        counts = torch.bincount(video.crops, minlength=frames).tolist()
        if video_budget == "frame":
            assert counts == [3] + [2] * (frames - 1)
        assert torch.equal(video.indices // per_frame, video.crops)  # frame-major order
        in_frame = video.indices % per_frame
        width = video.patch_grids[0][1]
        assert torch.equal(video.cells, torch.stack([in_frame // width, in_frame % width], -1))
        reference = self.reference(vlm, batch, kept_positions(video))
        assert pruned.shape[1] == reference.shape[0] < batch["input_ids"].shape[1]
        torch.testing.assert_close(pruned[0], reference, rtol=0, atol=1e-5)

    def test_images_and_videos_share_a_call_and_a_prompt(self, vlm, proc, pictures):
        t = self.tester
        rows = [(0, [1]), (-1, [0])]
        batch = self.video_batch(proc, pictures, rows)
        with zooprune.prune(vlm, "zoo", keep=t.keep, positions="original", **t.fast) as handle:
            pruned = vlm(**batch).logits
        items = handle.selection.images
        assert [(s.kind, s.image, s.prompt) for s in items] == [
            ("image", 0, 0),
            ("video", 0, 0),
            ("video", 1, 1),
        ]
        assert [s.kept for s in items] == [t.keep] * 3
        kept = torch.cat([kept_positions(s) for s in items[:2]])
        reference = self.reference(vlm, batch, kept)
        torch.testing.assert_close(pruned[0, -reference.shape[0] :], reference, rtol=0, atol=1e-5)
        # Prompt 1, a video alone beside an image: the masked reference reads prompt 0, so
        # it runs on the same prompts in swapped rows (each keeps its padding and places).
        swapped = self.video_batch(proc, pictures, rows[::-1])
        assert torch.equal(swapped["input_ids"][0], batch["input_ids"][1])
        reference = self.reference(vlm, swapped, kept_positions(items[2]))
        torch.testing.assert_close(pruned[1, -reference.shape[0] :], reference, rtol=0, atol=1e-5)

    def test_generate_with_video_and_cache_equals_no_cache_loop(self, vlm, proc, pictures):
        t = self.tester
        batch = self.video_batch(proc, pictures, [(2, [1])])
        with zooprune.prune(vlm, "zoo", keep=t.keep, positions="original", **t.fast):
            generated = greedy(vlm, t, batch, steps=5)
            assert torch.equal(generated, uncached_greedy(vlm, t, batch, steps=5))

    def test_video_batch_equals_each_prompt_alone(self, vlm, proc, pictures):
        t = self.tester
        rows = [(-1, [0]), (1, [1])]
        batch = self.video_batch(proc, pictures, rows)
        assert bool((batch["attention_mask"][:, 0] == 0).any())
        scored = {"output_scores": True, "return_dict_in_generate": True}
        with zooprune.prune(vlm, "divprune", keep=t.keep, video_budget="global") as handle:
            together = greedy(vlm, t, batch, steps=3, **scored)
            assert [s.prompt for s in handle.selection.images] == [1, 0, 1]
            for row, spec in enumerate(rows):
                alone = greedy(vlm, t, self.video_batch(proc, pictures, [spec]), steps=3, **scored)
                assert torch.equal(together.sequences[row, -3:], alone.sequences[0, -3:])
                torch.testing.assert_close(
                    together.scores[0][row], alone.scores[0][0], rtol=0, atol=1e-4
                )
