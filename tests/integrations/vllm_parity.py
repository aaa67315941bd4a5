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

import pytest
import torch

import zooprune
import zooprune.integrations.vllm as zv
from tests.adapters.conformance import FamilyTester, random_pictures
from zooprune import PruneError
from zooprune.adapters import adapter_for
from zooprune.integrations.vllm.selection import check_settings
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
    batch = tester.vllm_hf_inputs(processor(images=[pictures], text=[prompt], return_tensors="pt"))
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
    **options: Any,
) -> list[tuple]:
    """Per prompt (its pictures): the kept indices of each image, the separators kept,
    the greedy tokens of the HF model pruned by the same settings, and the pruned prompt it
    ran (its ``input_ids``)."""
    model, processor = hf
    options = (tester.fast if method in ("zoo",) and not options else {}) | options
    results = []
    with zooprune.prune(model, method, keep=KEEP, **options) as handle:
        for pictures in groups:
            tokens, batch = greedy_tokens(model, processor, prompt, pictures, tester)
            images = handle.selection.images
            kept = [image.indices.tolist() for image in images]
            separators = sum(
                0 if image.separators is None else image.separators.numel() for image in images
            )
            pruned = handle.prepare(dict(batch), for_generate=False)["input_ids"][0].tolist()
            results.append((kept, separators, tokens, pruned))
    return results


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
            limit_mm_per_prompt={"image": 2, "video": 0},
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

    def reference(self, hf: tuple, prompt: str, groups: list[list], method: str = "zoo", **options):
        return hf_reference(self.tester, hf, prompt, groups, method, **options)

    def generate(self, llm: Any, prompt: str, groups: list[list]) -> list:
        from vllm import SamplingParams

        requests = [
            {"prompt": prompt, "multi_modal_data": {"image": g if len(g) > 1 else g[0]}}
            for g in groups
        ]
        # As the HF side: a placeholder token generated as text would not match any image.
        vocabulary = llm.get_tokenizer().vocab_size
        allowed = [i for i in range(vocabulary) if i not in self.tester.banned]
        params = SamplingParams(
            max_tokens=STEPS, temperature=0, allowed_token_ids=allowed, logprobs=TOP
        )
        return llm.generate(requests, params)

    @staticmethod
    def kept(llm: Any) -> list[list[int]]:
        return llm.apply_model(lambda model: [k.tolist() for k in model.zooprune_kept])[0]

    # -- the checks -------------------------------------------------------------------------

    def test_each_picture_keeps_and_generates_what_the_hf_handle_does(self, llm, hf, vllm_pictures):
        t = self.tester
        groups = [[p] for p in vllm_pictures]
        reference = self.reference(hf, t.vllm_prompt, groups)
        for group, (kept, separators, tokens, pruned) in zip(groups, reference, strict=True):
            (out,) = self.generate(llm, t.vllm_prompt, [group])
            placeholders = sum(token == t.image_token for token in out.prompt_token_ids)
            assert placeholders == KEEP * len(kept) + t.vllm_separator_slots(separators)
            # The prompt vLLM runs is the one the HF handle pruned (markers and all).
            assert list(out.prompt_token_ids) == t.vllm_served_prompt(pruned)
            assert self.kept(llm) == kept
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
        ((kept, _, tokens, pruned),) = self.reference(hf, prompt, [group])
        (out,) = self.generate(llm, prompt, [group])
        assert list(out.prompt_token_ids) == t.vllm_served_prompt(pruned)
        assert len(kept) == 2 and self.kept(llm) == kept
        assert tokens.agrees_with(out.outputs[0])

    def test_a_batch_and_the_same_image_twice(self, llm, hf, vllm_pictures):
        t = self.tester
        groups = [[p] for p in vllm_pictures]
        reference = self.reference(hf, t.vllm_prompt, groups)
        # Every request at once (vLLM batches them), the first picture again: the encoder
        # cache serves it, and its tokens must not change.
        outs = self.generate(llm, t.vllm_prompt, [*groups, groups[0]])
        expected = [tokens for _, _, tokens, _ in reference] + [reference[0][2]]
        for out, tokens in zip(outs, expected, strict=True):
            assert tokens.agrees_with(out.outputs[0])

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
            return
        seed = zlib.crc32(repr((t.name, method, options)).encode())
        picture = random_pictures(seed % 2**31, [t.vllm_picture_size])
        ((kept, _, tokens, _),) = self.reference(hf, t.vllm_prompt, [picture], method, **options)
        default = llm.apply_model(lambda model: model.selector)[0]
        llm.apply_model(lambda model: object.__setattr__(model, "selector", selector))
        try:
            (out,) = self.generate(llm, t.vllm_prompt, [picture])
            served = self.kept(llm)
        finally:
            llm.apply_model(lambda model: object.__setattr__(model, "selector", default))
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
        for result, (kept, _, tokens, _) in zip(served, reference, strict=True):
            assert result["kept"] == [kept, kept]  # rank 0, rank 1
            first = {
                int(k): SimpleNamespace(logprob=v) for k, v in result["first_logprobs"].items()
            }
            assert tokens.agrees_with(SimpleNamespace(token_ids=result["tokens"], logprobs=[first]))
