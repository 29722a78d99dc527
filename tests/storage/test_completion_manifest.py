"""Completion state from the manifest, with the per-chunk flags as the truth, and refits.

Resume after losing k chunks recomputes exactly those k whether the completion manifest is
present, absent (a store of the previous version), stale (behind the flags) or damaged; the
manifest is rewritten. A refit, or a change of the fitted state, invalidates every chunk of
the earlier fit: the resume recomputes all of them and equals a clean run.
"""

from __future__ import annotations

import shutil
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
from click.testing import CliRunner
from torch.utils.data import DataLoader, TensorDataset

import dask_influence as di
from dask_influence.cli.main import cli
from dask_influence.storage import chunkfiles, completion, manifest
from dask_influence.storage import store as zstore
from dask_influence.storage.layout import ATTR

N_TRAIN, N_TEST, TEST_BLOCK, TRAIN_BLOCK = 40, 12, 3, 4  # 4 x 10 = 40 chunks
N_CHUNKS = 40
LOST = [(0, 0), (1, 7), (3, 9)]


def make(seed=0, shift=0.0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N_TRAIN, 3, generator=g, dtype=torch.float64)
    y = torch.randn(N_TRAIN, 1, generator=g, dtype=torch.float64)
    xt = torch.randn(N_TEST, 3, generator=g, dtype=torch.float64)
    yt = torch.randn(N_TEST, 1, generator=g, dtype=torch.float64)
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 1)).double().eval()
    return model, torch.nn.MSELoss(), (x + shift, y), (xt, yt), (x, y)


@pytest.fixture(scope="module")
def problem():
    model, loss, fit_data, test, train = make()
    return model, loss, fit_data, test, train


def loaders(test, train):
    return DataLoader(TensorDataset(*test), batch_size=TEST_BLOCK), DataLoader(
        TensorDataset(*train), batch_size=TRAIN_BLOCK
    )


def run(solver, test, train, path, **kw):
    calc = di.SequentialInfluenceCalculator(solver, progress=False)
    t, r = loaders(test, train)
    group = calc.influences_to_zarr(t, r, path, top_k=3, self_influences=True, **kw)
    return calc, group


def arrays(path):
    group = zarr.open_group(str(path), mode="r")
    return {n: group[n][...] for n in sorted(group.array_keys()) if not n.endswith("_done") and n != "solver_info"}


def lose(path: Path, chunks):
    """Chunks lost as by a killed job: their data and flag files gone."""
    for i, j in chunks:
        (path / "influences" / "c" / str(i) / str(j)).unlink()
        (path / "influences_done" / "c" / str(i) / str(j)).unlink()
    group = zarr.open_group(str(path), mode="r+")
    group.attrs[ATTR] = {**group.attrs[ATTR], "complete": False}


@pytest.fixture(scope="module")
def fitted(problem):
    model, loss, _, _, train = problem
    return di.DirectInfluence(model, loss, regularization=0.1, curvature="ggn").fit(train)


@pytest.fixture(scope="module")
def clean(fitted, problem, tmp_path_factory):
    path = tmp_path_factory.mktemp("clean") / "clean.zarr"
    run(fitted, problem[3], problem[4], path)
    return arrays(path)


@pytest.mark.parametrize("condition", ["present", "absent", "stale", "damaged", "previous version"])
@pytest.mark.parametrize("verify", [True, False])
def test_resume_after_losing_k_chunks_recomputes_exactly_them(fitted, problem, clean, tmp_path, condition, verify):
    _, _, _, test, train = problem
    path = tmp_path / "store.zarr"
    run(fitted, test, train, path)
    lose(path, LOST)
    group = zarr.open_group(str(path), mode="r+")
    if condition == "absent":
        shutil.rmtree(path / "completion")
    elif condition == "previous version":  # no manifest, no fit record: flags of value 1 only
        shutil.rmtree(path / "completion")
        attrs = dict(group.attrs[ATTR])
        attrs.pop("fit")
        group.attrs[ATTR] = attrs
    elif condition == "stale":  # a killed driver's last batched write: it knew of half the chunks
        state = completion.load_state(group)
        state.values["influences"][:2] = 0
        state.values["top_k"][:] = 0
        manifest.write_manifest(group, state.to_manifest(final=False))
    elif condition == "damaged":
        meta = path / "completion" / "zarr.json"
        meta.write_bytes(meta.read_bytes()[:40])
    before = completion.load_state(zarr.open_group(str(path), mode="r"))
    assert before.counts()["influences"] == (N_CHUNKS - len(LOST), N_CHUNKS)
    if condition in ("absent", "previous version"):
        assert before.manifest == "absent" and before.flags_read == N_CHUNKS - len(LOST) + 10 + 4
    elif condition == "damaged":
        assert before.manifest.startswith("damaged")
    elif condition == "stale":  # only the flags the manifest does not mark done are read
        assert before.manifest == "ok" and before.flags_read == 2 * 10 - 2 + 4
    else:
        assert before.manifest == "ok" and before.disagreed == len(LOST) and before.flags_read == 0

    calc, group = run(fitted, test, train, path, resume=True, verify=verify)
    assert calc.last_run_["chunks_computed"] == len(LOST)
    assert calc.last_run_["chunks_skipped"] == N_CHUNKS - len(LOST)
    assert calc.last_run_["self_influence_blocks_computed"] == 0
    got = arrays(path)
    for name, value in clean.items():
        np.testing.assert_array_equal(got[name], value, err_msg=name)
    # the manifest is rewritten: the next command reads no flag at all
    after = completion.load_state(group)
    assert after.manifest == "ok" and after.flags_read == 0 and after.disagreed == 0 and after.all_done()
    assert zstore.is_complete(group)
    calc, _ = run(fitted, test, train, path, resume=True, verify=verify)
    assert calc.last_run_["chunks_computed"] == 0


