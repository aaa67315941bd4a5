"""VisPruner and MMTok against their rules computed the slow, obvious way: lists and loops
for VisPruner's rounds, MMTok's coverage function evaluated whole for every candidate."""

import math

import pytest
import torch
from torch import nn

import zooprune
from zooprune import PruneError
from zooprune.select import METHODS, TokenSet

from .test_cdpruner import cosine


def token_set(seed: int, n: int, batch: int = 2, text: int = 5) -> TokenSet:
    g = torch.Generator().manual_seed(seed)
    projector = nn.Sequential(nn.Linear(6, 12), nn.GELU(), nn.Linear(12, 8))
    with torch.no_grad():
        for p in projector.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)
        features = torch.randn(batch, n, 6, generator=g)
        projected = projector(features)
    mask = torch.ones(batch, text, dtype=torch.bool)
    mask[1, text - 2 :] = False  # the second image's instruction is shorter (padded)
    return TokenSet(
        features,
        projected,
        projector,
        (1, n),
        cls_attention=torch.rand(batch, n, generator=g),
        instruction=torch.randn(batch, text, 8, generator=g),
        instruction_mask=mask,
    )


# -- VisPruner ----------------------------------------------------------------------------


def reference_vispruner(attention, features, k, ratio):
    n = len(attention)
    order = sorted(range(n), key=lambda i: (-attention[i], i))
    important = int(k * ratio)
    kept, rest, diverse = order[:important], order[important:], k - important
    while diverse > 0 and len(rest) > diverse:
        a, b = rest[0::2], rest[1::2]
        removed = min(8, len(rest) - diverse, len(a))
        score = [max(cosine(features[i], features[j]) for j in b) for i in a]
        by_score = sorted(range(len(a)), key=lambda p: (-score[p], p))
        rest = [a[p] for p in by_score[removed:]] + b
    return sorted(kept + rest[:diverse])


