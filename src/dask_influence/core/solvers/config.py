"""Solver hyperparameters as frozen dataclasses.

Every solver has one configuration class, a frozen dataclass whose fields are its
hyperparameters: ``field(metadata={"help": ...})`` documents each one (the job file, the
CLI and the docs table show that text), and ``__post_init__`` validates and normalizes
the values. A solver is built from its configuration; ``solver.config`` is the single
place its hyperparameters live, so saving, comparing and fingerprinting a solver never
scrape its attributes.

``solve_time`` names the fields that may change after fitting without a refit (the
regularization of the solvers that factorize the unregularized curvature).
"""

from __future__ import annotations

import dataclasses
import math
import os
import sys
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, ClassVar

from torch import Tensor

from ..operators import Curvature


class _Required:
    """The default of a hyperparameter without one: the user must give it."""

    def __repr__(self) -> str:
        return "REQUIRED"


REQUIRED: Any = _Required()


def hyperparameter(default: Any, help: str, **kwargs: Any) -> Any:
    """A configuration field with ``default`` (or :data:`REQUIRED`) and its ``help`` text
    (shown by the job file and the docs)."""
    return field(default=default, metadata={"help": help}, **kwargs)


def check_nonnegative(name: str, value: Any) -> float:
    """``value`` as a finite float >= 0, else a ``TypeError``/``ValueError`` naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a non-negative number; got {value!r}.")
    value = float(value)
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"{name} must be a finite number >= 0; got {value!r}.")
    return value


def check_positive_int(name: str, value: Any) -> int:
    """``value`` as an int >= 1, else a ``TypeError``/``ValueError`` naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be a positive int; got {value!r}.")
    if value < 1:
        raise ValueError(f"{name} must be a positive int; got {value}.")
    return value