def test_a_refit_invalidates_every_chunk_and_equals_a_clean_run(problem, tmp_path):
    model, loss, _, test, train = problem
    path, fit_file = tmp_path / "store.zarr", tmp_path / "fit.pt"
    solver = di.DirectInfluence(model, loss, regularization=0.1, curvature="ggn")
    calc = di.SequentialInfluenceCalculator(solver, progress=False)
    calc.fit(TensorDataset(*train), train_block_size=TRAIN_BLOCK, path=fit_file)
    t, r = loaders(test, train)
    calc.influences_to_zarr(t, r, path, top_k=3, self_influences=True)
    assert zarr.open_group(str(path), mode="r").attrs[ATTR]["fit"]["generation"] == 1
    clean = arrays(path)  # the clean run of this job (fitted over its blocks)

    # a reused fit keeps the chunks
    again = di.SequentialInfluenceCalculator(
        di.DirectInfluence(model, loss, regularization=0.1, curvature="ggn"), progress=False
    )
    again.fit(TensorDataset(*train), train_block_size=TRAIN_BLOCK, path=fit_file)
    again.influences_to_zarr(t, r, path, top_k=3, self_influences=True, resume=True)
    assert again.last_run_["chunks_computed"] == 0 and not again.last_run_["new_fit"]

    # a refit (the same fitted state, here) recomputes every chunk, self-influence and top-k row
    refit = di.SequentialInfluenceCalculator(
        di.DirectInfluence(model, loss, regularization=0.1, curvature="ggn"), progress=False
    )
    refit.fit(TensorDataset(*train), train_block_size=TRAIN_BLOCK, path=fit_file, refit=True)
    group = refit.influences_to_zarr(t, r, path, top_k=3, self_influences=True, resume=True)
    assert refit.last_run_["chunks_computed"] == N_CHUNKS and refit.last_run_["chunks_skipped"] == 0
    assert refit.last_run_["self_influence_blocks_computed"] == 10 and refit.last_run_["new_fit"]
    assert group.attrs[ATTR]["fit"]["generation"] == 2 and group.attrs[ATTR]["fit"]["reason"] == "refit"
    assert np.unique(group["influences_done"][...]).tolist() == [2]  # each flag names its fit
    got = arrays(path)
    for name, value in clean.items():
        np.testing.assert_array_equal(got[name], value, err_msg=name)
    # the same refit resumed again does not start another generation
    refit.influences_to_zarr(t, r, path, top_k=3, self_influences=True, resume=True)
    assert refit.last_run_["chunks_computed"] == 0


def test_a_refit_killed_halfway_resumes_with_the_new_fit(fitted, problem, clean, tmp_path):
    _, _, _, test, train = problem
    path = tmp_path / "store.zarr"
    run(fitted, test, train, path)
    group = zarr.open_group(str(path), mode="r+")
    # the refit's run wrote 5 chunks with generation 2, then died (its manifest knew of none)
    zstore.start_generation(group, zstore.FitIdentity(fitted.fingerprint(), "another fit", True), "refit")
    for i, j in [(0, 0), (0, 1), (1, 1), (2, 5), (3, 9)]:
        group["influences_done"][i, j] = 2
    state = completion.load_state(group)
    assert state.counts()["influences"] == (5, N_CHUNKS) and not zstore.is_complete(group)
    calc, _ = run(fitted, test, train, path, resume=True, verify=False)
    assert calc.last_run_["chunks_computed"] == N_CHUNKS - 5
    got = arrays(path)
    for name, value in clean.items():
        np.testing.assert_array_equal(got[name], value, err_msg=name)


