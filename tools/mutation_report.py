"""The score of the last `mutmut run` (``make mutate``) and every mutant that survived it.

Run from the repository root after ``mutmut run``. A survivor is listed either with the
reason ``tools/mutation_accepted.toml`` gives for it (an equivalent mutant, or one accepted
on purpose) or as needing a test: its diff is printed. The score counts killed mutants
(timeouts included: the mutant hung the tests) over all mutants that ran; the accepted
equivalents are also reported apart, since no test can kill them.

Exit status: 0, or 1 when a survivor has neither a killing test nor a reason.
"""

from __future__ import annotations

import re
import sys
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path

from mutmut.__main__ import SourceFileMutationData, get_diff_for_mutant, walk_mutatable_files
from mutmut.stats import status_by_exit_code

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: mutmut brings the toml package there
    import toml as tomllib

ACCEPTED = Path(__file__).with_name("mutation_accepted.toml")
DETECTED = ("killed", "timeout")
#: mutmut's statuses of mutants that never ran (an interrupted run)
NOT_RUN = ("not checked", "check was interrupted by user")


@dataclass(frozen=True)
class Rule:
    """Survivors a reason covers: those of ``functions`` (all if empty) whose removed line
    matches ``removed`` and whose added line matches ``added`` (regular expressions)."""

    reason: str
    added: str = ""
    removed: str = ""
    functions: tuple[str, ...] = ()

    def covers(self, function: str, removed: str, added: str) -> bool:
        if self.functions and function not in self.functions:
            return False
        return bool(re.search(self.added, added)) and bool(re.search(self.removed, removed))


def load_rules() -> list[Rule]:
    data = tomllib.loads(ACCEPTED.read_text())
    return [
        Rule(r["reason"], r.get("added", ""), r.get("removed", ""), tuple(r.get("functions", ())))
        for r in data.get("rule", [])
    ]


def split_name(mutant: str) -> tuple[str, str]:
    """``zooprune.select.greedy.x_maxmin_select__mutmut_12`` -> ``("select.greedy",
    "maxmin_select")``; a method: ``("pipeline", "Selector.select")``."""
    module, _, name = mutant.rpartition("__mutmut_")[0].rpartition(".")
    name = name.removeprefix("x_").replace("xǁ", "").replace("ǁ", ".")
    return module.removeprefix("zooprune."), name


def function_of(mutant: str) -> str:
    """The mutated function as rules name it: ``select.greedy.maxmin_select``."""
    return ".".join(split_name(mutant))


def changed_lines(diff: str) -> tuple[str, str]:
    """The removed and added lines of a mutant's diff, each joined into one string."""
    removed = [line[1:].strip() for line in diff.splitlines() if line.startswith("-")]
    added = [line[1:].strip() for line in diff.splitlines() if line.startswith("+")]
    removed = [line for line in removed if not line.startswith("--")]
    added = [line for line in added if not line.startswith("++")]
    return " ".join(removed), " ".join(added)


def main() -> int:
    rules = load_rules()
    statuses: dict[str, str] = {}
    paths: dict[str, Path] = {}
    for path in walk_mutatable_files():
        data = SourceFileMutationData(path=path)
        data.load()
        for mutant, code in data.exit_code_by_key.items():
            statuses[mutant] = status_by_exit_code[code]
            paths[mutant] = path
    if not statuses:
        print("no mutants: run `mutmut run` first (make mutate)")
        return 1
    pending = [mutant for mutant, status in statuses.items() if status in NOT_RUN]
    if pending:
        print(f"{len(pending)} mutants did not run (an interrupted run): they are left out\n")
    statuses = {m: s for m, s in statuses.items() if s not in NOT_RUN}
    by_module: dict[str, Counter] = defaultdict(Counter)
    for mutant, status in statuses.items():
        by_module[split_name(mutant)[0]][status] += 1
    accepted: dict[str, list[tuple[str, str]]] = defaultdict(list)
    unexplained: list[tuple[str, str, str]] = []
    for mutant, status in sorted(statuses.items()):
        if status in DETECTED:
            continue
        diff = get_diff_for_mutant(mutant, path=paths[mutant])
        removed, added = changed_lines(diff)
        function = function_of(mutant)
        rule = next((r for r in rules if r.covers(function, removed, added)), None)
        if rule is None:
            unexplained.append((mutant, status, diff))
        else:
            accepted[rule.reason].append((function, f"{removed}  ->  {added}"))

    total = len(statuses)
    detected = sum(s in DETECTED for s in statuses.values())
    equivalent = sum(len(v) for v in accepted.values())
    print(f"{'module':<24}{'mutants':>8}{'killed':>8}{'survived':>9}{'no test':>8}")
    for module, counts in sorted(by_module.items()):
        killed = counts["killed"] + counts["timeout"]
        print(
            f"{module:<24}{sum(counts.values()):>8}{killed:>8}"
            f"{counts['survived']:>9}{counts['no tests']:>8}"
        )
    print(
        f"\nscore: {detected} of {total} mutants killed ({100 * detected / total:.1f}%); "
        f"{equivalent} survivors accepted with a reason, {len(unexplained)} without"
    )
    if total > equivalent:
        share = 100 * detected / (total - equivalent)
        print(f"killed among the mutants that are not accepted as equivalent: {share:.1f}%")
    for reason, mutants in accepted.items():
        print(f"\naccepted ({len(mutants)}): {reason}")
        for function, change in mutants:
            print(f"  {function}: {change}")
    for mutant, status, diff in unexplained:
        print(f"\n{status}, no test and no reason: {mutant}\n{diff}")
    return 1 if unexplained else 0


if __name__ == "__main__":
    sys.exit(main())
