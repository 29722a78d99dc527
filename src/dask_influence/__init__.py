"""dask-influence: influence functions for PyTorch models at any scale.

The public API, grouped by role. See ``docs/`` for the guide and ``DESIGN``-level contract:
``influence[i, j] = grad f(z_test_i)^T (H + lambda I)^-1 grad L(z_j)`` (``f`` the task's
measurement, the loss by default); positive means helpful.

The names are imported on first use (PEP 562), so that ``import dask_influence`` and the
commands that only read a store (``dask-influence inspect``) do not import torch or Dask;
``di.CgInfluence``, ``from dask_influence import DaskInfluenceCalculator`` and
``di.evaluate.lds`` work as with eager imports.
"""

from __future__ import annotations

from importlib import import_module as _import_module
from importlib.metadata import PackageNotFoundError as _PackageNotFoundError
from importlib.metadata import version as _version
from typing import TYPE_CHECKING as _TYPE_CHECKING
from typing import Any as _Any

if _TYPE_CHECKING:  # what the names are, for type checkers and IDEs; imported lazily at run time
    from . import evaluate, tasks
    from .core.modes import InfluenceMode
    from .core.operators import Curvature
    from .core.preconditioners import JacobiPreconditioner, NystroemPreconditioner, Preconditioner
    from .core.solvers.arnoldi import ArnoldiInfluence
    from .core.solvers.base import InfluenceModel
    from .core.solvers.cg import CgInfluence
    from .core.solvers.direct import DirectInfluence
    from .core.solvers.ekfac import EkfacInfluence
    from .core.solvers.lissa import LissaInfluence
    from .core.solvers.nystroem import NystroemSketchInfluence
    from .core.task import Task
    from .errors import (
        ConvergenceWarning,
        DivergenceError,
        NonFiniteError,
        NotFittedError,
        NotPositiveDefiniteError,
        RenamedWarning,
        StoreError,
    )
    from .index import GradientIndex
    from .mapping.calculator import DaskInfluenceCalculator, SequentialInfluenceCalculator

# public name -> the module that defines it (None: the name is a subpackage/module of its own)
_WHERE: dict[str, str | None] = {
    # ready-made tasks (di.tasks.classification(), ...) and evaluation against retraining (di.evaluate.lds, ...)
    "tasks": None,
    "evaluate": None,
    # choices and building blocks
    "InfluenceMode": ".core.modes",
    "Curvature": ".core.operators",
    "Preconditioner": ".core.preconditioners",
    "JacobiPreconditioner": ".core.preconditioners",
    "NystroemPreconditioner": ".core.preconditioners",
    # solvers (in-memory core)
    "InfluenceModel": ".core.solvers.base",
    "DirectInfluence": ".core.solvers.direct",
    "CgInfluence": ".core.solvers.cg",
    "LissaInfluence": ".core.solvers.lissa",
    "ArnoldiInfluence": ".core.solvers.arnoldi",
    "NystroemSketchInfluence": ".core.solvers.nystroem",
    "EkfacInfluence": ".core.solvers.ekfac",
    "Task": ".core.task",
    # errors and warnings
    "ConvergenceWarning": ".errors",
    "DivergenceError": ".errors",
    "NonFiniteError": ".errors",
    "NotFittedError": ".errors",
    "NotPositiveDefiniteError": ".errors",
    "RenamedWarning": ".errors",
    "StoreError": ".errors",
    # mapping layer: blocks on Dask, results in zarr
    "DaskInfluenceCalculator": ".mapping.calculator",
    "SequentialInfluenceCalculator": ".mapping.calculator",
    # corpus scale: projected training gradients built once, queried many times
    "GradientIndex": ".index",
}


def __getattr__(name: str) -> _Any:
    """Import a public name on first use (and keep it: later lookups do not come here)."""
    if name not in _WHERE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    where = _WHERE[name]
    value = _import_module(f".{name}", __name__) if where is None else getattr(_import_module(where, __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    """The public names (``__all__``) and the module's own dunders; no import helpers."""
    return sorted(set(__all__) | {name for name in globals() if name.startswith("__")})


try:
    __version__ = _version("dask-influence")
except _PackageNotFoundError:  # running from a source tree without installation
    __version__ = "0.0.0+unknown"

__all__ = [
    "GradientIndex",
    "InfluenceModel",
    "DirectInfluence",
    "CgInfluence",
    "LissaInfluence",
    "ArnoldiInfluence",
    "NystroemSketchInfluence",
    "EkfacInfluence",
    "DaskInfluenceCalculator",
    "SequentialInfluenceCalculator",
    "Task",
    "tasks",
    "evaluate",
    "InfluenceMode",
    "Curvature",
    "Preconditioner",
    "JacobiPreconditioner",
    "NystroemPreconditioner",
    "ConvergenceWarning",
    "DivergenceError",
    "NonFiniteError",
    "NotFittedError",
    "NotPositiveDefiniteError",
    "RenamedWarning",
    "StoreError",
    "__version__",
]

del annotations  # the __future__ import's flag: not a name of the API
