"""The zarr output store: create it or open it for ``resume``, and the chunk writes of the workers.

The arrays and attributes are described in :mod:`.layout`; completion (done flags, the
``complete`` attribute) is in :mod:`.completion`, verification before resume in
:mod:`.verify`, the convergence records of iterative solvers in :mod:`.solver_info`, the
saved test factors in :mod:`.factors` and the top-k merge in :mod:`.topk`.
Their public names are re-exported here, so that this module is the one entry point of the
writing side (``dask_influence.mapping.store`` is this module, kept for compatibility).
"""

from __future__ import annotations

import errno
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
import zarr

from ..errors import StoreError
from . import urls
from .completion import (
    CompletionRecorder,
    CompletionState,
    completion,
    is_complete,
    load_state,
    mark_complete,
    read_flags,
)
from .factors import read_factors, saved_blocks, write_factors
from .fits import FitIdentity, change_reason, fit_record, new_record, start_generation
from .layout import (
    ATTR,
    FORMAT_VERSION,
    SIGN_CONVENTION,
    StoreLayout,
    check_arrays,
    codecs,
    create_group,
    create_solver_info,
    normalize_config,
    versions,
)
from .solver_info import SOLVER_INFO_COLUMNS, read_solver_info, solver_info_row, solver_info_summary, write_solver_info
from .topk import candidates, chunk_candidates, merge, write_topk
from .verify import VerifyReport, repair, verify_mode, verify_store

__all__ = [
    "ATTR",
    "FORMAT_VERSION",
    "CompletionRecorder",
    "CompletionState",
    "FitIdentity",
    "SIGN_CONVENTION",
    "SOLVER_INFO_COLUMNS",
    "StoreLayout",
    "VerifyReport",
    "check_arrays",
    "check_path",
    "codecs",
    "candidates",
    "chunk_candidates",
    "completion",
    "create_group",
    "create_solver_info",
    "is_complete",
    "load_state",
    "mark_complete",
    "merge",
    "normalize_config",
    "prepare_store",
    "read_factors",
    "read_flags",
    "read_solver_info",
    "repair",
    "saved_blocks",
    "solver_info_row",
    "solver_info_summary",
    "verify_mode",
    "verify_store",
    "versions",
    "write_factors",
    "write_influence_chunks",
    "write_self_chunk",
    "write_solver_info",
    "write_topk",
]


# -- opening a store for a job -----------------------------------------------------------


def _nearest_existing(path: str) -> str:
    path = os.path.abspath(path)
    while not os.path.exists(path):
        parent = os.path.dirname(path)
        if parent == path:
            break
        path = parent
    return path


def check_path(path: str | os.PathLike) -> None:
    """Refuse a local output path that is a file or lies in a directory this process cannot write.

    Writes and removes a probe file in the store's directory (or, for a new store, in its
    nearest existing ancestor). URLs are not checked.

    Raises:
        StoreError: naming the path, the directory and the reason.
    """
    path = os.fspath(path)
    if urls.is_url(path):
        return
    if os.path.isfile(path):
        raise StoreError(f"The output path {path!r} is a file; pass a directory path for the zarr store.")
    where = _nearest_existing(path)
    if os.path.isfile(where):
        raise StoreError(f"Cannot create the output store {path!r}: {where!r} is a file, not a directory.")
    try:
        fd, probe = tempfile.mkstemp(prefix=".dask-influence-probe-", dir=where)
        os.close(fd)
        os.remove(probe)
    except OSError as err:
        raise StoreError(
            f"Cannot write the output store {path!r}: the directory {where!r} is not writable "
            f"({err.strerror or err}). Choose a directory you can write to, or fix its permissions."
        ) from None


