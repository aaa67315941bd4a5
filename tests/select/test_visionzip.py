import pytest
import torch
from transformers import CLIPVisionConfig, CLIPVisionModel

from zooprune.adapters.llava import _cls_attention_and_keys
from zooprune.select.visionzip import default_contextual, visionzip_select


def reference(attn, keys, x, project, k, contextual, cls=None):
    """Per-image loops over Python lists: the definition, spelled out. With ``cls`` (the
    CLS token's features) the CLS token is one of the dominant tokens and fills index 0's
    place; token 0 is then never dominant nor a target, but may be merged into one."""
    n = len(attn)
    candidates = range(1, n) if cls is not None else range(n)
    order = sorted(candidates, key=lambda i: (-float(attn[i]), i))
    dominant = order[: k - contextual - (cls is not None)]
    rest = sorted(set(range(n)) - set(dominant))
    merged_only = []
    if cls is not None:
        merged_only, rest = [0], [i for i in rest if i != 0]
    kept = {i: x[i] for i in dominant}
    if contextual:
        stride = max(1, len(rest) // contextual)
        targets = [rest[p] for p in range(0, len(rest), stride)][:contextual]
        groups = {t: [] for t in targets}
        unit = keys / keys.norm(dim=-1, keepdim=True)
        for i in merged_only + [i for i in rest if i not in groups]:
            best = max(targets, key=lambda t: (float(unit[i] @ unit[t]), -targets.index(t)))
            groups[best].append(i)
        kept |= {t: x[t] + (x[m].mean(dim=0) if m else 0) for t, m in groups.items()}
    if cls is not None:
        kept[0] = cls
    indices = sorted(kept)
    return indices, project(torch.stack([kept[i] for i in indices]))


@pytest.mark.parametrize(("k", "contextual"), [(1, 0), (10, 3), (16, 5), (30, 0), (40, 39)])
def test_matches_reference(k, contextual):
    g = torch.Generator().manual_seed(k)
    attn = torch.rand(2, 40, generator=g, dtype=torch.float64)
    keys = torch.randn(2, 40, 8, generator=g, dtype=torch.float64)
    x = torch.randn(2, 40, 5, generator=g, dtype=torch.float64)
    weight = torch.randn(5, 7, generator=g, dtype=torch.float64)
    project = lambda v: torch.tanh(v @ weight)  # noqa: E731
    indices, tokens = visionzip_select(attn, keys, x, project, k, contextual)
    for b in range(2):
        ref_idx, ref_tokens = reference(attn[b], keys[b], x[b], project, k, contextual)
        assert indices[b].tolist() == ref_idx
        torch.testing.assert_close(tokens[b], ref_tokens)


@pytest.mark.parametrize(("k", "contextual"), [(2, 0), (10, 3), (16, 5), (40, 39)])
def test_the_cls_token_among_the_dominant_ones_matches_the_reference(k, contextual):
    g = torch.Generator().manual_seed(100 + k)
    attn = torch.rand(2, 40, generator=g, dtype=torch.float64)
    attn[:, 1] = 2.0  # patch 1 is the most attended: dominant even beside the CLS token
    keys = torch.randn(2, 40, 8, generator=g, dtype=torch.float64)
    x = torch.randn(2, 40, 5, generator=g, dtype=torch.float64)
    cls = torch.randn(2, 5, generator=g, dtype=torch.float64)
    weight = torch.randn(5, 7, generator=g, dtype=torch.float64)
    project = lambda v: torch.tanh(v @ weight)  # noqa: E731
    indices, tokens = visionzip_select(attn, keys, x, project, k, contextual, cls_features=cls)
    for b in range(2):
        ref_idx, ref_tokens = reference(attn[b], keys[b], x[b], project, k, contextual, cls[b])
        assert indices[b].tolist() == ref_idx and 1 in ref_idx
        torch.testing.assert_close(tokens[b], ref_tokens)


def test_ties_and_short_keys_follow_the_definition():
    # Many equal attentions over 600 tokens (ties go to the lower index, which only a
    # stable sort keeps on a CPU) and keys far shorter than 1 (cosines are of directions).
    g = torch.Generator().manual_seed(7)
    attn = torch.randint(0, 3, (2, 600), generator=g).double()
    keys = torch.randn(2, 600, 8, generator=g, dtype=torch.float64)
    keys = keys * torch.rand(2, 600, 1, generator=g, dtype=torch.float64) * 1e-3
    x = torch.randn(2, 600, 5, generator=g, dtype=torch.float64)
    project = lambda v: v * 2  # noqa: E731
    indices, tokens = visionzip_select(attn, keys, x, project, 64, 10)
    for b in range(2):
        ref_idx, ref_tokens = reference(attn[b], keys[b], x[b], project, 64, 10)
        assert indices[b].tolist() == ref_idx
        torch.testing.assert_close(tokens[b], ref_tokens)


def test_bad_budgets_are_refused():
    attn, keys, x = torch.rand(1, 6), torch.randn(1, 6, 3), torch.randn(1, 6, 2)
    for k, contextual, message in [
        (0, 0, "k must be in"),
        (7, 0, "k must be in"),
        (3, 3, "contextual must be in"),
        (3, -1, "contextual must be in"),
    ]:
        with pytest.raises(ValueError, match=message):
            visionzip_select(attn, keys, x, lambda v: v, k, contextual)


def test_default_split_matches_visionzip():
    assert [(k - default_contextual(k), default_contextual(k)) for k in (64, 128, 192)] == [
        (54, 10),
        (108, 20),
        (162, 30),
    ]
    assert all(0 <= default_contextual(k) < k for k in range(1, 600))
    assert [default_contextual(k) for k in (1, 3, 4, 224, 288)] == [0, 0, 1, 35, 45]


def test_cls_attention_equals_eager_attention_weights():
    config = CLIPVisionConfig(
        image_size=24,
        patch_size=6,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
    )
    tower = CLIPVisionModel(config).eval()
    tower.set_attn_implementation("eager")
    pixels = torch.randn(2, 3, 24, 24)
    captured = {}
    layer = (
        tower.vision_model.encoder.layers[1]
        if hasattr(tower, "vision_model")
        else tower.encoder.layers[1]
    )
    hook = layer.self_attn.register_forward_pre_hook(
        lambda m, a, kw: captured.update(h=kw.get("hidden_states", a[0] if a else None)),
        with_kwargs=True,
    )
    out = tower(pixels, output_attentions=True)
    hook.remove()
    attn, keys = _cls_attention_and_keys(layer.self_attn, captured["h"])
    expected = out.attentions[1][:, :, 0].sum(dim=1)  # [B, T] CLS row, summed over heads
    torch.testing.assert_close(attn, expected, atol=1e-5, rtol=1e-5)
    assert keys.shape == (2, 17, 8)
