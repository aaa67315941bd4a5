"""SparseVLM: stages ranked by the raters' attention (``zooprune.lm_stage``).

On the families' tiny 4-layer models of ``tests/test_fastv.py`` (stages from layers 1 and 2:
the authors' 3, 7 and 16 of 32, scaled). The references: the raters by the definition
(loops), each stage's ranking the eager attention of the raters' rows at the layer before
it, under the earlier stages' masks, and the logits the unpruned model's with each stage's
drops masked from its first layer on.
"""

from __future__ import annotations

import math

import pytest
import torch

import zooprune
from tests import test_fastv
from tests.test_fastv import one_prompt
from tests.test_pdrop import (
    assert_ranked_alike,
    masked_by_stage,
    record_rankings,
    stage_drops,
    three_prompts,
)
from zooprune import METHODS
from zooprune.adapters import adapter_for
from zooprune.select.pdrop import pdrop_keeps
from zooprune.select.sparsevlm import select_raters, sparsevlm_layers

family, vlm = test_fastv.family, test_fastv.vlm


def reference_raters(visual: torch.Tensor, text: torch.Tensor) -> list[bool]:
    """r_t = mean_j softmax over t of (v_j . e_t); raters: r_t above the mean of r."""
    v, e = visual.double(), text.double()
    relevance = [0.0] * len(e)
    for j in range(len(v)):
        logits = [float(v[j] @ e[t]) for t in range(len(e))]
        top = max(logits)
        weights = [math.exp(x - top) for x in logits]
        for t in range(len(e)):
            relevance[t] += weights[t] / sum(weights) / len(v)
    mean = sum(relevance) / len(relevance)
    return [r > mean for r in relevance]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_raters_are_the_text_tokens_of_above_mean_relevance(seed):
    g = torch.Generator().manual_seed(seed)
    visual, text = torch.randn(30, 8, generator=g), torch.randn(9, 8, generator=g)
    assert select_raters(visual, text).tolist() == reference_raters(visual, text)
    none = select_raters(visual, text[:0])
    assert none.numel() == 0 and none.dtype == torch.bool


def test_equally_relevant_text_has_no_rater():
    # every token at the mean: none above it
    g = torch.Generator().manual_seed(4)
    visual, word = torch.randn(30, 8, generator=g), torch.randn(1, 8, generator=g)
    assert not select_raters(visual, word.expand(5, -1)).any()
    assert not select_raters(visual, word).any()  # one token is its own mean


def test_the_authors_layers_scale_with_depth():
    assert sparsevlm_layers({}, 32) == [3, 7, 16]  # rank at 2, 6, 15; fewer tokens after
    assert sparsevlm_layers({}, 4) == [1, 2]
    assert sparsevlm_layers({}, 1) == [1]  # a one-layer LM: only the outputs are dropped
    spec = METHODS["sparsevlm"]
    # 576 (1/9)^(1/3) = 276.9, 576 (1/9)^(2/3) = 133.1
    assert spec.layer_tokens({}, 576, 64, 32) == [576] * 3 + [276] * 4 + [133] * 9 + [64] * 16


def raters_by_hand(vlm_model, tester, batch) -> list[int]:
    """Prompt 0's raters, as prompt columns: the text after its image, by the definition."""
    ids = batch["input_ids"][0]
    columns = (ids == tester.image_token).nonzero().flatten()
    after = [c for c in range(int(columns.max()) + 1, ids.numel()) if ids[c] != tester.image_token]
    image_inputs = {k: v for k, v in batch.items() if k not in ("input_ids", "attention_mask")}
    encoded = adapter_for(vlm_model).encode(vlm_model, image_inputs, frozenset())
    with torch.no_grad():
        text = vlm_model.get_input_embeddings()(ids[after])
    chosen = reference_raters(encoded.projected[0], text)
    return [c for c, keep in zip(after, chosen, strict=True) if keep]


def test_each_stage_ranks_by_its_raters_attention(family, monkeypatch):
    tester, path, _, _ = family
    eager = tester.load(path, attn_implementation="eager")
    batch = one_prompt(family)
    ranked = record_rankings(monkeypatch)
    with zooprune.prune(eager, "sparsevlm", keep=tester.keep) as handle:
        pruned = eager(**batch).logits
    details = handle.selection.details
    raters = raters_by_hand(eager, tester, batch)
    assert details["raters"] == [raters] and 0 < len(raters)
    assert details["layers"] == [1, 2]
    n = handle.selection.images[0].num_tokens
    sizes = [len(kept[0]) for kept in details["stages"]]
    assert sizes == pdrop_keeps({}, n, tester.keep, 2)
    drops = stage_drops(batch, tester, handle.selection)
    reference = masked_by_stage(eager, batch, [1, 2], drops, output_attentions=True)
    columns = (batch["input_ids"][0] == tester.image_token).nonzero().flatten()
    held = list(range(n))
    for stage, kept in enumerate(details["stages"]):
        rows = reference.attentions[stage][0][:, raters]  # [heads, raters, L]
        scores = rows.mean(dim=0).mean(dim=0)[columns[held]]
        torch.testing.assert_close(ranked[stage], scores, rtol=0, atol=1e-6)
        top = scores.argsort(descending=True, stable=True)[: len(kept[0])]
        assert sorted(held[i] for i in top.tolist()) == kept[0], stage
        held = kept[0]
    keep = torch.ones(batch["input_ids"].shape[1], dtype=torch.bool)
    keep[torch.cat(drops)] = False
    torch.testing.assert_close(pruned[0], reference.logits[0, keep], rtol=0, atol=1e-5)
    # not FastV: the last prompt token's attention ranks otherwise
    with zooprune.prune(eager, "pdrop", keep=tester.keep, stages=2) as other:
        eager(**batch)
    assert other.selection.details["stages"] != details["stages"]


def test_a_batch_ranks_as_its_prompts_one_by_one(family, vlm, monkeypatch):
    ranked = record_rankings(monkeypatch)
    tester, _, proc, _ = family
    prompts, per_prompt, batch = three_prompts(family)
    with zooprune.prune(vlm, "sparsevlm", keep=tester.keep) as handle:
        vlm(**batch)
        stages = handle.selection.details["stages"]
        alone_stages = [[] for _ in stages]
        for prompt, group in zip(prompts, per_prompt, strict=True):
            vlm(**tester.inputs(proc, [group], [prompt]))
            for stage, kept in enumerate(handle.selection.details["stages"]):
                alone_stages[stage] += kept
    assert stages == alone_stages
    assert_ranked_alike(ranked, per_prompt, len(stages))