def check_seed(value: Any) -> int:
    """``value`` as an int seed, else a ``TypeError``."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"seed must be an int; got {value!r}.")
    return value


def check_blocks(value: Any) -> str:
    """``"full"`` (the whole curvature) or ``"layer"`` (block-diagonal by layer)."""
    if value not in ("full", "layer"):
        raise ValueError(
            f"blocks must be 'full' (the whole curvature matrix) or 'layer' (one independent "
            f"block per layer); got {value!r}."
        )
    return value


AUTO_FRACTION = 0.25
"""``rank="auto"`` (Arnoldi, Nystroem) resolves the eigenvalues of ``H`` above ``AUTO_FRACTION *
regularization`` in magnitude: outside the retained eigenvectors ``H`` is taken to be zero, and
an eigenvalue ``mu`` below that level changes ``1 / (mu + lambda)`` by at most a third (20% if
positive). On the wine outlier setting the exact eigenpairs above it reach Pearson 0.9997 against
Direct (0.998 above ``0.5 lambda``, 0.990 above ``lambda``)."""


def check_rank_choice(value: Any) -> int | str:
    """``value`` as a positive int or the string ``"auto"``, else a ``TypeError``/``ValueError``."""
    if isinstance(value, str):
        if value.strip().lower() != "auto":
            raise ValueError(f"rank must be a positive int or 'auto'; got {value!r}.")
        return "auto"
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"rank must be a positive int or 'auto'; got {value!r}.")
    return check_positive_int("rank", value)


def check_rank(value: Any, num_params: int, hint: str) -> int:
    """``value`` as an int in ``1..num_params``; ``hint`` says what to do instead."""
    rank = check_positive_int("rank", value)
    if rank > num_params:
        raise ValueError(
            f"rank must be at most the number of trainable parameters p={num_params}; got rank={rank}. {hint}"
        )
    return rank


@dataclass(frozen=True)
class SolverConfig:
    """Hyperparameters every solver has."""

    regularization: float = hyperparameter(0.0, "lambda >= 0 added to the curvature: H + lambda I.")
    curvature: str = hyperparameter(
        "hessian",
        "'hessian' (the exact second derivative) or 'ggn' (generalized Gauss-Newton, "
        "positive semi-definite for losses convex in the model outputs).",
    )
    chunk_size: int = hyperparameter(256, "Samples per vectorized per-sample-gradient computation (a memory knob).")

    solve_time: ClassVar[frozenset[str]] = frozenset()
    """Fields that may change after fitting without a refit."""

    resource_fields: ClassVar[frozenset[str]] = frozenset()
    """Fields that size the work (memory) without changing the numbers: left out of the fingerprint
    (:meth:`fingerprint_dict`) and of a store's recorded parameters, so that a fit or a store made
    under one budget is the same under another (and those written before the field existed still
    match). EK-FAC's ``memory_budget`` is not one: it can make a factor diagonal."""

    renamed: ClassVar[Mapping[str, str]] = MappingProxyType({})
    """``{old name: new name}`` of renamed hyperparameters. The old keyword (and job-file key,
    and attribute) keeps working for one release with a ``RenamedWarning``; a fit saved with
    the old name still loads (:meth:`upgrade`), and fingerprints hash the old name
    (:meth:`fingerprint_dict`), so that stores written before the rename still resume."""

    def __post_init__(self) -> None:
        missing = [name for name in self.field_names() if getattr(self, name) is REQUIRED]
        if missing:
            raise TypeError(
                f"{type(self).__name__} needs {', '.join(missing)}; pass "
                + ", ".join(f"{name}=..." for name in missing)
                + "."
            )
        self._set("regularization", check_nonnegative("regularization", self.regularization))
        self._set("curvature", Curvature.parse(self.curvature).value)
        self._set("chunk_size", check_positive_int("chunk_size", self.chunk_size))

    if not typing.TYPE_CHECKING:  # type checkers keep refusing unknown attributes

        def __getattr__(self, name: str) -> Any:
            """An old name of :attr:`renamed`: the new one's value, with a ``RenamedWarning``."""
            new = type(self).renamed.get(name)
            if new is None:
                raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")
            from ...renamed import warn_renamed

            warn_renamed(f"{type(self).__name__}.{name}", f"{type(self).__name__}.{new}")
            return getattr(self, new)

    @classmethod
    def keywords(cls, where: str, hyperparameters: dict[str, Any]) -> dict[str, Any]:
        """``hyperparameters`` as a user passed them, with the old names of :attr:`renamed` changed
        to the new ones, each with a ``RenamedWarning`` naming ``where`` (``TypeError``: both given)."""
        if not any(old in hyperparameters for old in cls.renamed):
            return hyperparameters
        from ...renamed import renamed

        outside = 1  # frames up to the caller's code outside this package: where the warning points
        frame = sys._getframe(1)
        package = os.path.dirname(os.path.dirname(os.path.dirname(__file__)))
        while frame.f_back is not None and frame.f_code.co_filename.startswith(package):
            frame, outside = frame.f_back, outside + 1
        out = dict(hyperparameters)
        for old, new in cls.renamed.items():
            if old in out:
                out[new] = renamed(where, old, out.pop(old), new, out.get(new), stacklevel=2 + outside)
        return out

    @classmethod
    def upgrade(cls, hyperparameters: Mapping[str, Any]) -> dict[str, Any]:
        """Recorded hyperparameters (a saved fit's) with the old names of :attr:`renamed` changed to
        the new ones, silently: a file written before a rename loads as it was written."""
        out = dict(hyperparameters)
        for old, new in cls.renamed.items():
            if old in out and new not in out:
                out[new] = out.pop(old)
        return out

    def _set(self, name: str, value: Any) -> None:
        """Normalize a field in ``__post_init__`` (the dataclass is frozen)."""
        object.__setattr__(self, name, value)

    @classmethod
    def field_names(cls) -> tuple[str, ...]:
        """The names of the hyperparameters a user sets, in declaration order."""
        return tuple(f.name for f in dataclasses.fields(cls) if f.init)

    @classmethod
    def required(cls) -> tuple[str, ...]:
        """The hyperparameters without a default."""
        return tuple(f.name for f in dataclasses.fields(cls) if f.init and f.default is REQUIRED)

    @classmethod
    def defaults(cls) -> dict[str, Any]:
        """``{name: default}`` of the hyperparameters that have one."""
        return {
            f.name: f.default
            for f in dataclasses.fields(cls)
            if f.init and f.default is not REQUIRED and f.default is not dataclasses.MISSING
        }

    @classmethod
    def help(cls) -> dict[str, str]:
        """``{name: help text}`` of every hyperparameter."""
        return {f.name: f.metadata.get("help", "") for f in dataclasses.fields(cls) if f.init}

    @classmethod
    def types(cls) -> dict[str, Any]:
        """``{name: type annotation}`` of every hyperparameter (resolved)."""
        hints = typing.get_type_hints(cls)
        return {name: hints[name] for name in cls.field_names()}

    def to_dict(self) -> dict[str, Any]:
        """The hyperparameters as ``{name: value}`` (values: numbers, strings, tuples, tensors, None).

        A :class:`~dask_influence.core.preconditioners.Preconditioner` instance is recorded by
        its class name; everything else as given.
        """
        return {name: _plain(getattr(self, name)) for name in self.field_names()}

    def replace(self, **changes: Any) -> SolverConfig:
        """A copy with ``changes`` applied (and validated)."""
        return dataclasses.replace(self, **changes)

    def fingerprint_dict(self) -> dict[str, Any]:
        """:meth:`to_dict` with each renamed hyperparameter under its old name (:attr:`renamed`): what
        the fingerprint hashes, so that a rename leaves fingerprints (and the stores that record
        them) as they were."""
        old_names = {new: old for old, new in self.renamed.items()}
        return {old_names.get(k, k): v for k, v in self.to_dict().items() if k not in self.resource_fields}

    def fit_relevant(self) -> dict[str, Any]:
        """:meth:`to_dict` without the :attr:`solve_time` fields: what a fit depends on."""
        return {k: v for k, v in self.to_dict().items() if k not in self.solve_time}


def _plain(value: Any) -> Any:
    if isinstance(value, (bool, int, float, str, type(None), Tensor)):
        return value
    if isinstance(value, (list, tuple)):
        return tuple(_plain(v) for v in value)
    return f"<{type(value).__name__}>"


def describe_type(hint: Any) -> str:
    """A short readable name of a type annotation (``'int | None'``)."""
    if hint is type(None):
        return "None"
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return " | ".join(describe_type(a) for a in typing.get_args(hint))
    if origin is not None:
        args = ", ".join(describe_type(a) for a in typing.get_args(hint) if a is not Ellipsis)
        return f"{getattr(origin, '__name__', str(origin))}[{args}]"
    return getattr(hint, "__name__", str(hint))
