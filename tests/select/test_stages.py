"""The opt-in clock of a selection's stages: what each method reports, and nothing without
a clock."""

import torch
from torch import nn

from zooprune.select import get_method
from zooprune.select.registry import TokenSet
from zooprune.select.stages import StageClock, clocked, stage


def tokens() -> TokenSet:
    torch.manual_seed(0)
    projector = nn.Sequential(nn.Linear(6, 16), nn.GELU(), nn.Linear(16, 8))
    x = torch.randn(2, 36, 6)
    with torch.no_grad():
        z = projector(x)
    return TokenSet(features=x, projected=z, projector=projector, grid=(6, 6))


def test_each_method_reports_its_stages_to_the_clock_installed():
    reported = {}
    for name in ("zoo", "divprune", "grid"):
        clock = StageClock()
        with clocked(clock):
            get_method(name)(tokens(), 5)
        reported[name] = {stage: seconds > 0 for stage, seconds in clock.seconds.items()}
    assert reported == {
        "zoo": {"scoring": True, "greedy": True},
        "divprune": {"greedy": True},
        "grid": {},
    }


def test_a_stage_synchronizes_on_both_sides_and_nests_clocks():
    calls = []
    outer, inner = StageClock(lambda: calls.append("outer")), StageClock()
    with clocked(outer):
        with stage("scoring"):
            pass
        with clocked(inner), stage("greedy"):
            pass
        with stage("greedy"):
            pass
    assert calls == ["outer"] * 4  # scoring and the outer greedy, each before and after
    assert set(outer.seconds) == {"scoring", "greedy"} and set(inner.seconds) == {"greedy"}
    # without a clock a stage records nothing anywhere
    with stage("scoring"):
        pass
    assert set(outer.seconds) == {"scoring", "greedy"}
