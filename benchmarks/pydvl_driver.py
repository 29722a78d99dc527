"""Runs pyDVL 0.10.0 for the benchmark runner, inside pyDVL's own virtual environment.

    benchmarks/.venv-pydvl/bin/python -m benchmarks.pydvl_driver   (started by benchmarks.run)

pyDVL 0.10.0 pins numpy < 2, so it cannot share the project's environment. The runner
starts this script once per configuration and sends it one JSON command per line on
stdin; every answer is one line on stdout starting with ``@@ `` followed by JSON. The model
arrives as a ``state_dict`` file and an architecture name (:mod:`benchmarks.models`, which
needs only torch and numpy); arrays arrive and leave as ``.npy`` files. Only pyDVL's public
API is used.

Commands: ``load`` (model and data), ``solver`` (fit, factors and scoring of one pyDVL
solver, writing the influence matrix), ``dask`` (pyDVL's DaskInfluenceCalculator on a
LocalCluster with a solver fitted earlier), ``quit``.
"""

from __future__ import annotations

import json
import logging
import sys
import time
import traceback
import warnings

import numpy as np
import torch
from torch.utils.data import DataLoader, TensorDataset

from benchmarks.models import PeakMemory, load_model, loss_fn

logging.basicConfig(stream=sys.stderr, level=logging.ERROR)
warnings.simplefilter("ignore")


class Driver:
    def __init__(self) -> None:
        self.fitted: dict[str, object] = {}

    def load(self, msg: dict) -> dict:
        torch.set_num_threads(int(msg.get("threads", torch.get_num_threads())))
        self.model = load_model(msg["model"], msg["state"])
        self.data = {k: np.load(msg[k]) for k in ("x_train", "y_train", "x_test", "y_test")}
        self.batch_size = int(msg["batch_size"])
        self.score_chunk = int(msg["score_chunk"])
        self.fitted.clear()
        import pydvl

        return {"pydvl": pydvl.__version__, "torch": torch.__version__, "numpy": np.__version__}

    def make(self, name: str, p: dict):
        from pydvl.influence.torch import (
            ArnoldiInfluence,
            CgInfluence,
            DirectInfluence,
            EkfacInfluence,
            LissaInfluence,
            NystroemSketchInfluence,
        )

        m, loss, lam = self.model, loss_fn(), p["regularization"]
        if name == "Direct":
            return DirectInfluence(m, loss, regularization=lam)
        if name == "CG":
            # pyDVL 0.10.0's block CG stops when |r_j| <= max(rtol**2 |b_j|, atol**2) (squared
            # tolerances against an unsquared norm); pass square roots so that both libraries
            # stop at the same relative residual, |r_j| <= rtol |b_j|
            return CgInfluence(
                m,
                loss,
                regularization=lam,
                rtol=p["rtol"] ** 0.5,
                atol=p.get("atol", 0.0) ** 0.5,
                maxiter=p["maxiter"],
                solve_simultaneously=True,
                warn_on_max_iteration=False,
            )
        if name == "LiSSA":
            return LissaInfluence(
                m,
                loss,
                regularization=lam,
                maxiter=p["maxiter"],
                scale=p["scale"],
                rtol=p["rtol"],
                warn_on_max_iteration=False,
            )
        if name == "Arnoldi":
            return ArnoldiInfluence(m, loss, regularization=lam, rank=p["rank"], krylov_dimension=p["krylov_dimension"])
        if name == "Nystroem":
            return NystroemSketchInfluence(m, loss, regularization=lam, rank=p["rank"])
        if name == "EK-FAC":
            return EkfacInfluence(m, update_diagonal=True, hessian_regularization=lam)
        raise ValueError(f"unknown solver {name!r}")

    def solver(self, msg: dict) -> dict:
        d = self.data
        name = msg["name"]
        train = DataLoader(
            TensorDataset(torch.from_numpy(d["x_train"]), torch.from_numpy(d["y_train"])),
            batch_size=int(msg["params"].get("batch_size", self.batch_size)),
        )
        out: dict = {}
        solver = self.make(name, msg["params"])
        with PeakMemory() as mem_fit:
            t0 = time.perf_counter()
            solver = solver.fit(train)
            out["fit_s"] = time.perf_counter() - t0
        with PeakMemory() as mem_infl:
            t0 = time.perf_counter()
            factors = solver.influence_factors(torch.from_numpy(d["x_test"]), torch.from_numpy(d["y_test"]))
            t1 = time.perf_counter()
            parts = []
            x, y = torch.from_numpy(d["x_train"]), torch.from_numpy(d["y_train"])
            for s in range(0, len(x), self.score_chunk):
                parts.append(
                    solver.influences_from_factors(factors, x[s : s + self.score_chunk], y[s : s + self.score_chunk])
                )
            values = torch.cat(parts, dim=1)
            t2 = time.perf_counter()
        out.update(
            factors_s=t1 - t0,
            scoring_s=t2 - t1,
            peak_fit_bytes=mem_fit.peak_bytes,
            peak_influence_bytes=mem_infl.peak_bytes,
        )
        np.save(msg["out"], values.detach().numpy().astype(np.float32))
        self.fitted[name] = solver
        return out

    def dask(self, msg: dict) -> dict:
        import dask.array as da
        from distributed import Client, LocalCluster
        from pydvl.influence import DaskInfluenceCalculator
        from pydvl.influence.torch.util import TorchNumpyConverter

        d = self.data
        solver = self.fitted[msg["name"]]
        n_test, n_train = len(d["x_test"]), len(d["x_train"])
        test_block = -(-n_test // int(msg["test_blocks"]))
        train_block = int(msg["train_block"])
        with (
            LocalCluster(
                n_workers=int(msg["workers"]), threads_per_worker=1, processes=True, dashboard_address=None
            ) as cluster,
            Client(cluster) as client,
        ):
            calc = DaskInfluenceCalculator(solver, TorchNumpyConverter(), client)
            xt = da.from_array(d["x_test"], chunks=(test_block, *d["x_test"].shape[1:]))
            yt = da.from_array(d["y_test"], chunks=(test_block,))
            x = da.from_array(d["x_train"], chunks=(train_block, *d["x_train"].shape[1:]))
            y = da.from_array(d["y_train"], chunks=(train_block,))
            # warm-up, as for ours: workers import torch and pyDVL and run one small block
            calc.influences(xt[:test_block], yt[:test_block], x[:train_block], y[:train_block]).compute()
            t0 = time.perf_counter()
            values = calc.influences(xt, yt, x, y).compute()
            seconds = time.perf_counter() - t0
        np.save(msg["out"], np.asarray(values, dtype=np.float32))
        return {"seconds": seconds, "shape": [n_test, n_train]}


def main() -> None:
    driver = Driver()
    for line in sys.stdin:
        if not line.strip():
            continue
        msg = json.loads(line)
        if msg["cmd"] == "quit":
            break
        try:
            reply = {"ok": True, **getattr(driver, msg["cmd"])(msg)}
        except Exception as err:  # reported to the runner, which records it and goes on
            reply = {"ok": False, "error": f"{type(err).__name__}: {err}", "traceback": traceback.format_exc()[-2000:]}
        sys.stdout.write("@@ " + json.dumps(reply) + "\n")
        sys.stdout.flush()


if __name__ == "__main__":
    main()
