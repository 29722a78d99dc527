"""The README's Python block runs as written, as a script (its `__main__` guard is what the
embedded Dask cluster's worker processes need), and does what it says."""

import re
import subprocess
import sys
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_the_readme_api_block_runs_as_a_script(tmp_path):
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert len(blocks) == 1
    script = tmp_path / "readme_example.py"
    script.write_text(blocks[0])
    done = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "(54, 106) most harmful on average:" in done.stdout
    assert (tmp_path / "out.zarr").is_dir()
