"""Every method's options: the documented defaults, and what the checks hand the method
(coerced values under the same names), through the one entry point that builds them."""

import numpy as np
import pytest

from zooprune import METHODS, PruneError
from zooprune.pipeline import Selector

SENSITIVITY = {
    "estimator": "auto",
    "num_directions": 64,
    "step": 0.01,
    "seed": 0,
    "zo_dtype": "float32",
    "rank": 128,
}
#: the README's table of methods, option by option
DOCUMENTED = {
    "zoo": SENSITIVITY | {"center": False},
    "zoo-sum": SENSITIVITY | {"center": False},
    "sensitivity": SENSITIVITY,
    "divprune": {"center": False},
    "visionzip": {"contextual": None, "cls_token": False},
    "random": {"seed": 0},
    "grid": {},
    "pool": {},
    "cdpruner": {"theta": None, "center": False},
    "dart": {"pivots": 8, "pivot_norm": "l2"},
    "fastv": {"layer": 2},
    "pdrop": {"stages": None},
    "sparsevlm": {},
    "vispruner": {"important_ratio": 0.5},
    "mmtok": {"alpha": 0.5, "text_temperature": 0.02, "vision_temperature": 0.2},
    "holitom": {"tau": 0.8, "beta": 0.6, "knn": 7},
}


def test_the_defaults_are_the_documented_ones():
    assert {name: spec.options for name, spec in METHODS.items()} == DOCUMENTED


@pytest.mark.parametrize(
    ("method", "given", "checked"),
    [
        (
            "zoo",
            {"num_directions": np.int64(8), "step": np.float32(0.5), "seed": np.int32(3)},
            {"num_directions": 8, "step": 0.5, "seed": 3},
        ),
        (
            "zoo-sum",
            {"estimator": "zo", "zo_dtype": "float16"},
            {"estimator": "zo", "zo_dtype": "float16"},
        ),
        ("sensitivity", {"rank": np.int16(16)}, {"rank": 16}),
        (
            "visionzip",
            {"contextual": np.int64(2), "cls_token": True},
            {"contextual": 2, "cls_token": True},
        ),
        ("visionzip", {"contextual": None}, {"contextual": None}),
        ("random", {"seed": np.uint8(9)}, {"seed": 9}),
        ("cdpruner", {"theta": np.float64(0.5)}, {"theta": 0.5}),
        ("dart", {"pivots": np.int64(3), "pivot_norm": "l1"}, {"pivots": 3, "pivot_norm": "l1"}),
        ("fastv", {"layer": np.int64(1)}, {"layer": 1}),
        ("pdrop", {"stages": np.int32(2)}, {"stages": 2}),
        ("vispruner", {"important_ratio": np.float32(0.25)}, {"important_ratio": 0.25}),
        ("vispruner", {"important_ratio": 1}, {"important_ratio": 1.0}),
        (
            "mmtok",
            {"alpha": np.float64(2), "text_temperature": 1, "vision_temperature": np.int8(3)},
            {"alpha": 2.0, "text_temperature": 1.0, "vision_temperature": 3.0},
        ),
        ("zoo", {"center": True}, {"center": True}),
        (
            "holitom",
            {"tau": np.float32(0.5), "beta": 1, "knn": np.int64(3)},
            {"tau": 0.5, "beta": 1.0, "knn": 3},
        ),
        ("holitom", {"tau": -1, "beta": 0}, {"tau": -1.0, "beta": 0.0}),
        ("holitom", {"tau": 1}, {"tau": 1.0}),
    ],
)
def test_checked_options_keep_their_names_and_become_plain_values(method, given, checked):
    options = Selector.build(method, keep=4, options=given).options
    assert options == checked
    assert all(type(options[k]) is type(v) for k, v in checked.items())


