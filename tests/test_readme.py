"""The README's Python code runs as printed: each ```python block, in order, in a fresh namespace, offline, in an
empty working directory (what it writes stays there). The one test that reads README.md, and it reads only the
code blocks."""
import pathlib
import re

import torch

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def python_blocks(text: str) -> list[tuple[int, str]]:
    """(first line number, code) of each fenced ```python block of ``text``."""
    return [(text.count("\n", 0, m.start(1)) + 1, m.group(1))
            for m in re.finditer(r"^```python\n(.*?)^```$", text, flags=re.S | re.M)]


def test_python_blocks_are_found():
    text = "intro\n```python\nx = 1\n```\n```bash\nls\n```\n```python\ny = 2\n```\n"
    assert python_blocks(text) == [(3, "x = 1\n"), (9, "y = 2\n")]


def test_readme_python_blocks_run_as_printed(tmp_path, monkeypatch):
    blocks = python_blocks(README.read_text())
    assert blocks, "README.md has no ```python block: the quickstart is gone"
    monkeypatch.chdir(tmp_path)
    torch.set_num_threads(1)  # tiny models: a second thread only waits (conftest puts the count back)
    for line, code in blocks:
        exec(compile(code, f"README.md, the python block at line {line}", "exec"), {"__name__": "__main__"})
