"""Old spellings of renamed keywords and job-file keys: accepted for one release, with a
:class:`~dask_influence.errors.RenamedWarning` that names the new spelling (docs/api.md, "One
vocabulary", lists every rename)."""

from __future__ import annotations

import warnings
from typing import Any

from .errors import RenamedWarning


def renamed(where: str, old: str, old_value: Any, new: str, new_value: Any, *, stacklevel: int = 3) -> Any:
    """The value of the keyword ``new``, given either as ``new`` or as its old spelling ``old``.

    ``None`` for both: ``None``. Both given: ``TypeError``. Only ``old``: its value,
    with a :class:`RenamedWarning` naming ``where`` and the new spelling.
    """
    if old_value is None:
        return new_value
    if new_value is not None:
        raise TypeError(f"{where}: pass {new}= only ({old}= is its old spelling).")
    warn_renamed(f"{where}: {old}=", f"{new}=", stacklevel=stacklevel + 1)
    return old_value


def warn_renamed(old: str, new: str, *, stacklevel: int = 3) -> None:
    """Warn with a :class:`RenamedWarning` that ``old`` (a keyword, method or job-file key, as the
    user wrote it) is now spelled ``new``."""
    warnings.warn(
        f"{old} is now spelled {new}; the old spelling still works in this release and will be removed in the next.",
        RenamedWarning,
        stacklevel=stacklevel,
    )
