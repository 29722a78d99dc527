"""The solvers, one module each, registered by name in :mod:`.registry` (in this order)."""

# ruff: noqa: I001  (the import order is the registration order: job files, docs and tests list them so)
from .direct import DirectInfluence
from .cg import CgInfluence
from .lissa import LissaInfluence
from .arnoldi import ArnoldiInfluence
from .nystroem import NystroemSketchInfluence
from .ekfac import EkfacInfluence
from .registry import SOLVERS, register, solver_class

__all__ = [
    "DirectInfluence",
    "CgInfluence",
    "LissaInfluence",
    "ArnoldiInfluence",
    "NystroemSketchInfluence",
    "EkfacInfluence",
    "SOLVERS",
    "register",
    "solver_class",
]