def test_another_fitted_state_needs_a_refit_and_then_recomputes_everything(fitted, problem, tmp_path):
    model, loss, _, test, train = problem
    path = tmp_path / "store.zarr"
    run(fitted, test, train, path)
    x, y = train
    other = di.DirectInfluence(model, loss, regularization=0.1, curvature="ggn").fit(
        (x * 1.1, y)
    )  # another fitted state
    with pytest.raises(di.StoreError, match="solver_fingerprint.*refit=True"):
        run(other, test, train, path, resume=True)
    calc, group = run(other, test, train, path, resume=True, refit=True)
    assert calc.last_run_["chunks_computed"] == N_CHUNKS and group.attrs[ATTR]["fit"]["generation"] == 2
    assert group.attrs[ATTR]["config"]["solver_fingerprint"] == other.fingerprint()
    np.testing.assert_allclose(group["influences"][...], other.influences(*test, *train).numpy(), rtol=1e-10)
    assert zstore.is_complete(group)


def test_flag_values_are_reused_only_after_clearing_them(fitted, problem, clean, tmp_path):
    _, _, _, test, train = problem
    path = tmp_path / "store.zarr"
    run(fitted, test, train, path)  # flags of value 1 (generation 1)
    group = zarr.open_group(str(path), mode="r+")
    attrs = dict(group.attrs[ATTR])
    attrs["fit"] = {**attrs["fit"], "generation": 127, "fit_id": "an earlier fit"}  # 126 refits later
    group.attrs[ATTR] = attrs
    calc, group = run(fitted, test, train, path, resume=True, refit=True)  # generation 128: value 1 again
    assert group.attrs[ATTR]["fit"]["generation"] == 128
    assert calc.last_run_["chunks_computed"] == N_CHUNKS  # none passed for done with value 1
    got = arrays(path)
    for name, value in clean.items():
        np.testing.assert_array_equal(got[name], value, err_msg=name)


def test_the_recorder_batches_manifest_writes(fitted, problem, tmp_path):
    _, _, _, test, train = problem
    path = tmp_path / "store.zarr"
    run(fitted, test, train, path)
    group = zarr.open_group(str(path), mode="r+")
    state = completion.load_state(group)
    state.values["influences"][:] = 0
    recorder = completion.CompletionRecorder(group, state, every_seconds=3600)
    for i, j in np.ndindex(4, 10):
        recorder.record([("influences", (i, j))])
    assert recorder.writes == 0  # not due yet
    recorder.flush(final=True)
    found, status = manifest.read_manifest(group)
    assert recorder.writes == 1 and status == "ok" and found is not None and found.final
    assert (found.values["influences"] == 1).all()


def test_direct_chunk_reads_equal_zarr_and_find_damage(fitted, problem, tmp_path):
    _, _, _, test, train = problem
    path = tmp_path / "store.zarr"
    run(fitted, test, train, path)
    group = zarr.open_group(str(path), mode="r")
    array = group["influences"]
    coords = list(np.ndindex(4, 10))
    assert chunkfiles.list_chunks(array) == set(coords)
    for c, data in chunkfiles.read_chunks(array, coords, threads=2, window=3):
        i, j = c
        np.testing.assert_array_equal(data, array[i * 3 : (i + 1) * 3, j * 4 : (j + 1) * 4])
    raw = path / "influences" / "c" / "1" / "2"
    raw.write_bytes(raw.read_bytes()[:-3])
    (path / "influences" / "c" / "2" / "2").unlink()
    got = dict(chunkfiles.read_chunks(array, [(1, 2), (2, 2), (0, 0)]))
    assert isinstance(got[(1, 2)], ValueError) and got[(2, 2)] is None and isinstance(got[(0, 0)], np.ndarray)


EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "batch_job"


def test_run_resume_refit_recomputes_every_chunk(tmp_path):
    job = tmp_path / "job.toml"
    job.write_text(
        textwrap.dedent(f"""\
        [model]
        factory = "factory:make_problem"
        path = "{EXAMPLE}"
        options = {{ n_train = 40, n_test = 9 }}

        [solver]
        method = "direct"
        regularization = 1e-3

        [blocks]
        test = 3
        train = 10

        [output]
        store = "{tmp_path / "influences.zarr"}"
        top_k = 2

        [cluster]
        sequential = true
        """)
    )
    runner = CliRunner()
    first = runner.invoke(cli, ["run", str(job), "--quiet"])
    assert first.exit_code == 0, first.output
    expected = zarr.open_group(str(tmp_path / "influences.zarr"), mode="r")["influences"][...]
    resumed = runner.invoke(cli, ["run", str(job), "--resume"])
    assert resumed.exit_code == 0 and "(12/12 chunks; 0 computed, 12 already done)" in resumed.output
    refit = runner.invoke(cli, ["run", str(job), "--resume", "--refit"])
    assert refit.exit_code == 0, refit.output
    assert "(12/12 chunks; 12 computed (new fit, generation 2" in refit.output
    group = zarr.open_group(str(tmp_path / "influences.zarr"), mode="r")
    np.testing.assert_array_equal(group["influences"][...], expected)
    text = runner.invoke(cli, ["inspect", str(tmp_path / "influences.zarr"), "--json"])
    assert '"manifest": "ok"' in text.output and '"flags_read": 0' in text.output
    assert "Fit: generation 2 (refit" in runner.invoke(cli, ["inspect", str(tmp_path / "influences.zarr")]).output
