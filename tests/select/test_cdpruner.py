"""CDPruner: the conditional kernel and the fast greedy MAP against plain references written
from the published algorithm (determinants by ``slogdet``, cosines by loops), its options,
and the instruction the Hugging Face engine hands it (the prompt's text embeddings)."""

import math

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

import zooprune
from zooprune import PruneError
from zooprune.adapters.llava import LlavaAdapter
from zooprune.pipeline import Selector
from zooprune.select import METHODS, MethodResult, TokenSet
from zooprune.select.cdpruner import (
    EXHAUSTED_GAIN,
    RELEVANCE_FLOOR,
    conditional_kernel,
    greedy_dpp_map,
    instruction_relevance,
)
from zooprune.select.registry import register_method
from zooprune.tiny import SPECIAL

IMAGE = SPECIAL.index("<image>")
PAD = SPECIAL.index("<pad>")


# -- references: the paper's definitions, computed the slow, obvious way ------------------


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    na, nb = float(a.norm()), float(b.norm())
    return 0.0 if na == 0 or nb == 0 else float(a @ b) / (na * nb)


def reference_relevance(z: torch.Tensor, text: torch.Tensor) -> list[float]:
    """r_i = mean_t cos(z_i, t), then (r - min + 1e-6) / (max - min); all 1 when undefined."""
    if len(text) == 0:
        return [1.0] * len(z)
    raw = [sum(cosine(zi, t) for t in text) / len(text) for zi in z]
    low, high = min(raw), max(raw)
    if high == low:
        return [1.0] * len(z)
    return [(r - low + RELEVANCE_FLOOR) / (high - low) for r in raw]


def reference_kernel(z: torch.Tensor, r: list[float], theta: float | None) -> torch.Tensor:
    q = r if theta is None else [math.exp(theta / (2 * (1 - theta)) * v) for v in r]
    n = len(z)
    return torch.tensor(
        [[q[i] * cosine(z[i], z[j]) * q[j] for j in range(n)] for i in range(n)],
        dtype=torch.float64,
    )


def reference_greedy_map(kernel: torch.Tensor, k: int) -> list[int]:
    """At each step the candidate j maximising det(L_{S+j}) / det(L_S), by slogdet.

    Rounding: a gain below EXHAUSTED_GAIN of L_jj counts as 0 (j adds nothing to S), a
    gain within that of the best ties with it, and ties go to the lowest index.
    """
    L = kernel.to(torch.float64)
    n = L.shape[0]
    picks: list[int] = []
    span: list[int] = []  # the picks that added something: S
    while len(picks) < k:
        sign, base = torch.linalg.slogdet(L[span][:, span]) if span else (1.0, 0.0)
        assert sign > 0
        gains = {}
        for j in range(n):
            if j not in picks:
                s, logdet = torch.linalg.slogdet(L[span + [j]][:, span + [j]])
                gain = math.exp(float(logdet - base)) if s > 0 else 0.0
                gains[j] = 0.0 if gain <= EXHAUSTED_GAIN * float(L[j, j]) else gain
        best = max(gains.values())
        pick = min(j for j, g in gains.items() if g >= best - EXHAUSTED_GAIN * float(L[j, j]))
        picks.append(pick)
        if gains[pick] > 0:
            span.append(pick)
    return picks


def gain_of(kernel: torch.Tensor, chosen: list[int], j: int) -> float:
    L = kernel.to(torch.float64)
    s, logdet = torch.linalg.slogdet(L[chosen + [j]][:, chosen + [j]])
    base = torch.linalg.slogdet(L[chosen][:, chosen])[1] if chosen else 0.0
    return math.exp(float(logdet - base)) if s > 0 else 0.0


# -- the kernel ---------------------------------------------------------------------------


@pytest.mark.parametrize("theta", [None, 0.5, 0.9])
def test_relevance_and_kernel_match_the_definitions(theta):
    g = torch.Generator().manual_seed(3)
    z = torch.randn(2, 9, 5, generator=g, dtype=torch.float64)
    text = torch.randn(2, 4, 5, generator=g, dtype=torch.float64)
    mask = torch.tensor([[True, True, True, False], [True, False, False, False]])
    relevance = instruction_relevance(z, text, mask)
    kernel = conditional_kernel(z, relevance, theta)
    for b in range(2):
        r = reference_relevance(z[b], text[b][mask[b]])
        torch.testing.assert_close(relevance[b], torch.tensor(r, dtype=torch.float64))
        torch.testing.assert_close(kernel[b], reference_kernel(z[b], r, theta))
    # The most relevant token has relevance 1 + 1e-6, the least 1e-6 / spread > 0.
    assert float(relevance.amax()) == pytest.approx(1 + RELEVANCE_FLOOR)
    assert bool((relevance > 0).all())


