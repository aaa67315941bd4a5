"""The load-and-fault run's request mix and its verdicts, without an engine
(``test_vllm_load.py`` runs the mix against a server)."""

import json

from zooprune.integrations.vllm.load import BAD, KINDS, LoadConfig, Sent, request_mix, verdicts


def test_the_mix_holds_every_kind_in_its_share_and_is_a_function_of_the_seed():
    config = LoadConfig(requests=40, seed=3)
    mix = request_mix(config, "m")
    assert len(mix) == 40 and [r.index for r in mix] == list(range(40))
    kinds = [r.kind.split(":")[0] for r in mix]
    for kind, share in KINDS.items():
        assert abs(kinds.count(kind) - share * 40) <= 1, kind
    again = request_mix(config, "m")
    assert [json.dumps(r.body) for r in again] == [json.dumps(r.body) for r in mix]
    other = request_mix(LoadConfig(requests=40, seed=4), "m")
    assert [json.dumps(r.body) for r in other] != [json.dumps(r.body) for r in mix]
    for request in mix:
        expected = (
            "refusal" if request.kind.split(":")[0] in ("bad settings", "malformed") else "answer"
        )
        assert request.expect == expected
        if request.kind == "bad settings":
            assert (request.own, request.message) in BAD
            assert request.body["mm_processor_kwargs"] == {"zooprune": request.own}


def test_verdicts_name_each_request_that_went_wrong():
    sent = [
        Sent(0, "image", {}, status=200),
        Sent(1, "image", {}, status=None),  # no answer at all
        Sent(2, "image", {}, status=500),
        Sent(3, "image", {}, status=400),  # refused, though good
        Sent(4, "malformed", {}, expect="refusal", status=200),  # answered, though bad
        Sent(
            5,
            "bad settings",
            {},
            expect="refusal",
            message="keep must",
            status=400,
            reply={"error": {"message": "mm_processor_kwargs['zooprune']: keep must be"}},
        ),
        Sent(
            6,
            "bad settings",
            {},
            expect="refusal",
            message="keep must",
            status=400,
            reply={"error": {"message": "something else"}},
        ),
        Sent(7, "malformed", {}, expect="refusal", status=400),
    ]
    assert verdicts(sent) == {
        "lost (no answer or 5xx)": [1, 2],
        "answered where refused was expected": [4],
        "refused where an answer was expected": [3],
        "refusal without zooprune's message": [6],
    }
