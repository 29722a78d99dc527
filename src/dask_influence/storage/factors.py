"""Saved test factors: the solves of each test block, kept in the store so that a resume does not redo them.

The factors of test block ``i`` (``(H + lambda I)^-1 grad f(z)`` for each of its test points)
are what every chunk of its row needs; for an iterative solver they are most of a job's
cost. A job writes them to the store as they are computed:

- ``factors``: ``(n_test, p)`` in the job's output dtype (float64 for float64 models, else
  float32: exact for float32, float16 and bfloat16 factors), chunked by test block along the
  rows and in pieces of at most :data:`CHUNK_BYTES` along ``p``; fill value NaN;
- ``factors_done``: ``(n_test_blocks,)`` int8, set after block ``i``'s factors to the flag value
  of the fit generation that computed them (:mod:`.fits`), as the influence chunks' flags.

A resume reads the factors of a test block whose flag holds the current generation's value
instead of solving again, so its chunks come out bit-identical to a clean run's; a refit (a
new generation) makes every saved factor stale. The factors are not part of a store's
completion (:mod:`.completion`): a store is complete without them, and only the flags of the
test blocks a resume needs are read (O(missing rows), not O(blocks)).
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from ..errors import StoreError
from .codecs import checksum_only, codecs

FACTORS = "factors"
FACTORS_DONE = "factors_done"
CHUNK_BYTES = 64 * 2**20
"""The largest chunk of ``factors`` (a test block's rows by a piece of ``p``), in bytes."""


MIN_WIDTH = 2**16
"""The narrowest chunk of ``factors`` along ``p`` (bounds the number of files of many test points)."""
SPAN_BYTES = 256 * 2**20
"""The columns of every test point in one chunk of ``factors`` stay within this many bytes, where
:data:`MIN_WIDTH` allows: the slab one-pass scoring reads at once (``core.factor_columns.SLAB_BYTES``)."""


def factor_chunks(test_sizes: tuple[int, ...], num_params: int, dtype: str) -> tuple[int, int]:
    """The chunk shape of ``factors``: the largest test block by at most :data:`CHUNK_BYTES` of ``p``, and
    narrower where the columns of every test point at once would pass :data:`SPAN_BYTES` (at least
    :data:`MIN_WIDTH`): one-pass scoring reads and decodes a chunk-aligned span of columns of all rows at a
    time (:class:`StoredFactorColumns`)."""
    rows, itemsize = max(test_sizes), np.dtype(dtype).itemsize
    width = min(CHUNK_BYTES // (rows * itemsize), max(MIN_WIDTH, SPAN_BYTES // (sum(test_sizes) * itemsize)))
    return rows, max(1, min(int(num_params), width))


def create_factors(group: Any, test_sizes: tuple[int, ...], num_params: int, dtype: str) -> None:
    """Add ``factors`` and ``factors_done`` to a store (opened for writing)."""
    compress = codecs()
    group.create_array(  # checksummed, not compressed: float factors do not compress, and scoring decodes them
        FACTORS,
        shape=(sum(test_sizes), int(num_params)),
        chunks=factor_chunks(test_sizes, num_params, dtype),
        dtype=dtype,
        fill_value=np.nan,
        config={"write_empty_chunks": True},
        **checksum_only(),
    )
    group.create_array(FACTORS_DONE, shape=(len(test_sizes),), chunks=(1,), dtype="int8", fill_value=0, **compress)


def check_factors(path: str, group: Any, test_sizes: tuple[int, ...], num_params: int, dtype: str) -> None:
    """A store being resumed has ``factors`` of the job's shape and dtype (added if it has none).

    Raises:
        StoreError: the store's ``factors`` have another shape or dtype (it was altered).
    """
    if FACTORS not in group or FACTORS_DONE not in group:
        for name in (FACTORS, FACTORS_DONE):
            if name in group:
                del group[name]
        create_factors(group, test_sizes, num_params, dtype)
        return
    array = group[FACTORS]
    shape = (sum(test_sizes), int(num_params))
    if tuple(array.shape) != shape or str(array.dtype) != dtype or group[FACTORS_DONE].shape != (len(test_sizes),):
        raise StoreError(
            f"The array 'factors' of the store {path!r} has shape {tuple(array.shape)} and dtype {array.dtype}, "
            f"but this job needs {shape} and {dtype}; the store was altered. Pass overwrite=True to start afresh."
        )


def saved_blocks(group: Any, blocks: list[int], current: int, *, decode: bool = False) -> set[int]:
    """The test blocks among ``blocks`` whose factors are saved with the current fit (flag value ``current``).

    Reads the done flags of ``blocks`` only. For a local store, a block also needs all of its
    factor chunk files (checked to exist; with ``decode``, read and checksummed), so that a
    deleted or damaged file is solved again rather than failing the job.
    """
    from .chunkfiles import local_dir, read_chunks

    if not blocks or FACTORS_DONE not in group or FACTORS not in group:
        return set()
    flags = group[FACTORS_DONE]
    found = {
        c[0]
        for c, data in read_chunks(flags, [(i,) for i in blocks])
        if isinstance(data, np.ndarray) and data.size and int(data.reshape(-1)[0]) == current
    }
    array = group[FACTORS]
    pieces = -(-int(array.shape[1]) // int(array.chunks[1]))
    where = local_dir(array)
    if decode:
        coords = [(i, q) for i in sorted(found) for q in range(pieces)]
        found -= {c[0] for c, data in read_chunks(array, coords) if not isinstance(data, np.ndarray)}
    elif where is not None and array.metadata.chunk_key_encoding.name == "default":
        root = os.path.join(where, "c")
        found = {i for i in found if all(os.path.exists(os.path.join(root, str(i), str(q))) for q in range(pieces))}
    return found


def write_factors(
    path: str,
    blocks: list[tuple[int, tuple[int, int]]],
    factors: list[np.ndarray],
    flag: int,
    infos: list[np.ndarray] | None = None,
) -> int:
    """Write the factors of several test blocks (``blocks``: ``(i, rows)``; ``factors[n]``:
    ``(n_i, p)``), then their done flags ``flag``, in one task (one opening of the store).

    ``infos``: the blocks' ``solver_info`` rows (iterative solvers), written before the flags,
    so a block whose factors are saved also has its solver's report. Returns the blocks written.
    """
    import zarr

    group: Any = zarr.open_group(path, mode="r+")
    if infos is not None:
        group["solver_info"].oindex[[i for i, _ in blocks]] = np.stack(infos)
    array = group[FACTORS]
    for (_, (start, stop)), values in zip(blocks, factors):
        array[start:stop] = values
    group[FACTORS_DONE].oindex[[i for i, _ in blocks]] = flag
    return len(blocks)


def read_factors(path: str, blocks: list[tuple[int, tuple[int, int]]]) -> list[np.ndarray]:
    """The saved factors ``(n_i, p)`` of test blocks ``blocks`` (``(i, rows)``), in one task.

    Raises:
        StoreError: a block's factors do not decode or are missing (NaN); that block's done
            flag is cleared first, so the job run again with ``resume`` solves them again.
    """
    import zarr

    group: Any = zarr.open_group(path, mode="r+")
    array = group[FACTORS]
    out, problem = [], None
    for i, (start, stop) in blocks:
        try:
            values = np.asarray(array[start:stop])
            if np.isnan(values).any():
                problem = f"the saved factors of test block {i} in {path!r} are missing (NaN)"
        except Exception as err:  # a damaged chunk (its checksum)
            problem = f"the saved factors of test block {i} in {path!r} are damaged ({' '.join(str(err).split())})"
        if problem is not None:
            _refuse_block(group, i, problem)
        out.append(values)
    return out


def _refuse_block(group: Any, i: int, problem: str) -> None:
    """Clear test block ``i``'s done flag in ``group`` (open for writing), so that a resume solves its factors
    again, and raise the :class:`StoreError` naming ``problem``."""
    group[FACTORS_DONE][i] = 0
    raise StoreError(
        f"{problem[0].upper()}{problem[1:]}; its flag is cleared: run the job again with resume to solve them again."
    )


class StoredFactorColumns:
    """The saved factors of some test blocks, read by columns (a
    ``core.factor_columns.FactorColumns``): one-pass scoring's factors.

    ``columns(a, b)`` returns ``(n, b - a)`` for the blocks' ``n`` rows, in the blocks' order. The chunks
    are decoded (checksummed) a chunk-aligned span of columns at a time, and the last span is kept, so that
    reading a layer's slabs and its bias in order decodes each chunk once.

    Raises (from ``columns``):
        StoreError: a block's factors do not decode or are missing (NaN); that block's done flag is cleared
            first, so the job run again with ``resume`` solves them again.
    """

    def __init__(self, path: str, blocks: list[tuple[int, tuple[int, int]]]):
        self.path, self.blocks = path, list(blocks)
        self._array: Any = None
        self._span: tuple[int, int] = (0, 0)
        self._values: np.ndarray | None = None
        self._direct: Any = None
        self.decoded = 0
        """Numbers decoded so far (for tests and profiles)."""

    def _open(self) -> Any:
        if self._array is None:
            import zarr

            self._array = zarr.open_group(self.path, mode="r")[FACTORS]
            self._direct = _direct_reader(self._array)  # once: its codec checks and its chunk-sized buffer
        return self._array

    @property
    def shape(self) -> tuple[int, int]:
        """``(n, p)``: the blocks' rows by the parameters."""
        return sum(stop - start for _, (start, stop) in self.blocks), int(self._open().shape[1])

    def columns(self, start: int, stop: int) -> Any:
        """Columns ``start:stop`` of the blocks' rows: a float tensor ``(n, stop - start)`` (a view of the
        decoded span)."""
        import torch

        a, b = self._span
        if not (a <= start and stop <= b) or self._values is None:
            self._values = None  # the old span is released before the new one is read
            self._decode(start, stop)
        a = self._span[0]
        return torch.from_numpy(self._values)[:, start - a : stop - a]

    def _decode(self, start: int, stop: int) -> None:
        array = self._open()
        width = int(array.chunks[1])
        a, b = start // width * width, min(int(array.shape[1]), -(-stop // width) * width)
        values = np.empty((self.shape[0], b - a), dtype=array.dtype)
        direct = self._direct
        row = 0
        for i, (r0, r1) in self.blocks:
            problem = None
            try:
                if direct is not None:
                    direct(values[row : row + r1 - r0], r0, r1, a, b)
                else:
                    values[row : row + r1 - r0] = array[r0:r1, a:b]
                if np.isnan(values[row : row + r1 - r0]).any():
                    problem = f"the saved factors of test block {i} in {self.path!r} are missing (NaN)"
            except Exception as err:  # a damaged chunk (its checksum)
                problem = (
                    f"the saved factors of test block {i} in {self.path!r} are damaged ({' '.join(str(err).split())})"
                )
            if problem is not None:
                import zarr

                _refuse_block(zarr.open_group(self.path, mode="r+"), i, problem)
            row += r1 - r0
        self.decoded += values.size
        self._span, self._values = (a, b), values


def _direct_reader(array: Any) -> Any:
    """A reader of ``factors`` chunk files straight into a destination, for a local array checksummed and not
    compressed (``BytesCodec`` little-endian, ``Crc32cCodec``: :func:`create_factors`), else ``None`` (read
    through zarr). Each file is read into one buffer, its CRC32C checked and its rows copied: about 10 ms for a
    33 MB chunk from the page cache, where zarr took about 80 ms (one-pass scoring reads every test point's
    factors once per group of training points).

    The reader ``read(dest, r0, r1, a, b)`` fills ``dest`` ``(r1 - r0, b - a)`` with rows ``r0:r1`` and columns
    ``a:b``; a missing file raises ``FileNotFoundError``, a short or damaged one ``ValueError``."""
    from .chunkfiles import _default_keys, codec_layout, local_dir

    layout = codec_layout(array)
    if layout is None or layout[0] != ["BytesCodec", "Crc32cCodec"] or layout[1].byteorder == ">":
        return None
    root = local_dir(array) if _default_keys(array) else None
    if root is None:
        return None
    import google_crc32c

    dtype = layout[1]
    rows, width = (int(c) for c in array.chunks)
    size = rows * width * dtype.itemsize
    scratch = np.empty(size + 4, dtype=np.uint8)

    def read(dest: np.ndarray, r0: int, r1: int, a: int, b: int) -> None:
        for cr in range(r0 // rows, (r1 - 1) // rows + 1):
            for ck in range(a // width, (b - 1) // width + 1):
                path = os.path.join(root, "c", str(cr), str(ck))
                with open(path, "rb", buffering=0) as f:
                    got = f.readinto(scratch.data)
                    if got != size + 4 or f.read(1):
                        raise ValueError(f"chunk ({cr}, {ck}) has {got} bytes, not {size + 4}")
                if google_crc32c.value(scratch[:-4]) != int.from_bytes(scratch[-4:].tobytes(), "little"):
                    raise ValueError(f"chunk ({cr}, {ck}): stored and computed checksum do not match (crc32c)")
                chunk = scratch[:-4].view(dtype).reshape(rows, width)
                y0, y1 = max(r0, cr * rows), min(r1, (cr + 1) * rows)
                x0, x1 = max(a, ck * width), min(b, (ck + 1) * width)
                dest[y0 - r0 : y1 - r0, x0 - a : x1 - a] = chunk[
                    y0 - cr * rows : y1 - cr * rows, x0 - ck * width : x1 - ck * width
                ]

    return read