def prepare_store(
    path: str,
    *,
    config: dict,
    layout: StoreLayout,
    resume: bool,
    overwrite: bool,
    fit: FitIdentity | None = None,
) -> zarr.Group:
    """Create the store, or open an existing one for ``resume`` after checking its configuration.

    ``fit``: the fit the job computes with (default: the fingerprint in ``config``). A store
    being resumed whose current fit generation is another (a refit, see :mod:`.fits`) starts
    a new generation, which makes every chunk of the earlier fits not done; a store recorded
    with another fingerprint is accepted only after a refit (``fit.refit``).

    Raises:
        StoreError: the path exists and neither ``resume`` nor ``overwrite`` is set; the
            existing store was written with another configuration (or another fit, without
            a refit); the path is a file or a directory that is not a dask-influence store.
    """
    if resume and overwrite:
        raise ValueError("Pass resume=True or overwrite=True, not both.")
    path = str(path)
    config = normalize_config(config)
    fit = fit or FitIdentity(str(config.get("solver_fingerprint")))
    if os.path.isfile(path):
        raise StoreError(f"The output path {path!r} is a file; pass a directory path for the zarr store.")
    if urls.exists(path) and not (os.path.isdir(path) and not os.listdir(path)):
        existing: Any = _open_existing(path)
        if existing is None:
            raise StoreError(
                f"The output path {path!r} exists and is not a dask-influence zarr store; "
                "choose another path (it is not deleted)."
            )
        if overwrite:
            pass  # recreated below
        elif resume:
            stored = existing.attrs[ATTR].get("config") or {}
            ignored = {"solver_fingerprint"} if fit.refit else set()
            diff = sorted(k for k in set(stored) | set(config) if k not in ignored and stored.get(k) != config.get(k))
            if diff:
                hint = (
                    " (the fitted state differs: after a refit pass refit=True to recompute every chunk with it)"
                    if diff == ["solver_fingerprint"]
                    else ""
                )
                raise StoreError(
                    f"The store {path!r} was written by a different configuration (differs in: "
                    f"{', '.join(diff)}){hint}; resume it with the same solver, data and blocks, or "
                    "pass overwrite=True to start afresh."
                )
            check_arrays(path, existing, layout)
            reason = change_reason(fit_record(existing.attrs[ATTR]), fit)
            if reason is not None:
                start_generation(existing, fit, reason)
            return existing
        else:
            raise StoreError(
                f"The output store {path!r} already exists; pass resume=True to complete it "
                "or overwrite=True to replace it."
            )
    try:
        group = create_group(path, config, layout)
    except OSError as err:
        raise StoreError(f"Cannot write the output store {path!r}: {err.strerror or err}.") from None
    attrs: dict = dict(group.attrs[ATTR])  # type: ignore[arg-type]
    group.attrs[ATTR] = {**attrs, "fit": new_record(fit, 1, "first fit")}
    return group


def _open_existing(path: str) -> zarr.Group | None:
    try:
        group: Any = zarr.open_group(path, mode="r+")
    except Exception:
        return None
    return group if ATTR in group.attrs else None


# -- writes from the workers (module-level task functions) ------------------------------


def write_influence_chunks(
    path: str,
    j: int,
    col: tuple[int, int],
    targets: list[tuple[int, int, int, int]],
    values: list[np.ndarray],
    flag: int = 1,
) -> int:
    """Write chunks ``(i, j)`` of ``influences``, each followed by its done flag.

    Args:
        targets: ``(i, row_start, row_stop, position)`` for each chunk to write, where
            ``values[position]`` holds its data (the output of one influence task).
        flag: the flag value of the fit generation computing them (:mod:`.fits`).

    Returns the number of chunks written.
    """
    group: Any = zarr.open_group(path, mode="r+")
    array, done = group["influences"], group["influences_done"]
    for i, start, stop, position in targets:
        with naming_the_file(path, f"chunk ({i}, {j}) of influences"):
            array[start:stop, col[0] : col[1]] = values[position]
            done[i, j] = flag
    return len(targets)


@contextmanager
def naming_the_file(path: str, what: str) -> Iterator[None]:
    """Re-raise an ``OSError`` that names no file (a write that failed, e.g. a full disk:
    ``[Errno 28] No space left on device``) naming the store and what was being written."""
    try:
        yield
    except OSError as err:
        if err.filename is not None or err.errno is None:
            raise
        advice = (
            "; free space on that disk (or write the store elsewhere), then rerun with --resume"
            if (err.errno == errno.ENOSPC)
            else ""
        )
        raise OSError(err.errno, f"{err.strerror or err} writing {what}{advice}", path) from None


def write_self_chunk(path: str, j: int, col: tuple[int, int], value: np.ndarray, flag: int = 1) -> int:
    """Write chunk ``j`` of ``self_influences`` and then its done flag (value ``flag``)."""
    group: Any = zarr.open_group(path, mode="r+")
    with naming_the_file(path, f"chunk {j} of self_influences"):
        group["self_influences"][col[0] : col[1]] = value
        group["self_influences_done"][j] = flag
    return j
