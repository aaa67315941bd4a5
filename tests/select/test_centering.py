"""Cen-Prune's correction (``center=True`` on zoo, zoo-sum, divprune, cdpruner) against the
paper's rules computed the slow, obvious way: means and cosines by loops, the greedy by
rescoring every candidate, the DPP by determinants."""

import pytest
import torch
from torch import nn

import zooprune
from zooprune import PruneError
from zooprune.select import METHODS, TokenSet
from zooprune.select.cdpruner import instruction_relevance
from zooprune.select.centering import centred, distinctiveness

from .test_cdpruner import cosine, reference_greedy_map

N, D_V, D_L = 24, 6, 10


def tokens(seed: int, batch: int = 2, shared: float = 3.0) -> TokenSet:
    """Images whose tokens share a large common direction (one per image), as projected
    tokens do: the case the correction is for."""
    g = torch.Generator().manual_seed(seed)
    projector = nn.Sequential(nn.Linear(D_V, 16), nn.GELU(), nn.Linear(16, D_L))
    with torch.no_grad():
        for p in projector.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)
        features = torch.randn(batch, N, D_V, generator=g)
        projected = projector(features)
        projected += shared * torch.randn(batch, 1, D_L, generator=g)
    text = torch.randn(batch, 5, D_L, generator=g)
    mask = torch.ones(batch, 5, dtype=torch.bool)
    return TokenSet(features, projected, projector, (4, 6), instruction=text, instruction_mask=mask)


def ref_centred_cosines(x: torch.Tensor) -> list[list[float]]:
    n = len(x)
    mu = sum(x[i].double() for i in range(n)) / n
    c = [x[i].double() - mu for i in range(n)]
    return [[cosine(c[i], c[j]) for j in range(n)] for i in range(n)]


def ref_distinctiveness(x: torch.Tensor) -> list[float]:
    n = len(x)
    g = [
        -sum(cosine(x[i].double(), x[j].double()) for j in range(n) if j != i) / (n - 1)
        for i in range(n)
    ]
    low, high = min(g), max(g)
    return [(v - low) / (high - low + 1e-8) for v in g]


def ref_greedy(distance, weight, k, first):
    """first: 'farthest_neighbour' (DivPrune) or 'max_weight' (ZOO-Prune); then each step
    the unpicked token of largest weight x distance to its nearest pick (ties: lowest)."""
    n = len(distance)
    if first == "farthest_neighbour":
        nearest = [min(distance[i][j] for j in range(n) if j != i) for i in range(n)]
        picks = [max(range(n), key=lambda i: (nearest[i], -i))]
    else:
        picks = [max(range(n), key=lambda i: (weight[i], -i))]
    while len(picks) < k:
        score = {
            i: weight[i] * min(distance[i][p] for p in picks) for i in range(n) if i not in picks
        }
        picks.append(max(score, key=lambda i: (score[i], -i)))
    return sorted(picks)


def ref_minmax(values: list[float]) -> list[float]:
    low, high = min(values), max(values)
    return [(v - low) / (high - low + 1e-8) for v in values]


def test_centring_and_distinctiveness_match_their_definitions():
    t = tokens(0)
    got_c, got_g = centred(t.projected), distinctiveness(t.projected)
    for b in range(2):  # each image is centred on its own mean
        x = t.projected[b]
        cos = ref_centred_cosines(x)
        for i in range(N):
            for j in range(N):
                assert cosine(got_c[b, i].double(), got_c[b, j].double()) == pytest.approx(
                    cos[i][j], abs=1e-5
                )
        assert got_g[b].tolist() == pytest.approx(ref_distinctiveness(x), abs=1e-5)


@pytest.mark.parametrize("seed", [1, 2, 3])
@pytest.mark.parametrize("k", [1, 6, 12])
def test_divprune_and_zoo_centred_match_the_reference_greedy(seed, k):
    t = tokens(seed)
    divprune = METHODS["divprune"](t, k, center=True).indices
    zoo = METHODS["zoo"](t, k, center=True).indices
    sensitivity = METHODS["sensitivity"](t, k).scores
    for b in range(2):
        x = t.projected[b]
        distance = [[1 - c for c in row] for row in ref_centred_cosines(x)]
        distinct = ref_distinctiveness(x)
        assert divprune[b].tolist() == ref_greedy(distance, distinct, k, "farthest_neighbour")
        weight = [s * g for s, g in zip(ref_minmax(sensitivity[b].tolist()), distinct, strict=True)]
        assert zoo[b].tolist() == ref_greedy(distance, weight, k, "max_weight")


@pytest.mark.parametrize("theta", [None, 0.5])
@pytest.mark.parametrize("seed", [1, 2])
def test_cdpruner_centred_matches_the_determinant_reference(seed, theta):
    t, k = tokens(seed), 8
    picks = METHODS["cdpruner"](t, k, theta=theta, center=True).indices
    relevance = instruction_relevance(t.projected, t.instruction, t.instruction_mask)
    for b in range(2):
        x = t.projected[b]
        cos = ref_centred_cosines(x)
        r = relevance[b].double().tolist()
        if theta is not None:
            alpha = theta / (2 * (1 - theta))
            r = [torch.tensor(alpha * (v - max(r))).exp().item() for v in r]
        q = [a * g for a, g in zip(r, ref_distinctiveness(x), strict=True)]
        kernel = torch.tensor([[q[i] * cos[i][j] * q[j] for j in range(N)] for i in range(N)])
        assert picks[b].tolist() == sorted(reference_greedy_map(kernel, k))


def test_the_correction_changes_what_is_kept():
    # Not a no-op: on tokens with a shared component each method keeps other tokens.
    t = tokens(4)
    for name in ("zoo", "zoo-sum", "divprune", "cdpruner"):
        plain = METHODS[name](t, 8).indices
        assert not torch.equal(plain, METHODS[name](t, 8, center=True).indices), name


def test_center_is_an_option_of_the_diversity_methods_only_and_checked(model):
    with pytest.raises(PruneError, match="method 'sensitivity' has no option 'center'"):
        zooprune.prune(model, "sensitivity", keep=4, center=True)
    with pytest.raises(PruneError, match="center must be True or False, got 1"):
        zooprune.prune(model, "divprune", keep=4, center=1)