def test_relevance_without_instruction_or_spread_is_uniform():
    z = torch.randn(3, 6, 4, dtype=torch.float64)
    text = torch.randn(3, 2, 4, dtype=torch.float64)
    mask = torch.tensor([[False, False], [True, True], [True, False]])
    z[1] = z[1, :1]  # every token the same: no spread
    relevance = instruction_relevance(z, text, mask)
    assert torch.equal(relevance[0], torch.ones(6, dtype=torch.float64))
    assert torch.equal(relevance[1], torch.ones(6, dtype=torch.float64))
    assert not torch.equal(relevance[2], torch.ones(6, dtype=torch.float64))
    # The instruction's embeddings may come in another dtype than the tokens.
    torch.testing.assert_close(instruction_relevance(z, text.float(), mask), relevance)


# -- the greedy MAP -----------------------------------------------------------------------


def random_kernel(n: int, d: int, seed: int, dtype=torch.float64) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(1, n, d, generator=g, dtype=dtype)
    text = torch.randn(1, 3, d, generator=g, dtype=dtype)
    relevance = instruction_relevance(z, text, torch.ones(1, 3, dtype=torch.bool))
    return conditional_kernel(z, relevance)


@pytest.mark.parametrize(
    ("n", "d", "k"),
    [(12, 16, 1), (12, 16, 5), (12, 16, 12), (20, 6, 9), (20, 6, 20), (7, 2, 7), (30, 32, 18)],
)
def test_greedy_map_equals_the_slogdet_reference(n, d, k):
    # d < n: the kernel has rank d, so after d picks every gain is 0 (the tail in order).
    for seed in range(3):
        kernel = random_kernel(n, d, seed)
        assert greedy_dpp_map(kernel, k)[0].tolist() == reference_greedy_map(kernel[0], k)