@pytest.mark.parametrize(
    ("method", "bad", "message"),
    [
        ("zoo", {"num_directions": 0}, "num_directions must be an int >= 1"),
        ("zoo", {"rank": 0}, "rank must be an int >= 1"),
        ("zoo", {"seed": -1}, "seed must be an int"),
        ("zoo", {"seed": 2**63}, "seed must be an int"),
        ("random", {"seed": 2**63}, "seed must be an int"),
        ("zoo", {"zo_dtype": "float16"}, "applies to estimator='zo' only"),
        ("visionzip", {"contextual": 4}, "contextual must be an int"),
        ("visionzip", {"contextual": -1}, "contextual must be an int"),
        ("visionzip", {"cls_token": 1}, "cls_token must be"),
        ("random", {"seed": 1.5}, "seed must be an int"),
        ("cdpruner", {"theta": 0}, r"theta must be None or a number in \(0, 1\)"),
        ("cdpruner", {"theta": 1}, r"theta must be None or a number in \(0, 1\)"),
        ("cdpruner", {"theta": True}, r"theta must be None or a number in \(0, 1\)"),
        ("dart", {"pivots": 0}, "pivots must be an int >= 1"),
        ("fastv", {"layer": 0}, "layer must be an int"),
        ("pdrop", {"stages": 0}, "stages must be an int >= 1"),
        ("vispruner", {"important_ratio": -0.1}, r"important_ratio must be a number in \[0, 1\]"),
        ("vispruner", {"important_ratio": True}, "important_ratio must be a number"),
        ("mmtok", {"alpha": float("nan")}, "alpha must be a number"),
        ("mmtok", {"vision_temperature": float("inf")}, "vision_temperature must be finite"),
        ("cdpruner", {"center": "yes"}, "center must be True or False"),
        ("zoo-sum", {"center": 0}, "center must be True or False"),
        ("holitom", {"tau": 1.5}, r"tau must be a number in \[-1, 1\]"),
        ("holitom", {"tau": float("nan")}, r"tau must be a number in \[-1, 1\]"),
        ("holitom", {"beta": -0.1}, r"beta must be a number in \[0, 1\]"),
        ("holitom", {"beta": False}, "beta must be a number"),
        ("holitom", {"knn": 0}, "knn must be an int >= 1"),
        ("holitom", {"tau": -1.5}, r"tau must be a number in \[-1, 1\]"),
        ("holitom", {"tau": True}, r"tau must be a number in \[-1, 1\]"),
        ("holitom", {"beta": 1.5}, r"beta must be a number in \[0, 1\]"),
        ("holitom", {"video_budget": "global"}, "it takes no video_budget"),
    ],
)
def test_out_of_range_options_are_refused(method, bad, message):
    with pytest.raises(PruneError, match=message):
        Selector.build(method, keep=4, options=bad)


def test_visionzip_contextual_may_reach_keep_minus_one():
    assert Selector.build("visionzip", keep=4, options={"contextual": 3}).options == {
        "contextual": 3
    }
    assert Selector.build("visionzip", ratio=0.5, options={"contextual": 50}).options == {
        "contextual": 50  # under ratio= the kept count is known per image only
    }


def test_a_registered_method_is_kept_with_everything_it_declared():
    from zooprune.select.registry import METHODS as REGISTRY
    from zooprune.select.registry import register_method

    def validate(options, keep):
        return options

    def first(tokens, k, *, flag: bool = False):
        raise AssertionError("not called")

    try:
        returned = register_method(
            "_declared",
            "keeps the first",
            needs=("keys",),
            validate=validate,
            option_needs={"flag": "cls_token"},
        )(first)
        spec = REGISTRY["_declared"]
        assert returned is first and spec.fn is first
        assert (spec.name, spec.summary, spec.needs) == ("_declared", "keeps the first", {"keys"})
        assert spec.validate is validate and spec.option_needs == {"flag": "cls_token"}
        assert spec.needs_for({"flag": True}) == {"keys", "cls_token"}
        with pytest.raises(ValueError, match="already registered"):
            register_method("_declared", "again")(first)
    finally:
        REGISTRY.pop("_declared", None)


def test_a_step_of_zero_is_refused():
    for step in (0, 0.0, -1.0, float("inf")):
        with pytest.raises(PruneError, match="step must be"):
            Selector.build("zoo", keep=4, options={"step": step})


@pytest.mark.parametrize(
    ("picks", "n"),
    [
        ([0, 2, 1], 5),  # not ascending after the first pair
        ([1, 1, 3], 5),  # a token twice
        ([3, 2], 5),  # descending
        ([0, 1, 5], 5),  # past the last token
        ([-1], 5),  # before the first
        ([0, 1], 5),  # two of three
    ],
)
def test_a_method_whose_picks_are_no_clean_set_is_caught(picks, n):
    # Kept tokens fill placeholders in order: k distinct ascending indices in [0, n).
    import torch

    from zooprune.select import TokenSet
    from zooprune.select.registry import MethodResult, MethodSpec

    def fixed(tokens, k):
        return MethodResult(torch.tensor([picks]))

    k = 3 if picks == [0, 1] else len(picks)
    spec = MethodSpec("_fixed", "test only", fixed, frozenset())
    tokens = TokenSet(torch.zeros(1, n, 2), torch.zeros(1, n, 2), torch.nn.Identity(), (1, n))
    with pytest.raises(
        RuntimeError, match=f"not {k} distinct ascending token indices in \\[0, {n}\\)"
    ):
        spec(tokens, k)
    good = MethodSpec(
        "_good", "test only", lambda t, k: MethodResult(torch.tensor([[0, 4]])), frozenset()
    )
    assert good(tokens, 2).indices.tolist() == [[0, 4]]


def test_an_unknown_option_is_refused_naming_those_there_are():
    with pytest.raises(
        PruneError, match="has no option 'pivot'; its options are: pivot_norm, pivots"
    ):
        Selector.build("dart", keep=4, options={"pivot": 2})
    with pytest.raises(PruneError, match="has no option 'seed'; its options are: none"):
        Selector.build("grid", keep=4, options={"seed": 2})
