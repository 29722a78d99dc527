"""Models, data and measuring helpers shared by the benchmark runner and the pyDVL driver.

This module imports only torch, numpy and the standard library: the pyDVL driver imports
it inside pyDVL's own virtual environment (numpy < 2), where dask-influence is not
installed. The model travels between the two processes as a ``state_dict`` file plus the
name of its architecture (:func:`build_model`); arrays travel as ``.npy`` files.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

N_FEATURES = 64
N_CLASSES = 10

# name -> (description, widths of the two hidden layers); parameter counts in the comments
MLP_WIDTHS = {
    "mlp-tiny": 8,  # 64-8-8-10: 682 parameters (the runner's smoke test)
    "mlp-1k": 12,  # 1,066 (benchmarks/direct_bound.py)
    "mlp-2.5k": 25,  # 2,535
    "mlp-5k": 40,  # 4,650
    "mlp-1e4": 70,  # 64-70-70-10 tanh: 10,230 parameters
    "mlp-1e5": 280,  # 64-280-280-10: 99,690
    "mlp-1e6": 960,  # 64-960-960-10: 994,570
}
MODELS = (*MLP_WIDTHS, "cnn-digits")


def build_model(name: str) -> nn.Module:
    """A fresh (seed-independent architecture) model by name; see :data:`MODELS`."""
    if name in MLP_WIDTHS:
        h = MLP_WIDTHS[name]
        return nn.Sequential(nn.Linear(N_FEATURES, h), nn.Tanh(), nn.Linear(h, h), nn.Tanh(), nn.Linear(h, N_CLASSES))
    if name == "cnn-digits":
        # 8x8 grey images: 3,818 parameters
        return nn.Sequential(
            nn.Conv2d(1, 8, 3, padding=1),
            nn.Tanh(),
            nn.Conv2d(8, 16, 3, padding=1),
            nn.Tanh(),
            nn.AvgPool2d(2),
            nn.Flatten(),
            nn.Linear(16 * 4 * 4, N_CLASSES),
        )
    raise ValueError(f"unknown model {name!r}; choose one of {list(MODELS)}")


def num_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def load_model(name: str, state_path: str | os.PathLike) -> nn.Module:
    model = build_model(name)
    model.load_state_dict(torch.load(os.fspath(state_path), map_location="cpu", weights_only=True))
    return model.eval()


def loss_fn() -> nn.Module:
    return nn.CrossEntropyLoss()


# -- peak memory ---------------------------------------------------------------------------
def _status_kib(field: str) -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


class PeakMemory:
    """Peak resident memory of a block of code, above what the process held when it began.

    Linux only: it resets the kernel's high-water mark (``/proc/self/clear_refs``) and reads
    ``VmHWM`` afterwards. Elsewhere ``peak_bytes`` is ``None``.
    """

    def __init__(self) -> None:
        self.peak_bytes: int | None = None
        self._base = 0

    def __enter__(self) -> PeakMemory:
        try:
            with open("/proc/self/clear_refs", "w") as fh:
                fh.write("5")
            self._base = _status_kib("VmRSS")
            self._ok = True
        except OSError:
            self._ok = False
        return self

    def __exit__(self, *exc: object) -> None:
        if self._ok:
            self.peak_bytes = max(0, _status_kib("VmHWM") - self._base) * 1024


@contextmanager
def timed(out: dict, key: str) -> Iterator[None]:
    """Store the wall-clock seconds of the block in ``out[key]``."""
    start = time.perf_counter()
    yield
    out[key] = time.perf_counter() - start