@st.composite
def problems(draw):
    """Random tokens, some exact duplicates and some zero rows, a random instruction."""
    n = draw(st.integers(1, 14))
    d = draw(st.integers(1, 8))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    z = torch.randn(n, d, generator=g, dtype=torch.float64)
    for _ in range(draw(st.integers(0, n // 2))):
        i, j = draw(st.integers(0, n - 1)), draw(st.integers(0, n - 1))
        z[i] = z[j]
    if draw(st.booleans()):
        z[draw(st.integers(0, n - 1))] = 0
    text = torch.randn(draw(st.integers(0, 4)), d, generator=g, dtype=torch.float64)
    theta = draw(st.sampled_from([None, 0.3, 0.5]))
    return z, text, theta, draw(st.integers(1, n))


@given(problems())
def test_greedy_map_matches_the_reference_on_random_problems(problem):
    z, text, theta, k = problem
    relevance = instruction_relevance(z[None], text[None], torch.ones(1, len(text), dtype=bool))
    kernel = conditional_kernel(z[None], relevance, theta)
    picks = greedy_dpp_map(kernel, k)[0].tolist()
    reference = reference_greedy_map(kernel[0], k)
    assert len(set(picks)) == k
    if picks != reference:  # only a rounding-level near-tie of two gains may separate them
        step = next(i for i, (a, b) in enumerate(zip(picks, reference, strict=True)) if a != b)
        mine, theirs = (
            gain_of(kernel[0], reference[:step], j) for j in (picks[step], reference[step])
        )
        assert mine == pytest.approx(theirs, rel=1e-6, abs=1e-9)


def test_duplicates_are_kept_only_once_the_rest_is_exhausted():
    # Tokens 0-3 are one vector, 4-5 another, 6 a third: three distinct directions.
    base = torch.eye(3, dtype=torch.float64)
    z = base[[0, 0, 0, 0, 1, 1, 2]][None]
    kernel = conditional_kernel(z, torch.ones(1, 7, dtype=torch.float64))
    picks = greedy_dpp_map(kernel, 5)[0].tolist()
    assert picks == [0, 4, 6, 1, 2]  # one of each, then the duplicates in index order


def test_of_two_duplicates_the_lower_index_is_kept_first():
    # Copies that differ by rounding only (a relative 2^-22, below float32's step at some
    # entries): their gains differ by rounding, which a plain argmax would follow.
    for seed in range(20):
        g = torch.Generator().manual_seed(seed)
        z = torch.randn(1, 48, 24, generator=g)
        copies = torch.randperm(48, generator=g)[:32].view(2, 16)
        z[0, copies[0]] = z[0, copies[1]] * (1 + 2**-22)
        text = torch.randn(1, 5, 24, generator=g)
        relevance = instruction_relevance(z, text, torch.ones(1, 5, dtype=torch.bool))
        picks = greedy_dpp_map(conditional_kernel(z, relevance), 30)[0].tolist()
        for i, j in zip(*copies.sort(dim=0).values.tolist(), strict=True):
            if j in picks:
                assert i in picks and picks.index(i) < picks.index(j)


def test_the_instruction_steers_the_first_picks():
    g = torch.Generator().manual_seed(0)
    z = torch.randn(1, 16, 8, generator=g)
    for target in (3, 11):
        text = z[:, target : target + 1] * 2  # the instruction says exactly token `target`
        relevance = instruction_relevance(z, text, torch.ones(1, 1, dtype=torch.bool))
        assert int(relevance.argmax()) == target
        picks = greedy_dpp_map(conditional_kernel(z, relevance), 4)
        assert int(picks[0, 0]) == target


# -- the registered method --------------------------------------------------------------


def token_set(z: torch.Tensor, text: torch.Tensor, mask: torch.Tensor) -> TokenSet:
    return TokenSet(
        features=z,
        projected=z,
        projector=nn.Identity(),
        grid=(1, z.shape[1]),
        instruction=text,
        instruction_mask=mask,
    )


def test_method_keeps_k_distinct_ascending_tokens_batch_equals_alone():
    g = torch.Generator().manual_seed(5)
    z = torch.randn(4, 40, 16, generator=g)
    text = torch.randn(4, 6, 16, generator=g)
    mask = torch.arange(6)[None] < torch.tensor([[6], [2], [0], [4]])
    method = METHODS["cdpruner"]
    for theta in (None, 0.5):
        together = method(token_set(z, text, mask), 9, theta=theta)
        again = method(token_set(z, text, mask), 9, theta=theta)
        assert torch.equal(together.indices, again.indices)  # deterministic
        assert (together.indices.diff(dim=-1) > 0).all()
        for b in range(4):
            alone = method(
                token_set(z[b : b + 1], text[b : b + 1], mask[b : b + 1]), 9, theta=theta
            )
            assert torch.equal(alone.indices[0], together.indices[b])
            torch.testing.assert_close(alone.scores[0], together.scores[b])
            # float32 kernel, float64 reference: the same tokens
            r = reference_relevance(z[b].double(), text[b][mask[b]].double())
            expected = reference_greedy_map(reference_kernel(z[b].double(), r, theta), 9)
            assert together.indices[b].tolist() == sorted(expected)


@pytest.mark.parametrize("theta", [0.99, 0.999])
def test_a_theta_near_1_keeps_what_the_float64_definition_keeps(theta):
    # exp(alpha r) at alpha = theta / (2 (1 - theta)) overflows float32 near theta = 1
    # (the kernel holds its square): the greedy once crashed there. Scaling q by a constant
    # scales every gain det(L_S+j) / det(L_S) by its square, so the picks are the
    # definition's; at 0.99 the float64 definition itself is finite and is the reference.
    g = torch.Generator().manual_seed(8)
    z = torch.randn(2, 30, 16, generator=g)
    text = torch.randn(2, 5, 16, generator=g)
    mask = torch.ones(2, 5, dtype=torch.bool)
    kept = METHODS["cdpruner"](token_set(z, text, mask), 7, theta=theta).indices
    for b in range(2):
        r = reference_relevance(z[b].double(), text[b].double())
        if theta == 0.99:
            kernel = reference_kernel(z[b].double(), r, theta)
            assert bool(torch.isfinite(kernel).all())
        else:  # past float64 too: the same DPP with q divided by its largest value
            top = max(r)
            kernel = reference_kernel(z[b].double(), [v - top for v in r], theta)
        assert kept[b].tolist() == sorted(reference_greedy_map(kernel, 7))


def test_options_are_checked():
    for bad in (0, 1, 1.5, -0.2, "0.5", True, math.nan):
        with pytest.raises(PruneError, match="theta must be None or a number in \\(0, 1\\)"):
            Selector.build("cdpruner", keep=4, options={"theta": bad})
    assert Selector.build("cdpruner", keep=4, options={"theta": np.float32(0.25)}).options == {
        "theta": 0.25
    }
    with pytest.raises(PruneError, match="has no option 'alpha'"):
        Selector.build("cdpruner", keep=4, options={"alpha": 1.0})


def test_an_engine_without_the_instruction_refuses_it():
    selector = Selector.build("cdpruner", keep=4)
    with pytest.raises(PruneError, match="needs instruction, which this vLLM model does not") as e:
        selector.check_provided(frozenset(), "vLLM model")
    # Named as usable: every method that needs nothing beyond features, tokens, projector.
    usable = "dart, divprune, grid, pool, random, sensitivity, zoo, zoo-sum"
    assert str(e.value).endswith(f"methods that apply: {usable}")


def test_a_family_without_prompt_extras_refuses_it(model, monkeypatch):
    monkeypatch.setattr(LlavaAdapter, "prompt_extras", frozenset())
    with pytest.raises(PruneError, match="needs instruction.*methods that apply: dart, divprune"):
        zooprune.prune(model, "cdpruner", keep=4)
    assert "forward" not in model.__dict__


# -- the instruction the Hugging Face engine gives --------------------------------------


@pytest.fixture
def spy():
    """A registered method that needs the instruction and logs what it is given."""
    seen = []

    @register_method("_instruction_spy", "test only", needs=("instruction",))
    def keep_first(tokens, k):
        seen.append((tokens.instruction.clone(), tokens.instruction_mask.clone()))
        return MethodResult(torch.arange(k).expand(tokens.projected.shape[0], -1))

    yield seen
    del METHODS["_instruction_spy"]


def test_the_instruction_is_the_embedded_text_of_each_images_prompt(spy, model, processor, images):
    prompts = [
        "<s> user <image> what is in the image ?",
        "<s> user <image> describe <image> this picture",
    ]
    batch = processor(
        images=[images[:1], images[1:3]], text=prompts, padding=True, return_tensors="pt"
    )
    ids, mask = batch["input_ids"], batch["attention_mask"]
    assert bool((mask == 0).any())  # left padding in the first prompt
    with zooprune.prune(model, "_instruction_spy", keep=4):
        model(**batch)
    ((text, text_mask),) = spy  # three images of one size: one batched call
    embed = model.get_input_embeddings()
    for image, row in enumerate([0, 1, 1]):
        words = ids[row][(mask[row] == 1) & (ids[row] != IMAGE)]
        assert PAD not in words.tolist() and IMAGE not in words.tolist()
        count = int(text_mask[image].sum())
        assert count == len(words) and bool(text_mask[image, :count].all())
        torch.testing.assert_close(text[image, :count], embed(words), rtol=0, atol=0)
        assert bool((text[image, count:] == 0).all())


def test_cdpruner_on_a_model_keeps_what_the_reference_keeps(model, processor, images):
    prompt = "<s> user what colour is the circle ? <image>"
    batch = processor(images=images[:1], text=[prompt], return_tensors="pt")
    ids = batch["input_ids"][0]
    with torch.no_grad():
        text = model.get_input_embeddings()(ids[ids != IMAGE]).double()
        image = model.model.get_image_features(pixel_values=batch["pixel_values"], return_dict=True)
    projected = image.pooler_output[0].double()  # [64, 48]: what fills the placeholders
    with zooprune.prune(model, "cdpruner", keep=10) as handle:
        model.generate(**batch, max_new_tokens=2, do_sample=False)
    r = reference_relevance(projected, text)
    expected = sorted(reference_greedy_map(reference_kernel(projected, r, None), 10))
    chosen = handle.selection.images[0]
    assert chosen.indices.tolist() == expected
    torch.testing.assert_close(chosen.scores.double(), torch.tensor(r, dtype=torch.float64))
