"""HoliTom against reference loops of its rule: the temporal cut against every cut, DPC-kNN
and the merge against per-point loops, and the whole method against a plain re-statement
of the published steps (segments, temporal merge, one ratio, attention and clusters)."""

import itertools
import math
from fractions import Fraction

import pytest
import torch

from zooprune import PruneError
from zooprune.pipeline import EncodedImages, ImageLayout, Selector
from zooprune.select import TokenSet, get_method
from zooprune.select.holitom import (
    dpc_knn_centres,
    frame_similarity,
    holitom_select,
    largest_remainder,
    merge_into_centres,
    static_segments,
)


def cuts(frames: int):
    """Every cut of ``frames`` frames into consecutive segments ``(first, last)``."""
    for bars in itertools.product([False, True], repeat=frames - 1):
        segments, first = [], 0
        for f, bar in enumerate(bars):
            if bar:
                segments.append((first, f))
                first = f + 1
        yield [*segments, (first, frames - 1)]


def removed(similarity: torch.Tensor, tau: float, segments) -> int:
    """Tokens a cut's temporal merge removes, position by position."""
    total = 0
    for first, last in segments:
        for p in range(similarity.shape[1]):
            if all(float(similarity[f, p]) > tau for f in range(first, last)):
                total += last - first
    return total


def video(frames: int, n: int, dim: int, seed: int, moving: float = 0.3) -> torch.Tensor:
    """``[frames, n, dim]`` frames that drift from the last: some positions barely move."""
    g = torch.Generator().manual_seed(seed)
    tokens = [torch.randn(n, dim, generator=g)]
    for _ in range(frames - 1):
        step = torch.randn(n, dim, generator=g) * torch.rand(n, 1, generator=g) * moving * 4
        tokens.append(tokens[-1] + step)
    return torch.stack(tokens)


@pytest.mark.parametrize("seed", range(6))
def test_the_cut_removes_as_many_as_the_best_of_every_cut(seed):
    tokens = video(6, 5, 4, seed)
    similarity = frame_similarity(tokens)
    tau = float(similarity.quantile(0.4))
    chosen = static_segments(similarity, tau)
    every = list(cuts(6))
    best = max(removed(similarity, tau, c) for c in every)
    assert removed(similarity, tau, chosen) == best > 0
    # Of the best cuts, the one whose segments, read from the end, are shortest.
    ties = [c for c in every if removed(similarity, tau, c) == best]
    assert chosen == min(ties, key=lambda c: [last - first for first, last in reversed(c)])


def test_frame_similarity_is_each_positions_cosine_between_neighbouring_frames():
    tokens = video(3, 4, 5, 0)
    similarity = frame_similarity(tokens)
    for f, p in itertools.product(range(2), range(4)):
        a, b = tokens[f, p], tokens[f + 1, p]
        assert math.isclose(
            float(similarity[f, p]), float(a @ b / (a.norm() * b.norm())), rel_tol=1e-5
        )


def reference_centres(points: torch.Tensor, count: int, knn: int) -> list[int]:
    """DPC-kNN point by point (in float64 from the float32 distances, so that a pair of
    mutual nearest points ties in density exactly as it does in float32)."""
    m, dim = points.shape
    p = points.float()
    dist = [[float((p[i] - p[j]).norm()) / math.sqrt(dim) for j in range(m)] for i in range(m)]
    near = min(knn, count, m)
    density = [math.exp(-sum(d * d for d in sorted(row)[:near]) / near) for row in dist]
    largest = max(max(row) for row in dist)
    score = []
    for i in range(m):
        # denser: a higher density, or an equal one at a lower index
        higher = [dist[i][j] for j in range(m) if (density[j], -j) > (density[i], -i)]
        score.append((min(higher) if higher else largest) * density[i])
    return sorted(sorted(range(m), key=lambda i: (-score[i], i))[:count])


@pytest.mark.parametrize(("m", "count", "knn"), [(12, 3, 7), (9, 9, 7), (15, 4, 2), (5, 1, 7)])
def test_dpc_knn_centres_are_the_point_by_point_ones(m, count, knn):
    points = torch.randn(m, 6, generator=torch.Generator().manual_seed(m + count))
    centres, distance = dpc_knn_centres(points, count, knn)
    assert centres.tolist() == reference_centres(points, count, knn)
    assert torch.allclose(distance, torch.cdist(points, points) / math.sqrt(6))


