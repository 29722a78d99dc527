"""The zarr layout of a store: its arrays, chunking, codecs and attributes.

Layout of the zarr group (zarr format 3):

- ``influences``: ``(n_test, n_train[, *features])``, chunked as (test block, train block),
  fill value NaN;
- ``influences_done``: ``(n_test_blocks, n_train_blocks)`` int8, one chunk per flag, set to
  1 after the matching ``influences`` chunk is written. An absent chunk of ``influences``
  therefore never passes for "computed" (zarr does not write chunks equal to the fill value);
- optional ``self_influences`` ``(n_train,)`` with ``self_influences_done``;
- optional top-k arrays ``top_helpful_indices``/``_values`` and ``top_harmful_indices``/
  ``_values`` ``(n_test, k)`` with ``topk_done``;
- optional ``factors`` ``(n_test, p)`` with ``factors_done``: the saved test factors of each
  test block (:mod:`.factors`), read back by a resume instead of solving again;
- optional ``solver_info`` ``(n_test_blocks, 3)`` float64 for iterative solvers (CG, LiSSA):
  per test block the iterations, the largest error estimate (CG and LiSSA: the relative
  residual; Arnoldi and Nystroem: the captured fraction of the gradient's norm) and
  the number of right-hand sides that missed the tolerance; NaN until recorded;
- attributes under ``"dask_influence"``: the job's configuration, the sign convention,
  shapes, library versions and ``complete`` (true only once every flag is set).

Every write covers whole chunks, so concurrent tasks never share one. Every array is
written with a CRC32C checksum after zstd compression, so a truncated or altered chunk
fails to decode (see :mod:`.verify` and ``docs/reliability.md``).
"""

from __future__ import annotations

import datetime as _dt
import json
from dataclasses import dataclass
from typing import Any

import numpy as np
import zarr

from ..errors import StoreError
from .codecs import codecs
from .factors import check_factors, create_factors

ATTR = "dask_influence"
FORMAT_VERSION = 1
SIGN_CONVENTION = (
    "influence[i, j] = grad L(test_i)^T (H + lambda I)^-1 grad L(train_j); positive means "
    "training point j helps test point i (removing it raises the test loss by about "
    "influence / n_train)."
)


FLAG_ARRAYS = (
    ("influences", "influences_done"),
    ("self_influences", "self_influences_done"),
    ("top_k", "topk_done"),
)
"""The tracked arrays of a store and their done-flag arrays (:mod:`.completion` reads them, :mod:`.fits`
clears them)."""


def versions() -> dict[str, str]:
    """Versions of the libraries that shape the result."""
    import dask
    import torch

    from .. import __version__

    return {
        "dask_influence": __version__,
        "torch": torch.__version__,
        "dask": dask.__version__,
        "zarr": zarr.__version__,
        "numpy": np.__version__,
    }


def normalize_config(config: dict) -> dict:
    """``config`` as it reads back from the store's JSON attributes (sorted keys, non-JSON values as str)."""
    return json.loads(json.dumps(config, sort_keys=True, default=str))


@dataclass(frozen=True)
class StoreLayout:
    """Shapes and chunking of the arrays of one job."""

    test_sizes: tuple[int, ...]
    train_sizes: tuple[int, ...]
    feature_shape: tuple[int, ...] | None  # None in "up" mode
    dtype: str
    top_k: int | None
    self_influences: bool
    solver_info: bool = False  # an iterative solver: record residuals per test block
    factors: int | None = None  # save the test factors, ``(n_test, factors)``: factors = p (None: not saved)

    @property
    def shape(self) -> tuple[int, ...]:
        """Shape of ``influences``: ``(n_test, n_train[, *features])``."""
        return (sum(self.test_sizes), sum(self.train_sizes)) + tuple(self.feature_shape or ())

    @property
    def chunks(self) -> tuple[int, ...]:
        """Chunk shape of ``influences``: the largest test block by the largest train block."""
        return (max(self.test_sizes), max(self.train_sizes)) + tuple(self.feature_shape or ())


