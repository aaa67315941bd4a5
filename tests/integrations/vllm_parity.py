"""The vLLM parity suite: a family's pruned vLLM variant keeps, image for image, the tokens
the Hugging Face handle keeps, and generates what it generates.

It is driven by the family's own :class:`~tests.adapters.conformance.FamilyTester` (the
HF suite's), which opts in with two more things: ``vllm_build(path)`` saves a tiny model of
the family that vLLM's CPU build can run (head dim >= 32) with its real processor, and
``vllm_prompt`` (one image, text after it). ``class TestXOnVllm(VllmParity): tester =
XTester()`` then runs every check below on one engine, started once for the class.

The checks: three pictures of different sizes one by one (K placeholders each, plus the
family's separators; the prompt vLLM runs is the HF handle's pruned one; the kept indices
and the greedy tokens equal the HF handle's, up to the first step where the HF model's two
best tokens tie at its dtype's precision; the first step's top-3 logprobs agree), two
images in one prompt, a batch with the first picture again (vLLM's encoder cache serves
it), every method vLLM serves, and the scored projector (the HF adapter's, to 1e-5).
A tester's ``vllm_rounding_ranked`` names the served cases that rank its tokens by float
rounding alone (with the reason): for those only the kept count is compared.
"""

from __future__ import annotations

import gc
import os
import zlib
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import torch

import zooprune
import zooprune.integrations.vllm as zv
from tests.adapters.conformance import FamilyTester, random_pictures
from zooprune import PruneError
from zooprune.adapters import adapter_for
from zooprune.integrations.vllm.selection import check_settings
from zooprune.integrations.vllm.video_throughput import random_video
from zooprune.pipeline import VIDEO_BUDGETS
from zooprune.select.methods import MLP_ESTIMATORS
from zooprune.select.mlp import as_mlp

KEEP = 5
STEPS = 4
#: every method vLLM serves, with options that keep the HF side quick
SERVED = [
    ("zoo", {"estimator": "exact"}),
    ("zoo", {"estimator": "jvp", "num_directions": 8}),
    ("zoo", {"estimator": "zo", "num_directions": 8}),
    ("zoo-sum", {"num_directions": 8}),
    ("sensitivity", {"num_directions": 8}),
    ("divprune", {}),
    ("random", {"seed": 3}),
    ("grid", {}),
    ("pool", {}),
    ("dart", {}),
]


#: the per-request settings checked, by name: the HF method and budget, and (in OWN) what
#: a request to a server started with keep=KEEP sends for them (None: nothing)
PER_REQUEST = [
    ("server's", "zoo", {"keep": KEEP}),
    ("keep 3", "zoo", {"keep": 3}),
    ("grid keep 7", "grid", {"keep": 7}),
    ("unpruned", "zoo", {"ratio": 1.0}),
]
OWN = {
    "server's": None,
    "keep 3": {"keep": 3},
    "grid keep 7": {"method": "grid", "keep": 7},
    "unpruned": {"ratio": 1.0},
}


#: a top-2 logit gap below this (relative to the logit's size) is a tie at the dtype's
#: precision: two engines that round differently may take either token there
TIES = {"float32": 1e-5, "bfloat16": 2.0**-6}
#: how far the two engines' first-step log-probabilities may part at the dtype's precision
#: (a wrong embedding anywhere in the prompt moves them by far more)
LOGPROBS = {"float32": 1e-3, "bfloat16": 5e-2}
#: the first step's best tokens whose log-probabilities are compared
TOP = 3


