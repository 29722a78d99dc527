"""The documentation site builds offline with ``mkdocs build --strict``, and the deployment
guides name only files that exist."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("site")
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "mkdocs",
            "build",
            "--strict",
            "--config-file",
            str(ROOT / "mkdocs.yml"),
            "--site-dir",
            str(out),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, f"mkdocs build --strict failed:\n{result.stdout}\n{result.stderr}"
    return out


def test_mkdocs_build_strict(site):
    for page in (
        "index.html",
        "getting-started/index.html",
        "concepts/index.html",
        "solvers/index.html",
        "scaling/index.html",
        "cli/index.html",
        "deploy/index.html",
        "benchmarks/index.html",
        "architecture/index.html",
        "api/index.html",
    ):
        assert (site / page).is_file(), page


def test_api_reference_is_generated_from_docstrings(site):
    api = (site / "api" / "index.html").read_text()
    import dask_influence

    for name in dask_influence.__all__:
        if name == "__version__":
            continue
        assert f'id="dask_influence.{name}"' in api, f"{name} is missing from docs/api.md"
    # rendered docstring text, not just headings
    assert "Exact influences from the dense curvature matrix" in api


@pytest.mark.parametrize("doc", ["docs/deploy.md", "examples/kubernetes.md"])
def test_deployment_guides_name_existing_files(doc):
    text = (ROOT / doc).read_text()
    named = set(re.findall(r"(?<![\w/.-])((?:deploy|examples)/[\w./-]*\w)", text))
    assert named
    missing = sorted(p for p in named if not any((ROOT / q).exists() for q in _expand(p)))
    assert not missing, f"{doc} names files that do not exist: {missing}"


def _expand(path: str) -> list[str]:
    """``deploy/kubernetes/*.yaml`` style globs match if any file does."""
    if "*" in path:
        return [str(p.relative_to(ROOT)) for p in ROOT.glob(path)]
    return [path]