def create_group(path: str, config: dict, layout: StoreLayout) -> zarr.Group:
    """Create (replacing whatever is at ``path``) the group, its arrays and its attributes."""
    group = zarr.open_group(path, mode="w")
    n_i, n_j = len(layout.test_sizes), len(layout.train_sizes)
    compress = codecs()
    group.create_array(
        "influences",
        shape=layout.shape,
        chunks=layout.chunks,
        dtype=layout.dtype,
        fill_value=np.nan,
        config={"write_empty_chunks": True},
        **compress,
    )
    group.create_array("influences_done", shape=(n_i, n_j), chunks=(1, 1), dtype="int8", fill_value=0, **compress)
    if layout.self_influences:
        group.create_array(
            "self_influences",
            shape=(sum(layout.train_sizes),),
            chunks=(max(layout.train_sizes),),
            dtype=layout.dtype,
            fill_value=np.nan,
            config={"write_empty_chunks": True},
            **compress,
        )
        group.create_array("self_influences_done", shape=(n_j,), chunks=(1,), dtype="int8", fill_value=0, **compress)
    if layout.top_k:
        k = layout.top_k
        shape, chunks = (sum(layout.test_sizes), k), (max(layout.test_sizes), k)
        for kind in ("helpful", "harmful"):
            group.create_array(
                f"top_{kind}_indices",
                shape=shape,
                chunks=chunks,
                dtype="int64",
                fill_value=-1,
                config={"write_empty_chunks": True},
                **compress,
            )
            group.create_array(
                f"top_{kind}_values",
                shape=shape,
                chunks=chunks,
                dtype=layout.dtype,
                fill_value=np.nan,
                config={"write_empty_chunks": True},
                **compress,
            )
        group.create_array("topk_done", shape=(n_i,), chunks=(1,), dtype="int8", fill_value=0, **compress)
    if layout.solver_info:
        create_solver_info(group, n_i)
    if layout.factors:
        create_factors(group, layout.test_sizes, layout.factors, layout.dtype)
    group.attrs[ATTR] = {
        "format": FORMAT_VERSION,
        "config": config,
        "sign_convention": SIGN_CONVENTION,
        "shape": list(layout.shape),
        "test_block_sizes": list(layout.test_sizes),
        "train_block_sizes": list(layout.train_sizes),
        "versions": versions(),
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(),
        "complete": False,
    }
    return group


def create_solver_info(group: zarr.Group, n_blocks: int) -> None:
    """Add the ``solver_info`` array (NaN rows, one chunk per test block)."""
    group.create_array(
        "solver_info", shape=(n_blocks, 3), chunks=(1, 3), dtype="float64", fill_value=np.nan, **codecs()
    )


def check_arrays(path: str, group: Any, layout: StoreLayout) -> None:
    """The arrays of a store being resumed have the job's shapes, chunks and dtype.

    Adds ``solver_info`` if the job records it and the store has none, and the saved factors'
    arrays if the job saves them and the store has none (a store of an earlier version).

    Raises:
        StoreError: an array is missing or has other shapes, chunks or dtype.
    """
    expected = {
        "influences": (layout.shape, layout.chunks, layout.dtype),
        "influences_done": ((len(layout.test_sizes), len(layout.train_sizes)), None, "int8"),
    }
    if layout.self_influences:
        expected["self_influences"] = ((sum(layout.train_sizes),), (max(layout.train_sizes),), layout.dtype)
    if layout.top_k:
        expected["top_helpful_indices"] = ((sum(layout.test_sizes), layout.top_k), None, "int64")
    for name, (shape, chunks, dtype) in expected.items():
        if name not in group:
            raise StoreError(
                f"The store {path!r} has no array {name!r} although its attributes match this "
                "job; it was altered. Pass overwrite=True to start afresh."
            )
        a = group[name]
        if (
            tuple(a.shape) != tuple(shape)
            or (chunks is not None and tuple(a.chunks) != tuple(chunks))
            or str(a.dtype) != dtype
        ):
            raise StoreError(
                f"The array {name!r} of the store {path!r} has shape {tuple(a.shape)}, chunks "
                f"{tuple(a.chunks)} and dtype {a.dtype}, but this job needs shape {tuple(shape)}"
                + (f", chunks {tuple(chunks)}" if chunks is not None else "")
                + f" and dtype {dtype}; "
                "the store was altered. Pass overwrite=True to start afresh."
            )
    if layout.solver_info and "solver_info" not in group:
        create_solver_info(group, len(layout.test_sizes))
    if layout.factors:
        check_factors(path, group, layout.test_sizes, layout.factors, layout.dtype)
