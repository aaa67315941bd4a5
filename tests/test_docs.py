"""The README and the documentation site (docs/) against the code: what code can state is
generated or checked here, so prose cannot drift from it. The examples themselves run in
tests/test_doc_examples.py."""

import importlib
import inspect
import pkgutil
import re
from pathlib import Path

from zooprune import METHODS
from zooprune.adapters import ADAPTERS
from zooprune.integrations.vllm import served_table
from zooprune.support import support_matrix

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = ROOT / "docs"


def generated_part(path: Path, marker: str) -> str:
    """The text between ``<!-- marker ... -->`` and ``<!-- /marker -->`` in ``path``."""
    text = path.read_text()
    start = text.index("-->\n", text.index(f"<!-- {marker}")) + len("-->\n")
    return text[start : text.index(f"<!-- /{marker} -->")]


def test_readme_support_matrix_is_the_generated_one():
    assert generated_part(README, "support-matrix") == support_matrix()


def test_the_families_page_includes_the_readmes_matrix_and_names_every_family():
    text = (DOCS / "families.md").read_text()
    assert '--8<-- "README.md:support-matrix"' in text
    readme = README.read_text()
    assert readme.index("[start:support-matrix]") < readme.index("<!-- support-matrix")
    assert readme.index("<!-- /support-matrix -->") < readme.index("[end:support-matrix]")
    classes = [cls.__name__ for adapter in ADAPTERS.values() for cls in adapter.model_classes]
    assert [name for name in classes if f"`{name}`" not in text] == []


def test_vllm_table_is_the_generated_one():
    assert generated_part(DOCS / "vllm.md", "vllm-matrix") == served_table()


def test_readme_lists_every_method_and_the_methods_page_includes_it():
    text = README.read_text()
    table = text[text.index("[start:methods]") : text.index("[end:methods]")]
    assert sorted(re.findall(r"^\| `([a-z-]+)` \|", table, flags=re.M)) == sorted(METHODS)
    methods = (DOCS / "methods.md").read_text()
    assert '--8<-- "README.md:methods"' in methods
    # every method has its definition on the page
    assert [name for name in METHODS if f"- **{name}**" not in methods] == []


def test_architecture_layout_names_every_module():
    text = (DOCS / "architecture.md").read_text()
    start = text.index("```\nsrc/zooprune/\n") + len("```\n")
    block = text[start : text.index("```", start)]
    # Each top-level entry starts a line with two spaces and its name: "  select/  ...".
    entries = re.split(r"\n  (?=[a-z_]+(?:\.py|/) )", block)[1:]
    described = {entry.split()[0]: entry for entry in entries}
    src = ROOT / "src" / "zooprune"
    missing = []
    for path in sorted(src.rglob("*.py")):
        parts = path.relative_to(src).parts
        if path.name in ("__init__.py", "__main__.py"):
            continue
        label = parts[0] + ("/" if len(parts) > 1 else "")
        if path.name not in described.get(label, ""):
            missing.append("/".join(parts))
    assert missing == []


NUMBERS = "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen "
NUMBERS += "fifteen sixteen seventeen eighteen nineteen twenty"


def test_the_count_of_model_classes_the_conformance_suite_runs_on_is_the_suites():
    from tests.adapters.conformance import AdapterConformance

    classes = set()
    for module in pkgutil.iter_modules([str(ROOT / "tests" / "adapters")]):
        if not module.name.startswith("test_"):
            continue
        tests = importlib.import_module(f"tests.adapters.{module.name}")
        for name, obj in vars(tests).items():
            if (
                name.startswith("Test")
                and inspect.isclass(obj)
                and issubclass(obj, AdapterConformance)
                and obj.__module__ == tests.__name__
            ):
                classes.add(obj.tester.model_class)
    stated = re.search(
        r"runs on each of\s+these (\w+) classes", (DOCS / "contributing.md").read_text()
    )
    assert stated is not None
    assert NUMBERS.split().index(stated.group(1)) == len(classes)


def test_the_readme_is_short():
    assert len(README.read_text().splitlines()) <= 300


def test_every_page_is_in_the_sites_navigation_and_every_entry_is_a_page():
    nav = re.findall(r":\s+([\w-]+\.md)$", (ROOT / "mkdocs.yml").read_text(), flags=re.M)
    pages = sorted(p.name for p in DOCS.glob("*.md"))
    assert sorted(nav) == pages


def test_the_readme_links_only_to_files_that_exist():
    links = re.findall(r"\]\(([^)#:]+)(?:#[^)]*)?\)", README.read_text())
    assert links and [link for link in links if not (ROOT / link).exists()] == []
