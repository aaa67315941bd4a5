from pathlib import Path

from zooprune.integrations.vllm import served_table
from zooprune.support import support_matrix

README = Path(__file__).resolve().parents[1] / "README.md"


def generated_part(marker: str) -> str:
    """The README's text between ``<!-- marker ... -->`` and ``<!-- /marker -->``."""
    text = README.read_text()
    start = text.index("-->\n", text.index(f"<!-- {marker}")) + len("-->\n")
    return text[start : text.index(f"<!-- /{marker} -->")]


def test_readme_support_matrix_is_the_generated_one():
    assert generated_part("support-matrix") == support_matrix()


def test_readme_vllm_table_is_the_generated_one():
    assert generated_part("vllm-matrix") == served_table()


def test_readme_lists_every_method():
    from zooprune import METHODS

    text = README.read_text()
    assert all(f"| `{name}` |" in text for name in METHODS)


def test_readme_layout_names_every_module():
    import re

    text = README.read_text()
    start = text.index("```\nsrc/zooprune/\n", text.index("## Layout")) + len("```\n")
    block = text[start : text.index("```", start)]
    # Each top-level entry starts a line with two spaces and its name: "  select/  ...".
    entries = re.split(r"\n  (?=[a-z_]+(?:\.py|/) )", block)[1:]
    described = {entry.split()[0]: entry for entry in entries}
    src = README.parent / "src" / "zooprune"
    missing = []
    for path in sorted(src.rglob("*.py")):
        parts = path.relative_to(src).parts
        if path.name in ("__init__.py", "__main__.py"):
            continue
        label = parts[0] + ("/" if len(parts) > 1 else "")
        if path.name not in described.get(label, ""):
            missing.append("/".join(parts))
    assert missing == []
