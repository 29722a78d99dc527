"""The transformer example jobs (examples/transformers) run end to end through the CLI, on
small settings, and write the influences of the in-memory solver."""

import re
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
from click.testing import CliRunner

import dask_influence as di
from dask_influence.cli.main import cli
from dask_influence.storage.store import is_complete

pytest.importorskip("transformers")

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "transformers"


def _small_job(tmp_path, name, options, blocks):
    shutil.copy(EXAMPLE / "factory.py", tmp_path / "factory.py")
    text = (EXAMPLE / name).read_text()
    text = text.replace('path = "."\n', f'path = "."\noptions = {options}\n', 1)
    text = re.sub(r"\[blocks\]\ntest = \d+\ntrain = \d+", f"[blocks]\n{blocks}", text)
    text = re.sub(r"\[cluster\]\n(.*\n)*", "[cluster]\nsequential = true\n", text)
    (tmp_path / name).write_text(text)
    return tmp_path / name


def _batch(items):
    return torch.utils.data.default_collate(items)


def test_causal_lm_job_writes_the_in_memory_influences(tmp_path):
    job = _small_job(tmp_path, "lm_job.toml", "{ n_train = 24, n_test = 4, steps = 10 }", "test = 4\ntrain = 12")
    result = CliRunner().invoke(cli, ["run", str(job)])
    assert result.exit_code == 0, result.output
    group = zarr.open_group(str(tmp_path / "lm.zarr"), mode="r")
    assert is_complete(group) and group["influences"].shape == (4, 24)

    sys.path.insert(0, str(tmp_path))
    import factory

    problem = factory.make_causal_lm(n_train=24, n_test=4, steps=10)
    with pytest.warns(UserWarning, match="leaves out"):
        solver = di.EkfacInfluence(problem["model"], di.tasks.causal_lm(), regularization=0.01)
    solver.fit(torch.utils.data.DataLoader(problem["train"], batch_size=12))
    expected = solver.influences(_batch(problem["test"]), _batch(problem["train"])).numpy()
    np.testing.assert_allclose(group["influences"][...], expected, rtol=1e-4, atol=1e-5 * np.abs(expected).max())
    top = group["top_helpful_indices"][...]
    np.testing.assert_array_equal(top[:, 0], expected.argmax(axis=1))


def test_text_classification_job_runs_and_flags_flipped_labels(tmp_path):
    job = _small_job(tmp_path, "text_job.toml", "{ n_train = 60, n_test = 6, steps = 30 }", "test = 6\ntrain = 30")
    result = CliRunner().invoke(cli, ["run", str(job)])
    assert result.exit_code == 0, result.output
    group = zarr.open_group(str(tmp_path / "text.zarr"), mode="r")
    assert is_complete(group) and group["influences"].shape == (6, 60)
    selfs = group["self_influences"][...]
    assert selfs.shape == (60,) and bool((selfs > 0).all())
