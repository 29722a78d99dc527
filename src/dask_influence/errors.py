"""The library's exceptions and warnings.

Every error a user can trigger with bad input is a subclass of :class:`ValueError` or
:class:`TypeError` (or :class:`RuntimeError` for failures of a computation), so that
``except ValueError`` keeps working for code that does not know this library. Messages
name the argument, the value received and the fix.
"""

from __future__ import annotations


class NotFittedError(ValueError):
    """A method that needs a fitted solver was called before ``fit``."""


class NotPositiveDefiniteError(ValueError):
    """The regularized curvature matrix is not positive definite.

    Attributes:
        smallest_eigenvalue: the smallest eigenvalue of ``H + regularization * I``.
        suggested_regularization: a regularization that makes the matrix positive definite.
    """

    def __init__(self, message: str, *, smallest_eigenvalue: float, suggested_regularization: float):
        super().__init__(message)
        self.smallest_eigenvalue = smallest_eigenvalue
        self.suggested_regularization = suggested_regularization


class NonFiniteError(ValueError):
    """NaN or Inf found in inputs, targets, gradients or curvature products."""


class DivergenceError(RuntimeError):
    """An iterative solver diverged (its iterates grew without bound or became non-finite)."""


class ConvergenceWarning(UserWarning):
    """An iterative solver stopped at ``maxiter`` before reaching its tolerance."""


class RenamedWarning(FutureWarning):
    """An old spelling of a keyword or job-file key was used; the message names the new one.
    Old spellings keep working for one release (docs/api.md, "One vocabulary")."""


class StoreError(ValueError):
    """The output store cannot be used as asked (exists, other configuration, not a store)."""


class JobFileError(ValueError):
    """A ``dask-influence`` job file (TOML) is invalid.

    The message lists every problem found, one per line, each naming its section, e.g.
    ``[solver] unknown key 'regularisation'; did you mean 'regularization'?``.

    Attributes:
        problems: the problems, in the order found.
        path: the job file, when the problems come from one.
    """

    def __init__(self, problems: list[str] | str, path: str | None = None):
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        self.path = path
        where = f"{path}: " if path else ""
        if len(self.problems) == 1:
            message = f"{where}{self.problems[0]}"
        else:
            message = f"{where}{len(self.problems)} problems:\n" + "\n".join(self.problems)
        super().__init__(message)
