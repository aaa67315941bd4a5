"""Per-request settings on a served model, without an engine: a request's own settings
over the server's (what is replaced, what is kept), checked as the variant checks its
own; their trip as a per-item field; and an encoder batch whose items carry different
settings, each item chosen as its own selector chooses it alone (``test_vllm*`` serve
them through a running engine)."""

from types import SimpleNamespace

import pytest
import torch
from torch import nn

from zooprune import BudgetError, PruneError
from zooprune.families import llava
from zooprune.integrations.vllm import SETTINGS, VARIANTS, architecture_served
from zooprune.integrations.vllm.selection import (
    request_tensor,
    request_texts,
    requested_selector,
    requested_settings,
    select_each,
)
from zooprune.pipeline import EncodedImages, Selector
from zooprune.settings import Settings

SERVER = Settings("zoo", keep=64, options={"num_directions": 8, "video_budget": "frame"})


def test_a_request_budget_replaces_the_whole_budget_and_keeps_the_rest():
    assert SERVER.overridden_by({"ratio": 0.25}) == Settings(
        "zoo", ratio=0.25, options={"num_directions": 8, "video_budget": "frame"}
    )
    assert SERVER.overridden_by({"keep": 8, "num_directions": 16}).as_dict() == {
        "method": "zoo",
        "keep": 8,
        "ratio": None,
        "num_directions": 16,
        "video_budget": "frame",
    }
    assert SERVER.overridden_by({}) == SERVER


def test_another_method_drops_the_servers_method_options_but_not_its_layout():
    # num_directions is zoo's: it would be refused as an option of grid.
    assert SERVER.overridden_by({"method": "grid"}) == Settings(
        "grid", keep=64, options={"video_budget": "frame"}
    )
    assert SERVER.overridden_by({"method": "zoo", "video_budget": "global"}).options == {
        "num_directions": 8,
        "video_budget": "global",
    }


def test_a_request_that_is_not_a_mapping_is_refused():
    with pytest.raises(PruneError, match="must be a dict, got 'x'"):
        SERVER.overridden_by("x")


def config(architecture: str, **settings) -> SimpleNamespace:
    """A pruned variant's HF config as vLLM gives it: its architecture and settings."""
    return SimpleNamespace(architectures=[VARIANTS[architecture].name], **{SETTINGS: settings})


QWEN3 = "Qwen3VLForConditionalGeneration"
LLAVA = "LlavaForConditionalGeneration"


def test_a_variants_config_names_the_architecture_it_serves():
    assert architecture_served(config(QWEN3)) == QWEN3
    with pytest.raises(ValueError, match="no pruned variant"):
        architecture_served(SimpleNamespace(architectures=["LlamaForCausalLM"]))


def test_request_settings_are_checked_as_the_variant_checks_its_own():
    server = config(QWEN3, method="zoo", keep=5, num_directions=8)
    text = requested_settings(server, QWEN3, {"keep": 3})
    selector = requested_selector(text, QWEN3)
    assert (selector.budget.keep, selector.options) == (3, {"num_directions": 8})
    assert requested_selector(text, QWEN3) is selector  # built once per settings
    refusals = [
        ({"keep": 0}, BudgetError, "keep must be positive"),
        ({"nope": 1}, PruneError, "has no option 'nope'"),
        ({"method": "fastv"}, PruneError, "methods that apply: "),
        ({"video_budget": "global"}, PruneError, "video_budget='global' cannot be served"),
        ({"positions": "compact"}, PruneError, "only positions='original'"),
        ([1], PruneError, "must be a dict"),
    ]
    for request, error, message in refusals:
        with pytest.raises(error, match=message) as raised:
            requested_settings(server, QWEN3, request)
        assert str(raised.value).startswith("mm_processor_kwargs['zooprune']: ")


def test_an_estimator_only_an_mlp_has_is_refused_unless_the_model_scores_one():
    server = config(LLAVA, method="zoo", keep=5)
    with pytest.raises(PruneError, match="use 'jvp' or 'zo'"):
        requested_settings(server, LLAVA, {"estimator": "exact"})
    text = requested_settings(server, LLAVA, {"estimator": "exact"}, mlp_projector=True)
    assert requested_selector(text, LLAVA).options == {"estimator": "exact"}
    # LLaVA's processor knows it from the config's activation alone
    assert llava.is_gelu_mlp("gelu") and llava.is_gelu_mlp("gelu_pytorch_tanh")
    assert not llava.is_gelu_mlp("relu") and not llava.is_gelu_mlp("silu")


def test_request_settings_travel_as_one_row_of_bytes_per_item():
    text = requested_settings(config(LLAVA, method="zoo", keep=5), LLAVA, {"ratio": 0.5})
    rows = request_tensor(text, 3)
    assert rows.shape == (3, len(text.encode())) and rows.dtype == torch.uint8
    assert request_texts(rows) == [text] * 3  # vLLM stacks rows of one length
    other = requested_settings(config(LLAVA, method="zoo", keep=5), LLAVA, {"keep": 2})
    assert request_texts([rows[0], request_tensor(other, 1)[0]]) == [text, other]  # or not


def encoded(grids) -> EncodedImages:
    g = torch.Generator().manual_seed(0)
    features = [torch.randn(h * w, 6, generator=g) for h, w in grids]
    with torch.no_grad():
        projected = [projector()(f) for f in features]
    return EncodedImages(features, projected, list(grids), None, None, None)


def projector() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.GELU(), nn.Linear(8, 5))


def test_each_item_of_a_mixed_batch_keeps_what_its_own_selector_keeps_alone():
    grids = [(3, 4), (4, 4), (3, 4), (2, 5), (4, 4)]
    zoo = Selector.build("zoo", keep=4, options={"num_directions": 8})
    grid = Selector.build("grid", keep=2)
    unpruned = Selector.build("zoo", ratio=1.0, options={"num_directions": 8})
    selectors = [zoo, grid, unpruned, grid, zoo]
    kept = select_each(selectors, encoded(grids), projector())
    assert len(kept.images) == len(grids)
    for i, selector in enumerate(selectors):
        alone = selector.select(encoded(grids).item(i), projector()).images[0]
        assert torch.equal(kept.images[i].indices, alone.indices), i
        assert torch.equal(kept.images[i].run, alone.run), i
    assert torch.equal(kept.images[2].indices, torch.arange(12))  # ratio 1.0: every token
