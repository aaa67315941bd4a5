"""Parametrises the conformance suite by each family's tester (tests/adapters/conformance.py).

In a tester's class every test taking ``positions`` runs in each mode the family accepts.
"""


def _case_id(case):
    method, options = case
    return "-".join([method, *(f"{k}={v}" for k, v in options.items())])


def pytest_generate_tests(metafunc):
    tester = getattr(metafunc.cls, "tester", None)
    if tester is None:
        return
    if "positions" in metafunc.fixturenames:
        metafunc.parametrize("positions", tester.position_modes)
    if "pruned_case" in metafunc.fixturenames:
        metafunc.parametrize("pruned_case", tester.pruned_cases, ids=_case_id)
    if "batch_case" in metafunc.fixturenames:
        metafunc.parametrize("batch_case", tester.batch_cases, ids=_case_id)
    if "loop_case" in metafunc.fixturenames:
        metafunc.parametrize("loop_case", tester.loop_cases, ids=_case_id)
