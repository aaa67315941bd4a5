"""PyramidDrop: FastV's ranking in stages (``zooprune.lm_stage``, several drops).

On the families' tiny 4-layer models of ``tests/test_fastv.py``: ``stages=3`` drops after
layers 0, 1 and 2 (stages start at layers 1, 2, 3). The references say what a stage
means without the stage's code: the unpruned model with each stage's dropped tokens
masked out of attention from that stage's first layer on, and each stage's ranking the
eager attention of the layer before it under the earlier stages' masks.
"""

from __future__ import annotations

import pytest
import torch

import zooprune
from tests import test_fastv
from tests.adapters.conformance import image_inputs
from tests.test_fastv import DEPTH, banned, greedy, one_prompt
from zooprune import METHODS, PruneError, lm_stage
from zooprune.bench.equal_flops import PrefillCost, PromptSizes
from zooprune.bench.flops import language_model as lm_shapes
from zooprune.lm_stage import language_model
from zooprune.select.fastv import top_k_ascending
from zooprune.select.pdrop import pdrop_keeps, pdrop_layers

# the same tiny 4-layer families as FastV's tests
family, vlm = test_fastv.family, test_fastv.vlm


def test_stages_split_the_lm_evenly_and_keep_a_geometric_series():
    assert pdrop_layers({"stages": 3}, 32) == [8, 16, 24]  # the authors' LLaVA-1.5 cuts
    assert pdrop_layers({"stages": 3}, 4) == [1, 2, 3]
    # unset: 3 stages, or one per layer after the first where the LM is shallower
    assert pdrop_layers({"stages": None}, 32) == [8, 16, 24]
    assert pdrop_layers({"stages": None}, 3) == [1, 2]
    assert pdrop_layers({"stages": None}, 2) == [1]
    assert pdrop_keeps({}, 576, 72, 3) == [288, 144, 72]  # lambda = 0.5
    assert pdrop_keeps({}, 576, 64, 1) == [64]
    keeps = pdrop_keeps({}, 576, 7, 4)
    assert keeps == sorted(keeps, reverse=True) and keeps[-1] == 7 and keeps[0] < 576
    spec = METHODS["pdrop"]
    held = spec.layer_tokens({}, 576, 72, 32)
    assert held == [576] * 8 + [288] * 8 + [144] * 8 + [72] * 8
    # at equal K its later stages cost more than FastV's at its first cut: about half the
    # unpruned prefill (576 tokens for 8 layers, then 288, 144, 72)
    cost = PrefillCost(lm_shapes(4096, 32, 11008, 4096, 32000), PromptSizes((40,), (576,)))
    fastv = cost.relative(METHODS["fastv"], {"layer": 8}, [72])
    assert cost.relative_before_lm(0.125) < fastv < cost.relative(spec, {}, [72]) < 0.51


def stage_drops(batch, tester, selection) -> list[torch.Tensor]:
    """Prompt 0's placeholder columns each stage dropped."""
    columns = (batch["input_ids"][0] == tester.image_token).nonzero().flatten()
    held = set(range(columns.numel()))
    drops = []
    for kept in selection.details["stages"]:
        now = set(kept[0])
        drops.append(columns[sorted(held - now)])
        held = now
    return drops


def masked_by_stage(model, batch, layers, drops, **extra):
    """The unpruned model with stage s's dropped columns masked out of attention in
    layers ``>= layers[s]``. One prompt, no padding. The masks are additive (0 or the
    lowest float), which the eager attention needs as SDPA does not."""
    length = batch["input_ids"].shape[1]
    hooks = []
    for index, layer in enumerate(language_model(model).layers):
        allowed = torch.ones(length, length, dtype=torch.bool).tril()
        for first, dropped in zip(layers, drops, strict=True):
            if index >= first:
                allowed[:, dropped] = False
        lowest = torch.finfo(torch.float32).min
        mask = torch.zeros(allowed.shape).masked_fill(~allowed, lowest)[None, None]

        def hide(module, args, kwargs, mask=mask):
            return args, kwargs | {"attention_mask": mask}

        hooks.append(layer.register_forward_pre_hook(hide, with_kwargs=True))
    try:
        with torch.no_grad():
            return model(**batch, **extra)
    finally:
        for hook in hooks:
            hook.remove()


def test_pruned_forward_equals_masking_each_stages_drops_from_its_first_layer(family, vlm):
    tester = family[0]
    batch = one_prompt(family)
    with zooprune.prune(vlm, "pdrop", keep=tester.keep, stages=3) as handle:
        pruned = vlm(**batch).logits
    details = handle.selection.details
    assert details["layers"] == [1, 2, 3]
    sizes = [len(kept[0]) for kept in details["stages"]]
    n = handle.selection.images[0].num_tokens
    assert sizes == pdrop_keeps({}, n, tester.keep, 3) and sizes[-1] == handle.selection.kept
    assert sizes[0] > sizes[1] > sizes[2]  # three real drops
    drops = stage_drops(batch, tester, handle.selection)
    keep = torch.ones(batch["input_ids"].shape[1], dtype=torch.bool)
    keep[torch.cat(drops)] = False
    reference = masked_by_stage(vlm, batch, [1, 2, 3], drops).logits
    torch.testing.assert_close(pruned[0], reference[0, keep], rtol=0, atol=1e-5)
    # all drops at the first stage (FastV at layer 1 with the same picks) is another model
    earlier = masked_by_stage(vlm, batch, [1, 1, 1], drops).logits
    assert not torch.allclose(pruned[0], earlier[0, keep], rtol=0, atol=1e-3)


