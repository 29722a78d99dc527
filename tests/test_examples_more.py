"""The leave-one-out and feature-influence examples run on small settings and write their PNGs."""

import importlib.util
from pathlib import Path

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _assert_png(path: Path) -> None:
    assert path.stat().st_size > 10_000
    assert path.read_bytes()[:8] == PNG_MAGIC


def test_loo_check_example(tmp_path):
    out = tmp_path / "loo.png"
    pearson = _load("loo_check").main(["--small", "--out", str(out)])
    _assert_png(out)
    assert pearson >= 0.95


def test_feature_influence_example(tmp_path, monkeypatch):
    monkeypatch.setenv("DASK_INFLUENCE_EXAMPLE_SMALL", "1")  # the environment variable shrinks it too
    out = tmp_path / "digits.png"
    result = _load("feature_influence").main(["--out", str(out)])
    _assert_png(out)
    assert result.shape == (1, 300, 8, 8)  # (n_test, n_train, *x.shape[1:]) of the small setting
    assert result.accuracy > 0.7
    assert result.helpful_same_label >= 0.5
