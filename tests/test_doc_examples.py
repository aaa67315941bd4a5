"""Every example block of the README and the docs (``python`` and ``bash`` fences) runs
here, or is marked on the line before it:

- ``<!-- example: not run (REASON) -->``: it needs what the tests do not have (a model hub,
  a GPU, vLLM or lmms-eval, a running server) or is what CI itself runs; the reason must
  say which;
- ``<!-- example: synopsis -->``: a usage listing of ``zooprune`` commands with ``[optional]``
  parts; each command and each ``--option`` it names must exist in the command's parser.

A Python example runs with ``path`` (a tiny LLaVA saved with ``save_pretrained``) and
``image`` (a picture) defined; a bash example runs in a scratch folder with the project's
``zooprune`` on the PATH.
"""

import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
from PIL import Image

from zooprune.cli import build_parser

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
EXAMPLE_LANGUAGES = ("python", "bash")
#: what a block that is not run may need instead
NOT_RUN_BECAUSE = ("hub", "GPU", "vLLM", "lmms-eval", "server", "CI", "installs")


@dataclass(frozen=True)
class Block:
    page: str
    line: int
    language: str
    marker: str  # "" when unmarked
    code: str

    @property
    def name(self) -> str:
        return f"{self.page}:{self.line}"


def blocks() -> list[Block]:
    """Every fenced example block of the pages, with the marker before it."""
    found = []
    for page in PAGES:
        lines = page.read_text().splitlines()
        i = 0
        while i < len(lines):
            fence = re.match(r"^```(\w*)\s*$", lines[i])
            if not fence:
                i += 1
                continue
            end = next(j for j in range(i + 1, len(lines)) if lines[j].startswith("```"))
            before = next((lines[j] for j in range(i - 1, -1, -1) if lines[j].strip()), "")
            marker = re.match(r"^<!-- example: (.*) -->$", before)
            if fence.group(1) in EXAMPLE_LANGUAGES:
                found.append(
                    Block(
                        str(page.relative_to(ROOT)),
                        i + 1,
                        fence.group(1),
                        marker.group(1) if marker else "",
                        "\n".join(lines[i + 1 : end]) + "\n",
                    )
                )
            i = end + 1
    return found


BLOCKS = blocks()
RUN = [b for b in BLOCKS if not b.marker.startswith(("not run", "synopsis"))]
SYNOPSES = [b for b in BLOCKS if b.marker == "synopsis"]


def test_every_block_is_run_checked_or_marked_with_a_reason():
    for block in BLOCKS:
        if block.marker.startswith("not run"):
            reason = re.fullmatch(r"not run \((.+)\)", block.marker)
            assert reason and any(word in reason.group(1) for word in NOT_RUN_BECAUSE), block.name
    assert len(RUN) + len(SYNOPSES) + sum(b.marker.startswith("not run") for b in BLOCKS) == len(
        BLOCKS
    )
    assert RUN and SYNOPSES  # the pages do hold examples that run and listings that are checked


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from zooprune.cli import main

    path = tmp_path_factory.mktemp("docs") / "tiny-llava"
    assert main(["tiny", str(path)]) == 0
    return path


@pytest.mark.parametrize("block", RUN, ids=lambda b: b.name)
def test_example_runs(block, tiny, tmp_path, capsys):
    if block.language == "python":
        image = Image.new("RGB", (48, 48), "red")
        exec(compile(block.code, block.name, "exec"), {"path": str(tiny), "image": image})
        return
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    done = subprocess.run(
        ["bash", "-euo", "pipefail", "-c", block.code],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stdout + done.stderr


def commands(parser) -> dict[tuple[str, ...], object]:
    """Every ``zooprune`` command path (``("testbed", "train")``) and its parser."""
    found = {(): parser}
    for action in parser._actions:
        if action.__class__.__name__ == "_SubParsersAction":
            for name, sub in action.choices.items():
                found |= {(name, *path): p for path, p in commands(sub).items()}
    return found


@pytest.mark.parametrize("block", SYNOPSES, ids=lambda b: b.name)
def test_synopsis_names_commands_and_options_that_exist(block):
    known = commands(build_parser())
    text = block.code.replace("\\\n", " ")
    listed = [line.split() for line in text.splitlines() if line.startswith("zooprune ")]
    assert listed
    for words in listed:
        path = ()
        for word in words[1:]:
            if (*path, word) in known:
                path = (*path, word)
        assert path, f"{block.name}: no command in {' '.join(words)}"
        options = {option for action in known[path]._actions for option in action.option_strings}
        named = {re.sub(r"[=\]|].*$", "", w.lstrip("[")) for w in words if "--" in w}
        named = {w for w in named if w.startswith("--") and w != "--"}
        assert named <= options, f"{block.name}: {' '.join(words)}: {sorted(named - options)}"
