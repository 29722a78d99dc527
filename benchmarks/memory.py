"""Peak memory of one solver's fit, measured alone in a fresh process.

    python -m benchmarks.memory --model mlp-1e6 --n-train 2000 [--solver EK-FAC]

In the runner's process, memory freed by earlier solvers is reused by later ones, so a
peak above the process's baseline undercounts. Here a fresh process loads the model and
data, warms up (a fit on 16 samples, so that code pages and thread pools are resident),
resets the kernel's high-water mark and fits on the whole training set: the peak resident
memory above that baseline is the fit's working memory. The issue's target for EK-FAC on
the 1e6-parameter model: below 10x the model's size.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

from .models import PeakMemory, load_model, num_params

ROOT = Path(__file__).resolve().parents[1]
# glibc: every allocation above 64 KiB is its own mapping, returned to the kernel when freed,
# and the heap's top is trimmed at once. Resident memory then follows the live allocations:
# with the default adaptive thresholds, memory freed before the measurement (the warm-up's)
# is kept and reused, and the measured peak varied from 2.5x to 12.9x the model's size
# between identical runs.
EXACT_MALLOC = {"MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0"}


def _child(model_name: str, state: str, x: str, y: str, solver: str, regularization: float, chunk: int) -> dict:
    from .run import make_ours  # the runner's construction of each solver

    model = load_model(model_name, state)
    xs, ys = np.load(x), np.load(y)
    params = {"regularization": regularization, "rank": 10, "krylov_dimension": 20}
    make_ours(solver, model, params, chunk).fit((xs[:16], ys[:16]))  # warm-up
    fitted = make_ours(solver, model, params, chunk)
    with PeakMemory() as mem:
        fitted.fit((xs, ys))
    p = num_params(model)
    out = {
        "solver": solver,
        "model": model_name,
        "params": p,
        "model_bytes": 4 * p,
        "n_train": len(xs),
        "peak_fit_bytes": mem.peak_bytes,
    }
    out["peak_over_model"] = None if mem.peak_bytes is None else mem.peak_bytes / (4 * p)
    if hasattr(fitted, "state_") and hasattr(fitted.state_, "nbytes"):
        out["state_bytes"] = int(fitted.state_.nbytes)
    return out


def fresh_process_peak(
    model_name: str,
    model: torch.nn.Module,
    x: np.ndarray,
    y: np.ndarray,
    *,
    solver: str = "EK-FAC",
    regularization: float = 0.1,
    chunk: int = 256,
) -> dict:
    """Run :func:`_child` in a fresh interpreter and return its measurement."""
    with tempfile.TemporaryDirectory() as tmp:
        t = Path(tmp)
        torch.save(model.state_dict(), t / "model.pt")
        np.save(t / "x.npy", x)
        np.save(t / "y.npy", y)
        proc = subprocess.run(
            [
                sys.executable,
                "-m",
                "benchmarks.memory",
                "--child",
                model_name,
                str(t / "model.pt"),
                str(t / "x.npy"),
                str(t / "y.npy"),
                solver,
                str(regularization),
                str(chunk),
            ],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=1800,
            env={**os.environ, **EXACT_MALLOC},
        )
    if proc.returncode != 0:
        return {"solver": solver, "error": proc.stderr.strip()[-500:]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> dict:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "--child":
        name, state, x, y, solver, reg, chunk = argv[1:8]
        result = _child(name, state, x, y, solver, float(reg), int(chunk))
        print(json.dumps(result))
        return result
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="mlp-1e6")
    parser.add_argument("--n-train", type=int, default=2000)
    parser.add_argument("--solver", default="EK-FAC")
    parser.add_argument("--chunk", type=int, default=None, help="samples per batch (default: the runner's choice)")
    args = parser.parse_args(argv)
    from .problems import make_problem
    from .run import score_chunk

    pb = make_problem(args.model, args.n_train, 10, epochs=1)  # memory does not depend on training
    chunk = args.chunk or score_chunk(num_params(pb.model))
    result = fresh_process_peak(args.model, pb.model, pb.x_train, pb.y_train, solver=args.solver, chunk=chunk)
    result["chunk"] = chunk
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
