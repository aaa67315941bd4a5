from pathlib import Path

from zooprune.adapters import support_matrix

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_support_matrix_is_the_generated_one():
    text = README.read_text()
    start = text.index("-->\n", text.index("<!-- support-matrix")) + len("-->\n")
    end = text.index("<!-- /support-matrix -->")
    assert text[start:end] == support_matrix()


def test_readme_lists_every_method():
    from zooprune import METHODS

    text = README.read_text()
    assert all(f"| `{name}` |" in text for name in METHODS)