def clumps(seed: int, m: int = 20) -> torch.Tensor:
    """``m`` points around three centres: densities that squared and plain distances rank
    apart."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(3, 6, generator=g) * 3
    return centres[torch.randint(0, 3, (m,), generator=g)] + torch.randn(m, 6, generator=g)


@pytest.mark.parametrize("seed", [0, 1, 3])
def test_dpc_knn_centres_of_clumped_points_are_the_point_by_point_ones(seed):
    points = clumps(seed)
    assert dpc_knn_centres(points, 4, 7)[0].tolist() == reference_centres(points, 4, 7)


def test_equal_scores_go_to_the_lower_index():
    # Ten places, each held by six copies: a copy after the first scores 0 (its nearest
    # denser point is its twin), so the centres past the ten are the lowest-index copies.
    places = torch.randn(10, 4, generator=torch.Generator().manual_seed(0))
    points = places.repeat(6, 1)
    centres, _ = dpc_knn_centres(points, 24, 7)
    assert centres.tolist() == reference_centres(points, 24, 7)
    assert centres.tolist() == list(range(24))


def test_a_tie_in_density_goes_to_the_lower_index():
    # Two identical pairs: equal densities; the lower index of the denser pair leads.
    points = torch.tensor([[0.0, 0.0], [5.0, 5.0], [0.0, 0.0], [5.0, 5.0], [0.1, 0.0]])
    centres, _ = dpc_knn_centres(points, 2, 2)
    assert centres.tolist() in ([0, 1], [0, 3], [1, 2])  # one centre per clump
    assert 0 in centres.tolist() or 1 in centres.tolist()  # the lower index of a pair


def test_merging_averages_each_centres_members_beside_it():
    points = torch.randn(10, 3, generator=torch.Generator().manual_seed(4))
    centres = torch.tensor([1, 6, 8])
    distance = torch.cdist(points, points)
    merged = merge_into_centres(points, centres, distance, beta=0.6)
    for c, centre in enumerate(centres.tolist()):
        members = [
            i
            for i in range(10)
            if i not in centres.tolist()
            and min(centres.tolist(), key=lambda j: (float(distance[i, j]), j)) == centre
        ]
        want = points[centre]
        if members:
            want = 0.6 * points[centre] + 0.4 * points[members].mean(dim=0)
        torch.testing.assert_close(merged[c], want)


@pytest.mark.parametrize(
    ("total", "sizes"),
    [(7, [3, 3, 3]), (10, [1, 5, 9, 2]), (0, [4, 4]), (12, [3, 4, 5]), (5, [9]), (5, [1, 2, 4])],
)
def test_largest_remainder_sums_to_the_total_with_each_part_within_one_of_its_share(total, sizes):
    parts = largest_remainder(total, sizes)
    shares = [Fraction(total * s, sum(sizes)) for s in sizes]
    assert sum(parts) == total
    assert all(math.floor(x) <= p <= math.ceil(x) for p, x in zip(parts, shares, strict=True))
    # The ones rounded up have the largest fractions.
    up = [x - math.floor(x) for p, x in zip(parts, shares, strict=True) if p > math.floor(x)]
    down = [x - math.floor(x) for p, x in zip(parts, shares, strict=True) if p == math.floor(x)]
    assert not up or not down or min(up) >= max(down)
    if (total, sizes) == (5, [1, 2, 4]):  # shares 0.71, 1.43, 2.86: the last, then the first
        assert parts == [1, 1, 3]


def reference_holitom(tokens, attention, k, tau, beta, knn):
    """The published steps, written out plainly: the best cut (by trying every cut),
    static positions merged into the segment's first frame, the least static kept per
    frame until K fits, one ratio over the groups, attention for the dynamic tokens,
    DPC-kNN for the static ones. Returns ``{index: token}``."""
    frames, n, _ = tokens.shape
    similarity = frame_similarity(tokens)
    every = list(cuts(frames))
    best = max(removed(similarity, tau, c) for c in every)
    ties = [c for c in every if removed(similarity, tau, c) == best]
    segments = min(ties, key=lambda c: [last - first for first, last in reversed(c)])
    static = {}
    for s, (first, last) in enumerate(segments):
        for p in range(n):
            low = min((float(similarity[f, p]) for f in range(first, last)), default=-math.inf)
            if low > tau:
                static[(s, p)] = low
    left = frames * n - sum(segments[s][1] - segments[s][0] for s, _ in static)
    for s, p in sorted(static, key=lambda key: (static[key], key)):
        if left >= k:
            break
        del static[(s, p)]
        left += segments[s][1] - segments[s][0]
    groups = []  # (frame, positions, static, segment)
    for s, (first, last) in enumerate(segments):
        still = [p for p in range(n) if (s, p) in static]
        if still:
            groups.append((first, still, True, (first, last)))
        moving = [p for p in range(n) if (s, p) not in static]
        groups.extend((f, moving, False, (first, last)) for f in range(first, last + 1))
    counts = largest_remainder(k, [len(g[1]) for g in groups])
    kept = {}
    for (frame, positions, is_static, (first, last)), count in zip(groups, counts, strict=True):
        if not count:
            continue
        if is_static:
            means = tokens[first : last + 1][:, positions].mean(dim=0)
            centres = reference_centres(means, count, knn)
            for c in centres:
                members = [
                    i
                    for i in range(len(positions))
                    if i not in centres
                    and min(centres, key=lambda j: (float((means[i] - means[j]).norm()), j)) == c
                ]
                token = means[c]
                if members:
                    token = beta * means[c] + (1 - beta) * means[members].mean(dim=0)
                kept[frame * n + positions[c]] = token
        else:
            ranked = sorted(positions, key=lambda p: (-float(attention[frame, p]), p))
            for p in ranked[:count]:
                kept[frame * n + p] = tokens[frame, p]
    return kept


@pytest.mark.parametrize(
    ("seed", "k", "tau"),
    [(0, 9, 0.8), (1, 20, 0.7), (2, 5, 0.9), (3, 30, 0.6), (4, 44, 0.5), (5, 1, 0.8)],
)
def test_holitom_keeps_what_the_published_steps_keep(seed, k, tau):
    frames, n = 5, 9
    tokens = video(frames, n, 8, seed, moving=0.15)
    attention = torch.rand(frames, n, generator=torch.Generator().manual_seed(seed + 50))
    indices, merged, segments = holitom_select(tokens, attention, k, tau=tau, beta=0.6, knn=7)
    want = reference_holitom(tokens, attention, k, tau, 0.6, 7)
    assert indices.tolist() == sorted(want)
    torch.testing.assert_close(merged, torch.stack([want[i] for i in sorted(want)]))
    assert any(last > first for first, last in segments)  # something merged over time


@pytest.mark.parametrize("k", range(1, 25))
def test_holitom_keeps_exactly_k_distinct_tokens_for_every_budget(k):
    tokens = video(4, 6, 5, 7, moving=0.1)
    attention = torch.rand(4, 6, generator=torch.Generator().manual_seed(1))
    indices, merged, _ = holitom_select(tokens, attention, k)
    assert indices.shape == (k,) and merged.shape == (k, 5)
    assert bool((indices[1:] > indices[:-1]).all())


def test_a_still_video_keeps_its_first_frame_merged_and_a_changing_one_each_frames_best():
    frame = torch.randn(9, 4, generator=torch.Generator().manual_seed(0))
    still = frame.expand(3, 9, 4).clone()
    attention = torch.rand(3, 9, generator=torch.Generator().manual_seed(2))
    indices, merged, segments = holitom_select(still, attention, 4)
    assert segments == [(0, 2)] and bool((indices < 9).all())  # all in the first frame
    # Frames unlike each other (no cosine above 0.99): each frame keeps its highest
    # attention, the budget shared by largest remainder.
    changing = torch.randn(3, 9, 4, generator=torch.Generator().manual_seed(1))
    indices, merged, segments = holitom_select(changing, attention, 7, tau=0.99)
    assert segments == [(0, 0), (1, 1), (2, 2)]
    want = [f * 9 + p for f, c in enumerate([3, 2, 2]) for p in attention[f].topk(c).indices]
    assert indices.tolist() == sorted(want)
    torch.testing.assert_close(merged, changing.reshape(27, 4)[indices])


def test_a_cosine_equal_to_tau_is_not_similar():
    # Each position turns by a right angle between frames: a cosine of exactly 0.
    first = torch.tensor([[1.0, 0.0], [0.0, 2.0], [3.0, 0.0], [0.0, 1.0]])
    turned = first.flip(-1)
    tokens = torch.stack([first, turned, first])
    assert bool((frame_similarity(tokens) == 0).all())
    assert static_segments(frame_similarity(tokens), 0.0) == [(0, 0), (1, 1), (2, 2)]
    _, _, segments = holitom_select(tokens, torch.rand(3, 4), 6, tau=0.0)
    assert segments == [(0, 0), (1, 1), (2, 2)]
    _, _, segments = holitom_select(tokens, torch.rand(3, 4), 6, tau=-0.5)
    assert segments == [(0, 2)]


def test_a_position_at_tau_stays_dynamic_in_a_segment_others_make():
    # Position 0 stays put (cosine 1), position 1 turns by a right angle (cosine 0 = tau):
    # the frames form one segment, position 0 merges, position 1 keeps its own tokens.
    tokens = torch.tensor([[[1.0, 0.0], [0.0, 1.0]], [[1.0, 0.0], [1.0, 0.0]]])
    indices, merged, segments = holitom_select(tokens, torch.ones(2, 2), 2, tau=0.0)
    assert segments == [(0, 1)]
    assert indices.tolist() == [0, 1]
    torch.testing.assert_close(merged, torch.tensor([[1.0, 0.0], [0.0, 1.0]]))


def test_equal_attention_goes_to_the_lower_position():
    attention = torch.randint(0, 3, (1, 400), generator=torch.Generator().manual_seed(0))
    tokens = torch.randn(1, 400, 3, generator=torch.Generator().manual_seed(1))
    indices, _, _ = holitom_select(tokens, attention.float(), 150)
    ranked = sorted(range(400), key=lambda p: (-int(attention[0, p]), p))
    assert indices.tolist() == sorted(ranked[:150])


def test_a_budget_above_what_the_merge_leaves_keeps_the_least_static_per_frame():
    # Two identical frames: merging leaves 9 tokens; keep=12 puts back the 3 positions
    # whose tokens changed the most (the least similar), one token per frame each.
    first = torch.randn(9, 4, generator=torch.Generator().manual_seed(3))
    second = first.clone()
    second[[2, 5, 7]] += 0.05 * torch.randn(3, 4, generator=torch.Generator().manual_seed(5))
    indices, _, _ = holitom_select(torch.stack([first, second]), torch.rand(2, 9), 12, tau=0.5)
    assert indices.tolist() == sorted([*range(9), 9 + 2, 9 + 5, 9 + 7])

    # The same two frames after a frame unlike them: the segment starts at frame 1, and
    # each position put back adds one token (its segment's length less one).
    other = torch.randn(9, 4, generator=torch.Generator().manual_seed(6))
    three = torch.stack([other, first, second])
    indices, _, segments = holitom_select(three, torch.rand(3, 9), 21, tau=0.5)
    assert segments == [(0, 0), (1, 2)]
    assert indices.tolist() == sorted([*range(18), 18 + 2, 18 + 5, 18 + 7])


def tokens_of(tokens: torch.Tensor, attention: torch.Tensor) -> TokenSet:
    frames, n, dim = tokens.shape
    flat = tokens.reshape(1, frames * n, dim)
    side = int(n**0.5)
    return TokenSet(
        features=flat,
        projected=flat,
        projector=torch.nn.Identity(),
        grid=(side, side),
        frames=frames,
        tower_attention=attention.reshape(1, -1),
    )


def test_the_registered_method_runs_each_video_of_a_batch_on_its_own():
    a, b = video(3, 4, 5, 0, 0.1), video(3, 4, 5, 1, 0.1)
    attention = torch.rand(2, 3, 4, generator=torch.Generator().manual_seed(0))
    both = tokens_of(torch.cat([a, b]), attention.reshape(6, 4))
    both = TokenSet(
        features=torch.stack([a.reshape(12, 5), b.reshape(12, 5)]),
        projected=torch.stack([a.reshape(12, 5), b.reshape(12, 5)]),
        projector=torch.nn.Identity(),
        grid=(2, 2),
        frames=3,
        tower_attention=attention.reshape(2, 12),
    )
    result = get_method("holitom")(both, 5, tau=0.5)
    for row, one in enumerate((a, b)):
        indices, merged, _ = holitom_select(one, attention[row], 5, tau=0.5)
        assert torch.equal(result.indices[row], indices)
        torch.testing.assert_close(result.tokens[row], merged)


def test_the_pipeline_hands_holitom_whole_videos_and_refuses_images():
    frames, side, dim = 3, 2, 5
    clip = video(frames, side * side, dim, 0, 0.1).reshape(-1, dim)
    attention = torch.rand(frames * side * side)
    layout = ImageLayout.frames(clip, (side, side), frames)
    encoded = EncodedImages(
        features=[clip],
        projected=[clip],
        grids=[(side, side)],
        cls_attention=None,
        keys=None,
        encoder_output=None,
        layouts=[layout],
        tower_attention=[attention],
    )
    selector = Selector.build("holitom", keep=5, options={"tau": 0.5})
    kept = selector.select(encoded, torch.nn.Identity())
    indices, merged, _ = holitom_select(
        clip.reshape(frames, -1, dim), attention.reshape(frames, -1), 5, tau=0.5
    )
    assert torch.equal(kept.images[0].indices, indices)
    torch.testing.assert_close(kept.images[0].run, merged)
    image = EncodedImages(
        features=[clip[:4]],
        projected=[clip[:4]],
        grids=[(side, side)],
        cls_attention=None,
        keys=None,
        encoder_output=None,
        tower_attention=[attention[:4]],
    )
    with pytest.raises(PruneError, match="prunes videos only, and image 0 is an image"):
        selector.select(image, torch.nn.Identity())


def test_holitoms_own_defaults_are_the_registered_methods():
    import inspect

    own = inspect.signature(holitom_select).parameters
    defaults = {name: own[name].default for name in ("tau", "beta", "knn")}
    assert defaults == get_method("holitom").options
