"""The one table of solvers: ``name -> class``.

A solver module registers its class with :func:`register`; the job file (``[solver]
method``), the CLI, saved fits, the fingerprint that names Dask keys, the docs table and the
tests' solver lists all read :data:`SOLVERS` instead of keeping their own lists.

Solvers of other installed packages register through the entry-point group
``dask_influence.solvers`` (``name = "package.module:SolverClass"`` in that package's
``pyproject.toml``); they are loaded the first time a name is not found, so a job file can
name them (``[solver] method = "name"``) and the cluster's workers import them like any
installed module.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, TypeVar

if TYPE_CHECKING:
    from .base import InfluenceModel

SOLVERS: dict[str, type[InfluenceModel]] = {}
"""``method name -> solver class``, in registration order."""

S = TypeVar("S", bound=type)


def register(name: str) -> Callable[[S], S]:
    """Class decorator: make a solver class available as ``name`` (job files, CLI, saved fits).

    The class must set ``config_class`` to its :class:`~.config.SolverConfig` subclass.
    Registering a second class under a taken name is refused.
    """
    key = name.strip().lower()

    def add(cls: S) -> S:
        existing = SOLVERS.get(key)
        if existing is not None and existing is not cls and existing.__qualname__ != cls.__qualname__:
            raise ValueError(f"A solver named {key!r} is already registered ({existing.__qualname__}).")
        if not hasattr(cls, "config_class"):
            raise TypeError(f"{cls.__qualname__} must set config_class to register as a solver.")
        SOLVERS[key] = cls
        cls.method = key  # type: ignore[attr-defined]
        return cls

    return add


ENTRY_POINT_GROUP = "dask_influence.solvers"
_plugins_loaded = False


def load_plugins() -> None:
    """Register the solvers of the ``dask_influence.solvers`` entry points (once per process).

    Each entry point names a solver class; it is registered under the entry point's name
    unless its module already registered it.
    """
    global _plugins_loaded
    if _plugins_loaded:
        return
    _plugins_loaded = True
    from importlib.metadata import entry_points

    for entry in entry_points(group=ENTRY_POINT_GROUP):
        cls = entry.load()
        if cls not in SOLVERS.values():
            register(entry.name)(cls)


def solver_class(name: str) -> type[InfluenceModel]:
    """The solver class registered as ``name`` (case-insensitive), or a ``ValueError`` listing the names."""
    key = str(name).strip().lower()
    if key not in SOLVERS:
        load_plugins()
    if key not in SOLVERS:
        import difflib

        close = difflib.get_close_matches(key, list(SOLVERS), n=1, cutoff=0.5)
        hint = f"; did you mean {close[0]!r}?" if close else "."
        raise ValueError(f"Unknown solver {name!r}; choose one of {', '.join(SOLVERS)}{hint}")
    return SOLVERS[key]


def name_of(cls: type) -> str:
    """The registered name of a solver class (its ``method``), or ``ValueError``."""
    for key, value in SOLVERS.items():
        if value is cls:
            return key
    raise ValueError(f"{cls.__qualname__} is not a registered solver; decorate it with @register('name').")