def test_each_stage_ranks_by_the_attention_of_the_layer_before_it(family):
    tester, path, _, _ = family
    eager = tester.load(path, attn_implementation="eager")
    batch = one_prompt(family)
    with zooprune.prune(eager, "pdrop", keep=tester.keep, stages=3) as handle:
        eager(**batch)
    stages = handle.selection.details["stages"]
    drops = stage_drops(batch, tester, handle.selection)
    attentions = masked_by_stage(eager, batch, [1, 2, 3], drops, output_attentions=True)
    columns = (batch["input_ids"][0] == tester.image_token).nonzero().flatten()
    held = list(range(columns.numel()))
    for stage, kept in enumerate(stages):
        scores = attentions.attentions[stage][0, :, -1, columns[held]].mean(dim=0)
        top = scores.argsort(descending=True, stable=True)[: len(kept[0])]
        assert sorted(held[i] for i in top.tolist()) == kept[0], stage
        held = kept[0]
    first = attentions.attentions[0][0, :, -1, columns].mean(dim=0)
    torch.testing.assert_close(handle.selection.images[0].scores, first, rtol=0, atol=1e-6)


def test_one_stage_is_fastv(family, vlm):
    tester = family[0]
    batch = one_prompt(family, picture=1)
    with zooprune.prune(vlm, "pdrop", keep=tester.keep, stages=1) as handle:
        pdrop = vlm(**batch).logits
        picks = handle.selection.indices
    with zooprune.prune(vlm, "fastv", keep=tester.keep, layer=DEPTH // 2) as handle:
        fastv = vlm(**batch).logits
        assert all(torch.equal(a, b) for a, b in zip(picks, handle.selection.indices, strict=True))
    torch.testing.assert_close(pdrop, fastv, rtol=0, atol=0)


def test_generate_with_cache_equals_the_uncached_loop(family, vlm):
    tester = family[0]
    batch = one_prompt(family, picture=3, prompt=0)
    prompt = batch["input_ids"].shape[1]
    with zooprune.prune(vlm, "pdrop", keep=tester.keep) as handle:
        generated = greedy(vlm, tester, batch, 6)
        stages = handle.selection.details["stages"]
        ids = batch["input_ids"]
        with handle.query_at(prompt - 1):
            for _ in range(6):
                logits = vlm(
                    input_ids=ids, **image_inputs(batch), **tester.step_inputs(ids), use_cache=False
                ).logits
                logits[..., banned(tester)] = float("-inf")
                ids = torch.cat([ids, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
                assert handle.selection.details["stages"] == stages
    assert torch.equal(generated, ids)


def record_rankings(monkeypatch) -> list[torch.Tensor]:
    """Every score vector the stage ranks, in order (its top-k, wrapped)."""
    ranked: list[torch.Tensor] = []

    def top_k(scores, k):
        ranked.append(scores)
        return top_k_ascending(scores, k)

    monkeypatch.setattr(lm_stage, "top_k_ascending", top_k)
    return ranked


def three_prompts(family):
    """Prompts of different lengths, one with two images, left-padded into one batch:
    ``(prompts, images per prompt, batch)``."""
    tester, _, proc, pictures = family
    image = tester.image_text
    prompts = [tester.prompts[0], f"{tester.prompts[1]} {image} and this ?", tester.prompts[2]]
    per_prompt = [pictures[:1], pictures[1:3], pictures[3:4]]
    batch = tester.inputs(proc, per_prompt, prompts)
    assert bool((batch["attention_mask"][:, 0] == 0).any())
    return prompts, per_prompt, batch


def assert_ranked_alike(ranked, per_prompt, stages: int) -> None:
    """``ranked``: the batch's scores (stage by stage, image by image), then each prompt's
    alone (likewise): each image's scores at each stage equal (1e-6)."""
    images = sum(len(group) for group in per_prompt)
    together, start, first = ranked[: images * stages], images * stages, 0
    for group in per_prompt:
        alone = ranked[start : start + len(group) * stages]
        start += len(group) * stages
        for stage in range(stages):
            for i in range(len(group)):
                torch.testing.assert_close(
                    together[stage * images + first + i],
                    alone[stage * len(group) + i],
                    rtol=0,
                    atol=1e-6,
                )
        first += len(group)
    assert start == len(ranked)


def test_a_batch_equals_its_prompts_one_by_one(family, vlm, monkeypatch):
    # Each stage leaves the rows different lengths. Every stage's scores are compared, not
    # only the picks.
    ranked = record_rankings(monkeypatch)
    tester, _, proc, _ = family
    prompts, per_prompt, batch = three_prompts(family)
    scored = {"output_scores": True, "return_dict_in_generate": True}
    with zooprune.prune(vlm, "pdrop", keep=tester.keep) as handle:
        together = greedy(vlm, tester, batch, 4, **scored)
        stages = handle.selection.details["stages"]
        alone_stages = [[] for _ in stages]
        for row, (prompt, group) in enumerate(zip(prompts, per_prompt, strict=True)):
            alone = greedy(vlm, tester, tester.inputs(proc, [group], [prompt]), 4, **scored)
            for stage, kept in enumerate(handle.selection.details["stages"]):
                alone_stages[stage] += kept
            assert torch.equal(together.sequences[row, -4:], alone.sequences[0, -4:])
            for step in range(4):
                torch.testing.assert_close(
                    together.scores[step][row], alone.scores[step][0], rtol=0, atol=1e-4
                )
    assert stages == alone_stages
    assert_ranked_alike(ranked, per_prompt, len(stages))


def test_more_stages_than_the_lm_can_hold_are_refused(family, vlm):
    with pytest.raises(PruneError, match="cannot hold.*use fewer stages"):
        zooprune.prune(vlm, "pdrop", keep=4, stages=DEPTH)
    assert "forward" not in vlm.__dict__