class Greedy(list):
    """The HF reference's greedy tokens, with each step's two best tokens and their gap,
    and the first step's log-probabilities (of the raw logits, as vLLM reports them)."""

    def __init__(self, tokens: list[int], scores: tuple, logits: tuple, tester: FamilyTester):
        super().__init__(tokens)
        dtype = tester.vllm_dtype
        self.tolerance = tester.vllm_logprob_tolerance or LOGPROBS[dtype]
        self.steps = []
        for score in scores:
            top = score[0].float().topk(2)
            gap = float(top.values[0] - top.values[1])
            self.steps.append(
                (top.indices.tolist(), gap < TIES[dtype] * max(1.0, abs(float(top.values[0]))))
            )
        self.first_logprobs = logits[0][0].float().log_softmax(-1)

    def agrees_with(self, output: Any) -> bool:
        """vLLM's ``output`` (a ``CompletionOutput``) takes the same token at every step
        up to the first tie, and one of the two tied tokens there (after it, the
        continuations may part); its first step's log-probabilities of its best tokens
        are the reference's."""
        served = output.logprobs[0]
        for token, logprob in list(served.items())[:TOP]:
            if abs(logprob.logprob - float(self.first_logprobs[token])) > self.tolerance:
                return False
        for token, mine, (best, tied) in zip(output.token_ids, self, self.steps, strict=True):
            if tied:
                return token in best
            if token != mine:
                return False
        return True


def greedy_tokens(model: Any, processor: Any, prompt: str, pictures: list, tester: FamilyTester):
    batch = processor(images=[pictures], text=[prompt], return_tensors="pt")
    return greedy(model, batch, tester)


def greedy(model: Any, batch: dict, tester: FamilyTester) -> tuple[Greedy, dict]:
    """The HF model's greedy tokens on a processor's ``batch``, and the batch it ran."""
    batch = tester.vllm_hf_inputs(batch)
    dtype = next(model.parameters()).dtype
    batch = {k: v.to(dtype) if v.is_floating_point() else v for k, v in batch.items()}
    out = model.generate(
        **batch,
        max_new_tokens=STEPS,
        do_sample=False,
        suppress_tokens=list(tester.banned),
        output_scores=True,
        output_logits=True,
        return_dict_in_generate=True,
    )
    tokens = out.sequences[0, batch["input_ids"].shape[1] :].tolist()
    return Greedy(tokens, out.scores, out.logits, tester), batch


def hf_reference(
    tester: FamilyTester,
    hf: tuple,
    prompt: str,
    groups: list[list],
    method: str = "zoo",
    budget: dict[str, Any] | None = None,
    **options: Any,
) -> list[tuple]:
    """Per prompt (its pictures): the kept indices of each image, the separators kept,
    the greedy tokens of the HF model pruned by the same settings (``budget``: keep=KEEP
    by default), the pruned prompt it ran (its ``input_ids``) and its M-RoPE positions
    (:func:`mrope_rows`)."""
    model, processor = hf
    options = (tester.fast if method in ("zoo",) and not options else {}) | options
    results = []
    with zooprune.prune(model, method, **(budget or {"keep": KEEP}), **options) as handle:
        for pictures in groups:
            tokens, batch = greedy_tokens(model, processor, prompt, pictures, tester)
            images = handle.selection.images
            kept = [image.indices.tolist() for image in images]
            separators = sum(
                0 if image.separators is None else image.separators.numel() for image in images
            )
            prepared = handle.prepare(dict(batch), for_generate=False)
            pruned = prepared["input_ids"][0].tolist()
            results.append((kept, separators, tokens, pruned, mrope_rows(prepared)))
    return results


def mrope_rows(prepared: dict) -> torch.Tensor | None:
    """``[3, L']`` the M-RoPE positions of a pruned prompt as the HF handle prepared them
    (its position ids' rows after the first, the 1-D count), or None for 1-D positions."""
    positions = prepared.get("position_ids")
    return positions[1:, 0] if positions is not None and positions.ndim == 3 else None


def greedy_params(llm: Any, tester: FamilyTester) -> Any:
    """vLLM's sampling for the comparison: greedy, STEPS tokens, the first TOP log-probs,
    and, as on the HF side, no placeholder token (one generated as text would not match
    any image)."""
    from vllm import SamplingParams

    vocabulary = llm.get_tokenizer().vocab_size
    allowed = [i for i in range(vocabulary) if i not in tester.banned]
    return SamplingParams(max_tokens=STEPS, temperature=0, allowed_token_ids=allowed, logprobs=TOP)


def hf_projector(model: Any) -> Any:
    return adapter_for(model).projector(model)