@pytest.mark.parametrize("n", [9, 24, 50])
@pytest.mark.parametrize("ratio", [0.0, 0.5, 0.75, 1.0])
def test_vispruner_matches_the_rounds_by_hand(n, ratio):
    t = token_set(n, n)
    for k in sorted({1, 2, 7, n // 2, n}):
        got = METHODS["vispruner"](t, k, important_ratio=ratio)
        for b in range(2):
            expected = reference_vispruner(
                t.cls_attention[b].tolist(), t.features[b].double(), k, ratio
            )
            assert got.indices[b].tolist() == expected, (k, b)
        assert got.details == {"important": int(k * ratio), "diverse": k - int(k * ratio)}


def test_vispruner_drops_the_tokens_of_a_that_duplicate_b():
    # Token 0 is important; the rest, by attention: A = 1, 3, 5 and B = 2, 4, 6, with 1 a
    # copy of 2 and 3 of 4. One round removes 2 of A (6 left, 4 wanted): the copies.
    features = torch.tensor(
        [[1, 1, 1], [0, 0, 1], [0, 0, 1], [0, 1, 0], [0, 1, 0], [1, 0, 0], [1, -1, -1]],
        dtype=torch.float,
    )
    attention = torch.arange(7, 0, -1, dtype=torch.float)
    t = TokenSet(
        features[None], features[None], nn.Identity(), (1, 7), cls_attention=attention[None]
    )
    picks = METHODS["vispruner"](t, 5, important_ratio=0.2).indices[0].tolist()
    assert picks == [0, 2, 4, 5, 6]
    assert picks == reference_vispruner(attention.tolist(), features.double(), 5, 0.2)


# -- MMTok --------------------------------------------------------------------------------


def softmax(values):
    top = max(values)
    e = [math.exp(v - top) for v in values]
    return [x / sum(e) for x in e]


def reference_coverage(z, v, text, alpha, tau_t, tau_v):
    """The rows to cover: P (text) then alpha Q (image), from the definitions."""
    n, m = len(z), len(text)
    rows = [[p / m for p in softmax([cosine(t, z[j]) / tau_t for j in range(n)])] for t in text]
    rows += [
        [alpha * q / n for q in softmax([cosine(v[row], v[j]) / tau_v for j in range(n)])]
        for row in range(n)
    ]
    return rows


def coverage(rows, chosen):
    return sum(max((row[j] for j in chosen), default=0.0) for row in rows)


def reference_mmtok(rows, n, k):
    """Greedy on F: every candidate's F(S + j) computed whole; ties to the lowest index."""
    chosen = []
    for _ in range(k):
        base = coverage(rows, chosen)
        gains = {j: coverage(rows, chosen + [j]) - base for j in range(n) if j not in chosen}
        best = max(gains.values())
        chosen.append(min(j for j, g in gains.items() if g >= best - 1e-9))
    return sorted(chosen)


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize(
    ("alpha", "tau_t", "tau_v"), [(0.5, 0.02, 0.2), (0.0, 0.1, 0.2), (3.0, 0.5, 0.05)]
)
def test_mmtok_is_the_greedy_of_the_coverage_function(seed, alpha, tau_t, tau_v):
    n, k = 20, 6
    t = token_set(seed, n)
    got = METHODS["mmtok"](
        t, k, alpha=alpha, text_temperature=tau_t, vision_temperature=tau_v
    ).indices
    for b in range(2):
        text = t.instruction[b][t.instruction_mask[b]].double()
        rows = reference_coverage(
            t.projected[b].double(), t.features[b].double(), text, alpha, tau_t, tau_v
        )
        assert got[b].tolist() == reference_mmtok(rows, n, k), b


def test_the_coverage_matrix_is_the_definition(seed=5):
    # one image with a single real instruction token, one with 4: each text row shares 1/m
    from zooprune.select.mmtok import coverage_matrix

    t = token_set(seed, 12, text=4)
    mask = torch.tensor([[True, False, False, False], [True, True, True, True]])
    got = coverage_matrix(
        t.projected,
        t.features,
        t.instruction,
        mask,
        alpha=0.7,
        text_temperature=0.1,
        vision_temperature=0.3,
    )
    for b in range(2):
        text = t.instruction[b][mask[b]].double()
        rows = reference_coverage(
            t.projected[b].double(), t.features[b].double(), text, 0.7, 0.1, 0.3
        )
        real = got[b][torch.cat([mask[b], torch.ones(12, dtype=torch.bool)])]
        expected = torch.tensor(rows, dtype=torch.float64)
        torch.testing.assert_close(real.double(), expected, rtol=1e-5, atol=1e-7)
        assert bool((got[b][:4][~mask[b]] == 0).all())  # padding covers nothing


def test_mmtok_keeps_one_token_if_asked():
    t = token_set(6, 10)
    got = METHODS["mmtok"](t, 1).indices
    for b in range(2):
        text = t.instruction[b][t.instruction_mask[b]].double()
        rows = reference_coverage(
            t.projected[b].double(), t.features[b].double(), text, 0.5, 0.02, 0.2
        )
        assert got[b].tolist() == reference_mmtok(rows, 10, 1)


def test_mmtok_without_an_instruction_covers_the_image_alone():
    t = token_set(3, 16)
    empty = TokenSet(
        t.features,
        t.projected,
        t.projector,
        t.grid,
        instruction=t.instruction,
        instruction_mask=torch.zeros_like(t.instruction_mask),
    )
    got = METHODS["mmtok"](empty, 5).indices
    for b in range(2):
        rows = reference_coverage(
            t.projected[b].double(), t.features[b].double(), [], 0.5, 0.02, 0.2
        )
        assert got[b].tolist() == reference_mmtok(rows, 16, 5)


def test_options_are_checked_on_prune(model):
    with pytest.raises(PruneError, match=r"important_ratio must be a number in \[0, 1\]"):
        zooprune.prune(model, "vispruner", keep=4, important_ratio=1.5)
    with pytest.raises(PruneError, match="text_temperature must be finite and positive"):
        zooprune.prune(model, "mmtok", keep=4, text_temperature=0)
    with pytest.raises(PruneError, match="alpha must be a number"):
        zooprune.prune(model, "mmtok", keep=4, alpha=-1)
