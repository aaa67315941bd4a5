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
