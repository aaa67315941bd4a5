"""Equal compute: FLOPs per condition and the budget that matches them, against brute force."""

import pytest
import torch
from PIL import Image

from zooprune.bench import flops
from zooprune.bench.accuracy import Item, run_accuracy
from zooprune.bench.equal_flops import PrefillCost, PromptSizes, prompt_sizes
from zooprune.select import METHODS
from zooprune.tiny import tiny_llava_processor

SEVEN_B_LM = flops.language_model(4096, 32, 11008, 4096, 32000)


def cost_of(shapes, text, visual):
    return PrefillCost(shapes, PromptSizes(tuple(text), tuple(visual)))


def brute_force_best(cost, spec, options, ratio):
    """The most visual tokens an in-LM method may keep for no more than a pre-LLM method's
    prefill at ``ratio``: every breakpoint k / n of every question tried."""
    layers = cost.shapes.text_layers
    target = sum(
        flops.lm_prefill(cost.shapes, t, [int(ratio * n)] * layers)
        for t, n in zip(cost.sizes.text, cost.sizes.visual, strict=True)
    )
    best = None
    candidates = sorted({k / n for n in cost.sizes.visual for k in range(1, n + 1)})
    for r in candidates:
        kept = [int((r + 1e-12) * n) for n in cost.sizes.visual]
        if min(kept) < 1:
            continue
        spent = sum(
            flops.lm_prefill(cost.shapes, t, spec.layer_tokens(options, n, k, layers))
            for t, n, k in zip(cost.sizes.text, cost.sizes.visual, kept, strict=True)
        )
        if spent <= target:
            best = (spent, kept)
    return target, best


@pytest.mark.parametrize("visual", [(576, 576, 576), (576, 400, 2880)])
@pytest.mark.parametrize("ratio", [1 / 3, 1 / 9])
def test_the_matched_budget_is_the_largest_that_costs_no_more(visual, ratio):
    cost = cost_of(SEVEN_B_LM, (40, 55, 31), visual)
    fastv = METHODS["fastv"]
    matched = cost.matching_ratio(fastv, {}, ratio)
    target, (spent, kept) = brute_force_best(cost, fastv, {"layer": 2}, ratio)
    assert cost.kept_at(matched) == kept
    assert cost.flops(fastv, {}, kept) == spent <= target
    # at 1/9 FastV at layer 2 of 32 keeps fewer tokens than the pre-LLM methods' 64 of 576
    assert kept[0] < int(ratio * visual[0])


def test_a_method_before_the_lm_matches_at_its_own_ratio_and_costs_the_same():
    cost = cost_of(SEVEN_B_LM, (40, 55), (576, 576))
    grid = METHODS["grid"]
    assert cost.flops(grid, {}, cost.kept_at(1 / 9)) == cost.flops_before_lm(1 / 9)
    assert cost.matching_ratio(grid, {}, 1 / 9) == 1 / 9  # its own cost: no bisection
    assert cost.relative(grid, {}, cost.kept_at(1 / 9)) == cost.relative_before_lm(1 / 9)
    assert cost.relative(None, {}, []) == 1.0


def test_no_budget_matches_where_the_unpruned_layers_alone_cost_more():
    shallow = flops.language_model(64, 4, 128, 64, 100)  # the test bed's 4 layers
    cost = cost_of(shallow, (12, 12), (256, 256))
    fastv = METHODS["fastv"]
    # layer 2 of 4: half the LM on all 256 tokens already costs more than 11% of it
    assert cost.matching_ratio(fastv, {"layer": 2}, 1 / 9) is None
    assert brute_force_best(cost, fastv, {"layer": 2}, 1 / 9)[1] is None
    # layer 1 at 50%: a budget exists, and it is the brute force's
    matched = cost.matching_ratio(fastv, {"layer": 1}, 0.5)
    assert cost.kept_at(matched) == brute_force_best(cost, fastv, {"layer": 1}, 0.5)[1][1]


def test_a_match_may_keep_a_single_token():
    # layer 1 of 4: the first layer on all 256 tokens, then 1 kept, costs just under the
    # pre-LLM prefill at 31.3% (80 of 256; at 31.2% nothing fits): the smallest budget
    cost = cost_of(flops.language_model(64, 4, 128, 64, 100), (12, 12), (256, 256))
    fastv = METHODS["fastv"]
    matched = cost.matching_ratio(fastv, {"layer": 1}, 0.313)
    assert cost.kept_at(matched) == [1, 1]
    assert brute_force_best(cost, fastv, {"layer": 1}, 0.313)[1][1] == [1, 1]
    assert cost.matching_ratio(fastv, {"layer": 1}, 0.312) is None


