"""The example of docs/evaluation.md runs as written and prints what the page says it prints."""

import re
from pathlib import Path

import numpy as np

DOC = Path(__file__).resolve().parents[2] / "docs" / "evaluation.md"


def _numbers(text: str) -> np.ndarray:
    return np.array([float(v) for v in re.findall(r"\d+\.\d+", text)])


def test_the_example_runs_and_prints_what_the_page_shows(capsys):
    text = DOC.read_text()
    block = re.findall(r"```python\n(.*?)```", text, flags=re.S)[0]
    shown = re.search(r"It prints.*?```\n(.*?)```", text, flags=re.S).group(1)
    exec(compile(block, f"{DOC.name} block 0", "exec"), {"__name__": "docs_block"})
    printed = capsys.readouterr().out
    # the same lines; the numbers to a few units in their last digit (BLAS rounding elsewhere)
    assert re.sub(r"\d+\.\d+", "#", printed.strip()) == re.sub(r"\d+\.\d+", "#", shown.strip())
    np.testing.assert_allclose(_numbers(printed), _numbers(shown), atol=0.01)
    lds = float(re.search(r"LDS ([0-9.]+)", printed).group(1))
    pearson = float(re.search(r"LOO Pearson ([0-9.]+)", printed).group(1))
    assert lds >= 0.9 and pearson >= 0.99
