"""The Python blocks of docs/tasks.md run as written (each in a fresh namespace)."""

import re
from pathlib import Path

import pytest

DOC = Path(__file__).resolve().parents[1] / "docs" / "tasks.md"
BLOCKS = re.findall(r"```python\n(.*?)```", DOC.read_text(), flags=re.S)


def test_the_guide_has_its_examples():
    assert len(BLOCKS) == 3


@pytest.mark.parametrize("index", [1, 2])
def test_guide_block_runs(index, capsys):
    if "transformers" in BLOCKS[index]:
        pytest.importorskip("transformers")
    exec(compile(BLOCKS[index], f"{DOC.name} block {index}", "exec"), {"__name__": "docs_block"})
    assert capsys.readouterr().out.strip()


def test_the_first_block_only_shows_the_signature():
    assert "..." in BLOCKS[0]  # a template, not run