def test_prompt_sizes_count_the_processors_placeholders():
    processor = tiny_llava_processor()
    image = Image.new("RGB", (48, 48))
    prompts = ["<image> a b", "<image> a b c d"]
    for batch_size in (1, 2):  # batches are concatenated
        sizes = prompt_sizes(
            processor, prompts, [image, image], processor.image_token_id, batch_size
        )
        assert sizes.visual == (64, 64)  # 8 x 8 patches
        lengths = [len(processor(images=image, text=p)["input_ids"][0]) for p in prompts]
        assert sizes.text == (lengths[0] - 64, lengths[1] - 64)


def test_prompt_sizes_without_an_attention_mask_count_every_token():
    class Bare:  # a processor that returns input_ids alone
        def __call__(self, images, text, padding, return_tensors):
            return {"input_ids": torch.tensor([[5, 9, 9, 9, 7], [9, 9, 4, 4, 4]])}

    sizes = prompt_sizes(Bare(), ["x", "y"], [None, None], image_token_id=9)
    assert sizes.visual == (3, 2) and sizes.text == (2, 3)


class Answerer:
    """Says the right answer; keeps int(ratio * 64) tokens per image; records the ratio."""

    def __init__(self):
        self.ratios = []

    def __call__(self, items, method, ratio, options):
        self.ratios.append((method, ratio))
        kept = [] if method is None else [int(ratio * 64)] * len(items)
        return [it.answer for it in items], kept


def test_run_accuracy_runs_fastv_at_the_matched_budget_and_records_its_flops(tmp_path):
    items = [Item(Image.new("RGB", (4, 4)), f"q{i}", "yes", "f") for i in range(3)]
    cost = cost_of(flops.language_model(64, 8, 128, 64, 100), (10, 12, 14), (64, 64, 64))
    answer = Answerer()
    summary = run_accuracy(
        tmp_path,
        None,
        items,
        tmp_path,
        ["grid", ("fastv", {"layer": 1})],
        [0.5, 1 / 32],
        answerer=answer,
        cost=cost,
        match_flops=True,
        reps=10,
    )
    fastv = METHODS["fastv"]
    by_label = {(c["method"], c["ratio"]): c for c in summary["conditions"]}
    matched = by_label[("fastv[layer=1] (equal FLOPs)", 0.5)]
    assert matched["run_ratio"] == cost.matching_ratio(fastv, {"layer": 1}, 0.5)
    assert ("fastv", matched["run_ratio"]) in answer.ratios
    assert matched["lm_flops"] == pytest.approx(cost.relative_before_lm(0.5), rel=0.05)
    assert matched["lm_flops"] <= cost.relative_before_lm(0.5)
    plain = by_label[("fastv[layer=1]", 0.5)]
    assert plain["lm_flops"] > matched["lm_flops"]
    assert by_label[("grid", 0.5)]["lm_flops"] == cost.relative_before_lm(0.5)
    assert summary["conditions"][0]["lm_flops"] == 1.0
    # 2 of 64 tokens: the first layer on all 64 already costs more than 1/8 of 8 layers'
    assert ("fastv[layer=1] (equal FLOPs)", 1 / 32) not in by_label
    assert [(u["method"], u["ratio"]) for u in summary["unmatched"]] == [
        ("fastv[layer=1] (equal FLOPs)", 1 / 32)
    ]
    with pytest.raises(ValueError, match="match_flops needs cost"):
        run_accuracy(tmp_path, None, items, tmp_path, ["grid"], [0.5], match_flops=True)


def test_the_compute_plot_places_each_condition_at_its_flops(tmp_path):
    from zooprune.viz import flops_points, plot_accuracy_flops

    items = [Item(Image.new("RGB", (4, 4)), f"q{i}", "yes", "f") for i in range(3)]
    cost = cost_of(flops.language_model(64, 8, 128, 64, 100), (10, 12, 14), (64, 64, 64))
    summary = run_accuracy(
        tmp_path,
        None,
        items,
        tmp_path,
        ["grid", ("fastv", {"layer": 1})],
        [0.5, 0.25],
        answerer=Answerer(),
        cost=cost,
        reps=10,
    )
    points = flops_points(summary)
    by_key = {(c["method"], c["ratio"]): c for c in summary["conditions"]}
    assert points["grid"] == sorted(
        (100 * by_key[("grid", r)]["lm_flops"], 100.0) for r in (0.5, 0.25)
    )
    assert [x for x, _ in points["fastv[layer=1]"]] == sorted(
        100 * by_key[("fastv[layer=1]", r)]["lm_flops"] for r in (0.5, 0.25)
    )
    assert plot_accuracy_flops(summary, tmp_path / "f.png").read_bytes()[:4] == b"\x89PNG"
