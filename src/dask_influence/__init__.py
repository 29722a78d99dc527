"""dask-influence: influence functions for PyTorch models at any scale.

The public API, grouped by role. See ``docs/`` for the guide and ``DESIGN``-level contract:
``influence[i, j] = grad f(z_test_i)^T (H + lambda I)^-1 grad L(z_j)`` (``f`` the task's
measurement, the loss by default); positive means helpful.
"""

from importlib.metadata import PackageNotFoundError, version

# ready-made tasks (di.tasks.classification(), ...) and evaluation against retraining (di.evaluate.lds, ...)
from . import evaluate, tasks

# choices and building blocks
from .core.modes import InfluenceMode
from .core.operators import Curvature
from .core.preconditioners import JacobiPreconditioner, NystroemPreconditioner, Preconditioner

# solvers (in-memory core)
from .core.solvers.arnoldi import ArnoldiInfluence
from .core.solvers.base import InfluenceModel
from .core.solvers.cg import CgInfluence
from .core.solvers.direct import DirectInfluence
from .core.solvers.ekfac import EkfacInfluence
from .core.solvers.lissa import LissaInfluence
from .core.solvers.nystroem import NystroemSketchInfluence
from .core.task import Task

# errors and warnings
from .errors import (
    ConvergenceWarning,
    DivergenceError,
    NonFiniteError,
    NotFittedError,
    NotPositiveDefiniteError,
    StoreError,
)

# mapping layer: blocks on Dask, results in zarr
from .mapping.calculator import DaskInfluenceCalculator, SequentialInfluenceCalculator

try:
    __version__ = version("dask-influence")
except PackageNotFoundError:  # running from a source tree without installation
    __version__ = "0.0.0+unknown"

__all__ = [
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
    "StoreError",
    "__version__",
]