def refusal_of(selector: Any) -> Any:
    """For ``apply_model``: why the variant's scored projector refuses ``selector``'s
    options ("" where it takes them)."""

    def refusal(model: Any) -> str:
        try:
            selector.check_projector(model.scoring_projector)
        except PruneError as error:
            return str(error)
        return ""

    return refusal


class VllmParity:
    """What every served family's vLLM variant must do; the class sets ``tester``."""

    tester: FamilyTester
    #: how many videos a prompt may carry (the video suite's engines take one)
    videos_per_prompt = 0

    @pytest.fixture(scope="class")
    @classmethod
    def saved(cls, tmp_path_factory: pytest.TempPathFactory) -> Path:
        torch.manual_seed(0)
        return cls.tester.vllm_build(tmp_path_factory.mktemp(f"{cls.tester.name}-vllm"))

    @pytest.fixture(scope="class")
    @classmethod
    def llm(cls, saved: Path) -> Any:
        from vllm import LLM

        t = cls.tester
        engine = LLM(
            model=str(saved),
            enforce_eager=True,
            dtype=t.vllm_dtype,
            max_model_len=1024,
            limit_mm_per_prompt={"image": 2, "video": cls.videos_per_prompt},
            **zv.engine_args(saved, method="zoo", keep=KEEP, **t.fast),
        )
        yield engine
        del engine
        gc.collect()

    @pytest.fixture(scope="class")
    @classmethod
    def hf(cls, saved: Path) -> tuple[Any, Any]:
        t = cls.tester
        model = t.load(saved, dtype=getattr(torch, t.vllm_dtype))
        return model, t.vllm_hf_processor(saved)

    @pytest.fixture(scope="class")
    @classmethod
    def vllm_pictures(cls) -> list:
        return cls.tester.pictures()[:3]

    def reference(
        self,
        hf: tuple,
        prompt: str,
        groups: list[list],
        method: str = "zoo",
        budget: dict[str, Any] | None = None,
        **options: Any,
    ) -> list[tuple]:
        return hf_reference(self.tester, hf, prompt, groups, method, budget, **options)

    def generate(
        self,
        llm: Any,
        prompt: str,
        groups: list[list],
        uuids: dict[int, str] | None = None,
        settings: list[dict | None] | None = None,
    ) -> list:
        """Greedy answers, one request per group of pictures; ``uuids``: a request's image
        under a cache key of its own (by request index); ``settings``: each request's own
        zooprune settings (None: the server's)."""
        requests = [
            {"prompt": prompt, "multi_modal_data": {"image": g if len(g) > 1 else g[0]}}
            for g in groups
        ]
        for index, uuid in (uuids or {}).items():
            requests[index]["multi_modal_uuids"] = {"image": [uuid]}
        for request, own in zip(requests, settings or [None] * len(requests), strict=True):
            if own is not None:
                request["mm_processor_kwargs"] = {zv.SETTINGS: own}
        return llm.generate(requests, greedy_params(llm, self.tester))

    @staticmethod
    def kept(llm: Any) -> list[list[int]]:
        return llm.apply_model(lambda model: [k.tolist() for k in model.zooprune_kept])[0]

    @staticmethod
    def check_positions(llm: Any, expected: torch.Tensor | None, shifted_from: int = -1) -> None:
        """The last prompt's M-RoPE positions are the HF handle's (a tiny random language
        model's answers hardly move with positions: they are compared themselves); from
        column ``shifted_from`` on (where given), the same up to one constant shift."""
        if expected is None:
            return
        served = VllmParity.positions(llm)
        if shifted_from < 0:
            assert torch.equal(served, expected), (served, expected)
            return
        assert torch.equal(served[:, :shifted_from], expected[:, :shifted_from])
        shift = served[:, shifted_from:] - expected[:, shifted_from:]
        assert bool((shift == shift[0, 0]).all()), (served, expected)

    # -- the checks -------------------------------------------------------------------------

    def test_each_picture_keeps_and_generates_what_the_hf_handle_does(self, llm, hf, vllm_pictures):
        t = self.tester
        groups = [[p] for p in vllm_pictures]
        reference = self.reference(hf, t.vllm_prompt, groups)
        for group, (kept, separators, tokens, pruned, positions) in zip(
            groups, reference, strict=True
        ):
            (out,) = self.generate(llm, t.vllm_prompt, [group])
            placeholders = sum(token == t.image_token for token in out.prompt_token_ids)
            assert placeholders == KEEP * len(kept) + t.vllm_separator_slots(separators)
            # The prompt vLLM runs is the one the HF handle pruned (markers and all).
            assert list(out.prompt_token_ids) == t.vllm_served_prompt(pruned)
            assert self.kept(llm) == kept
            self.check_positions(llm, positions)
            assert tokens.agrees_with(out.outputs[0])

    def test_two_images_in_one_prompt(self, llm, hf):
        # Pictures of their own: the encoder cache would serve seen ones unselected.
        t = self.tester
        prompt = t.vllm_two_images_prompt
        group = random_pictures(11, [t.vllm_picture_size, t.pictures()[1].size[::-1]])
        if t.vllm_images_alone:
            # Each image as if alone (the tester says why): as in a one-image HF prompt.
            alone = self.reference(hf, t.vllm_prompt, [[picture] for picture in group])
            (out,) = self.generate(llm, prompt, [group])
            assert self.kept(llm) == [kept for (kept,), *_ in alone]
            placeholders = sum(token == t.image_token for token in out.prompt_token_ids)
            slots = sum(KEEP + t.vllm_separator_slots(separators) for _, separators, *_ in alone)
            assert placeholders == slots
            return
        ((kept, _, tokens, pruned, positions),) = self.reference(hf, prompt, [group])
        (out,) = self.generate(llm, prompt, [group])
        assert list(out.prompt_token_ids) == t.vllm_served_prompt(pruned)
        assert len(kept) == 2 and self.kept(llm) == kept, (self.kept(llm), kept)
        self.check_positions(llm, positions)
        assert tokens.agrees_with(out.outputs[0])

    def test_a_batch_and_the_same_image_twice(self, llm, hf, vllm_pictures):
        t = self.tester
        groups = [[p] for p in vllm_pictures]
        reference = self.reference(hf, t.vllm_prompt, groups)
        # Every request at once (vLLM batches them), the first picture again: the encoder
        # cache serves it, and its tokens must not change; and once more under a cache key
        # of its own, so that the same pixels are encoded twice in one batch.
        batch = [*groups, groups[0], groups[0]]
        outs = self.generate(llm, t.vllm_prompt, batch, uuids={len(batch) - 1: "again"})
        expected = [tokens for _, _, tokens, *_ in reference] + [reference[0][2]] * 2
        for out, tokens in zip(outs, expected, strict=True):
            assert tokens.agrees_with(out.outputs[0])

    def test_the_same_prompt_again_from_the_prefix_cache(self, llm):
        # A prompt whose text after the image fills whole KV blocks: the second time,
        # vLLM's prefix cache covers the image, and it sends the model the image's grid but
        # not its pixels (an M-RoPE variant's positions once read them: the engine died).
        t = self.tester
        filler = " and then a few more words"
        words = len(llm.get_tokenizer().encode(filler, add_special_tokens=False))
        prompt = t.vllm_prompt + filler * (400 // words)
        picture = random_pictures(23, [t.vllm_picture_size])
        (first,) = self.generate(llm, prompt, [picture])
        positions = self.positions(llm)
        (again,) = self.generate(llm, prompt, [picture])
        last = max(i for i, token in enumerate(again.prompt_token_ids) if token == t.image_token)
        assert again.num_cached_tokens > last  # the image was served from the cache
        assert again.outputs[0].token_ids == first.outputs[0].token_ids
        if positions is not None:  # every position computed again is the first time's
            assert torch.equal(self.positions(llm)[:, last + 1 :], positions[:, last + 1 :])

    def test_each_request_prunes_by_its_own_settings(self, llm, hf):
        # Three K (the server's 5, and two of the request's own, one with another
        # method), and no pruning (ratio 1.0): each as the HF handle with those settings.
        t = self.tester
        picture, fresh = random_pictures(61, [t.vllm_picture_size] * 2)
        reference = {
            name: (self.reference(hf, t.vllm_prompt, [[picture], [fresh]], method, budget))
            for name, method, budget in PER_REQUEST
        }
        # One request at a time: the prompt, the kept tokens, the positions, the answers.
        for name, *_ in PER_REQUEST:
            (out,) = self.generate(llm, t.vllm_prompt, [[picture]], settings=[OWN[name]])
            kept, _, tokens, pruned, positions = reference[name][0]
            assert list(out.prompt_token_ids) == t.vllm_served_prompt(pruned), name
            assert self.kept(llm) == kept, name
            self.check_positions(llm, positions)
            assert tokens.agrees_with(out.outputs[0]), name
        # All at once, a fresh picture at every setting (one encoder batch mixing them)
        # and the first again (the encoder cache holds it once per setting: each request
        # must get its own length's tokens back).
        names = [name for name, *_ in PER_REQUEST]
        groups = [[fresh]] * len(names) + [[picture]] * len(names)
        outs = self.generate(llm, t.vllm_prompt, groups, settings=[OWN[n] for n in names] * 2)
        expected = [reference[n][1] for n in names] + [reference[n][0] for n in names]
        for out, (_, _, tokens, pruned, _) in zip(outs, expected, strict=True):
            assert list(out.prompt_token_ids) == t.vllm_served_prompt(pruned)
            assert tokens.agrees_with(out.outputs[0])

    @staticmethod
    def positions(llm: Any) -> torch.Tensor | None:
        """The last prompt's M-RoPE positions as the variant made them (None: 1-D)."""
        return llm.apply_model(lambda model: getattr(model, "zooprune_positions", None))[0]

    @pytest.mark.parametrize(("method", "options"), SERVED, ids=lambda v: str(v))
    def test_every_served_method_keeps_the_hf_tokens(self, llm, hf, method, options):
        # A picture of its own per case: the encoder cache would serve a seen one unselected.
        t = self.tester
        settings = {"method": method, "keep": KEEP, **options}
        selector = check_settings(settings, zv.VARIANTS[t.vllm_architecture])
        model, _ = hf
        if options.get("estimator") in MLP_ESTIMATORS and as_mlp(hf_projector(model)) is None:
            # An estimator only an MLP has: both engines refuse it before any image (the
            # HF handle at prune(), the variant when it loads its projector).
            with pytest.raises(PruneError, match="use 'jvp' or 'zo'"):
                zooprune.prune(model, method, keep=KEEP, **options)
            assert "use 'jvp' or 'zo'" in llm.apply_model(refusal_of(selector))[0]
            with pytest.raises(PruneError, match="use 'jvp' or 'zo'"):  # and its request
                self.generate(llm, t.vllm_prompt, [[t.pictures()[0]]], settings=[settings])
            return
        seed = zlib.crc32(repr((t.name, method, options)).encode())
        picture = random_pictures(seed % 2**31, [t.vllm_picture_size])
        ((kept, _, tokens, *_),) = self.reference(hf, t.vllm_prompt, [picture], method, **options)
        # Served to a request of its own settings, on a server started with zoo.
        (out,) = self.generate(llm, t.vllm_prompt, [picture], settings=[settings])
        served = self.kept(llm)
        if (method, options.get("estimator", "")) in t.vllm_rounding_ranked:
            # Ranked by rounding (the tester says why): the same count, any tokens.
            assert [len(k) for k in served] == [len(k) for k in kept]
            return
        assert served == kept
        if method != "pool":  # pooled tokens are new ones: the same places, other numerics
            assert tokens.agrees_with(out.outputs[0])

    def test_the_scored_projector_is_the_hf_adapters(self, llm, hf):
        model, _ = hf
        projector = hf_projector(model)
        x = torch.randn(5, self.tester.vllm_projector_width(model), dtype=model.dtype)

        def scored(vllm_model: Any) -> torch.Tensor:
            with torch.no_grad():
                return vllm_model.scoring_projector(x).float()

        with torch.no_grad():
            expected = projector(x).float()
        torch.testing.assert_close(llm.apply_model(scored)[0], expected, rtol=0, atol=1e-5)


def video(seed: int, frames: int, size: tuple[int, int]) -> tuple[Any, dict]:
    """A random video as vLLM takes it (frames and metadata)."""
    return random_video(np.random.default_rng(seed), frames, size)


def record_selections(model: Any) -> None:
    """For ``apply_model``: from now on, ``model.recorded`` lists the kept indices of every
    item ``model.select`` chooses, call after call (remove the instance's ``select`` to
    stop)."""
    original = model.select
    recorded: list[list[int]] = []

    def select(*args: Any, **kwargs: Any) -> Any:
        kept = original(*args, **kwargs)
        recorded.extend(image.indices.tolist() for image in kept.images)
        return kept

    object.__setattr__(model, "recorded", recorded)
    object.__setattr__(model, "select", select)


class VllmVideoParity(VllmParity):
    """The parity suite, and videos (a family whose vLLM variant prunes them): a video
    alone, a video with an image in one prompt, and each video budget the variant serves
    (the others refused with the reason) keep the HF handle's tokens in the HF handle's
    pruned prompt, at its 3-D positions, and generate what it generates. The tester gives
    ``video_token``, ``vllm_video_prompt`` and ``vllm_image_and_video_prompt``."""

    videos_per_prompt = 1

    def check_video_positions(self, llm: Any, expected: torch.Tensor, prompt: list[int]) -> None:
        """:meth:`check_positions`, where the tester declares that the two stock engines
        place the text after a video differently (``vllm_text_after_video``): that text is
        compared up to one shift."""
        last = max(i for i, token in enumerate(prompt) if token == self.tester.video_token)
        self.check_positions(llm, expected, last + 1 if self.tester.vllm_text_after_video else -1)

    #: frames and (h, w) pixels of the test videos (for Qwen: 2 temporal patches of 3 x 5
    #: and 4 x 3 merged tokens, N = 30 and 24, K = 5 shared as 3 + 2 over the frames)
    videos = [(4, (24, 40)), (4, (32, 24))]

    def video_reference(self, hf: tuple, prompt: str, pictures: list, clip: tuple, **options):
        """The HF handle's kept indices per item, greedy tokens, pruned prompt and its
        M-RoPE positions."""
        model, processor = hf
        frames, metadata = clip
        metadata = {k: v for k, v in metadata.items() if k != "do_sample_frames"}  # vLLM's
        batch = processor(
            text=[prompt],
            images=[pictures] if pictures else None,
            videos=[frames],
            video_metadata=[metadata],
            do_sample_frames=False,
            return_tensors="pt",
        )
        with zooprune.prune(model, "zoo", keep=KEEP, **self.tester.fast, **options) as handle:
            tokens, batch = greedy(model, batch, self.tester)
            kept = [image.indices.tolist() for image in handle.selection.images]
            prepared = handle.prepare(dict(batch), for_generate=False)
        return kept, tokens, prepared["input_ids"][0].tolist(), mrope_rows(prepared)

    def serve_video(
        self, llm: Any, prompt: str, pictures: list, clip: tuple, own: dict | None = None
    ) -> Any:
        """The greedy answer to one request with a video (and a picture); ``own``: the
        request's own zooprune settings."""
        data = {"video": clip} | ({"image": pictures[0]} if pictures else {})
        request = {"prompt": prompt, "multi_modal_data": data}
        if own is not None:
            request["mm_processor_kwargs"] = {zv.SETTINGS: own}
        (out,) = llm.generate(request, greedy_params(llm, self.tester))
        return out

    @pytest.mark.parametrize("which", [0, 1])
    def test_a_video_keeps_and_generates_what_the_hf_handle_does(self, llm, hf, which):
        t = self.tester
        frames, size = self.videos[which]
        clip = video(20 + which, frames, size)
        kept, tokens, pruned, positions = self.video_reference(hf, t.vllm_video_prompt, [], clip)
        out = self.serve_video(llm, t.vllm_video_prompt, [], clip)
        placeholders = sum(token == t.video_token for token in out.prompt_token_ids)
        assert placeholders == KEEP + t.vllm_video_separators
        # The prompt vLLM runs is the HF handle's pruned one: timestamps, markers and all.
        assert list(out.prompt_token_ids) == pruned
        assert self.kept(llm) == kept
        self.check_video_positions(llm, positions, pruned)  # the temporal row included
        assert tokens.agrees_with(out.outputs[0])

    def test_an_image_and_a_video_in_one_prompt(self, llm, hf):
        t = self.tester
        (picture,) = random_pictures(31, [t.vllm_picture_size])
        clip = video(32, *self.videos[0])
        prompt = t.vllm_image_and_video_prompt
        kept, tokens, pruned, positions = self.video_reference(hf, prompt, [picture], clip)
        # vLLM may encode the image and the video in calls of their own: every selection
        # of the request is recorded, in order.
        llm.apply_model(record_selections)
        try:
            out = self.serve_video(llm, prompt, [picture], clip)
            served = llm.apply_model(lambda model: model.recorded)[0]
        finally:
            llm.apply_model(lambda model: [model.__dict__.pop(k) for k in ("select", "recorded")])
        assert list(out.prompt_token_ids) == pruned
        assert len(kept) == 2 and served == kept, (served, kept)
        self.check_video_positions(llm, positions, pruned)
        assert tokens.agrees_with(out.outputs[0])

    # The default ("frame") is every other video check's; the others here.
    @pytest.mark.parametrize("budget", VIDEO_BUDGETS[1:])
    def test_another_video_budget_is_served_or_refused_with_the_reason(self, llm, hf, budget):
        t = self.tester
        settings = {"method": "zoo", "keep": KEEP, "video_budget": budget, **t.fast}
        variant = zv.VARIANTS[t.vllm_architecture]
        served = variant.layout.get("video_budget") or VIDEO_BUDGETS
        clip = video(40 + VIDEO_BUDGETS.index(budget), *self.videos[1])
        own = {"video_budget": budget}  # a request's own, over the server's "frame"
        if budget not in served:
            refusal = r"video_budget='global' cannot be served"
            with pytest.raises(PruneError, match=refusal):
                check_settings(settings, variant)  # a server's
            with pytest.raises(PruneError, match=refusal):
                self.serve_video(llm, t.vllm_video_prompt, [], clip, own)  # a request's
            return
        kept, tokens, pruned, positions = self.video_reference(
            hf, t.vllm_video_prompt, [], clip, video_budget=budget
        )
        out = self.serve_video(llm, t.vllm_video_prompt, [], clip, own)
        assert list(out.prompt_token_ids) == pruned
        assert self.kept(llm) == kept
        self.check_video_positions(llm, positions, pruned)
        assert tokens.agrees_with(out.outputs[0])


class VllmTensorParallel:
    """Opted into (beside :class:`VllmParity`) by one family per projector kind: under two
    tensor-parallel ranks each holds a shard of the projector's weights, and both must score
    the whole one and keep the HF handle's tokens."""

    def test_two_tensor_parallel_ranks_keep_the_hf_tokens(self, saved, hf):
        from tests.integrations.vllm_tp import serve

        if len(os.sched_getaffinity(0)) < 2:
            # A failure, not a skip, where ZOOPRUNE_REQUIRE_VLLM=1 (conftest.py).
            pytest.skip("two tensor-parallel ranks need two CPU cores")
        t = self.tester
        pictures = (5, [list(t.vllm_picture_size), list(t.pictures()[1].size[::-1])])
        groups = [[picture] for picture in random_pictures(*pictures)]
        reference = self.reference(hf, t.vllm_prompt, groups)
        spec = {"prompt": t.vllm_prompt, "dtype": t.vllm_dtype, "keep": KEEP}
        spec |= {"options": t.fast, "pictures": pictures, "steps": STEPS}
        spec |= {"banned": list(t.banned), "logprobs": TOP}
        served = serve(saved, spec)
        assert len(served) == len(reference)
        for result, (kept, _, tokens, *_) in zip(served, reference, strict=True):
            assert result["kept"] == [kept, kept]  # rank 0, rank 1
            first = {
                int(k): SimpleNamespace(logprob=v) for k, v in result["first_logprobs"].items()
            }
            assert tokens.agrees_with(SimpleNamespace(token_ids=result["tokens"], logprobs=[first]))
