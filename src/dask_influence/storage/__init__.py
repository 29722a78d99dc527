"""Storage: where results live and how they are read back.

- :mod:`.urls`: local paths and fsspec URLs in one place (is it a URL, suffixes, existence,
  opening files, atomic local replace);
- :mod:`.layout`: the zarr layout of a store (arrays, chunks, attributes, the done-flag arrays);
- :mod:`.codecs`: the codecs of every array written (zstd, then a CRC32C checksum);
- :mod:`.store`: creating or resuming a store and the chunk writes of the workers;
- :mod:`.completion`: the done state of every chunk (manifest, flag listing, flags) and the
  ``complete`` attribute;
- :mod:`.manifest`: the completion manifest, the done state in one record;
- :mod:`.fits`: the fit generation each chunk was computed with (refits invalidate);
- :mod:`.factors`: the saved test factors of each test block (a resume reads them back);
- :mod:`.topk`: the top-k candidates of a chunk, their merges and the write;
- :mod:`.chunkfiles`: listing chunk files and reading many of them fast;
- :mod:`.verify`: checking flagged chunks before ``resume`` and repairing their flags;
- :mod:`.solver_info`: the convergence records of iterative solvers;
- :mod:`.lock`: the ``<store>.lock`` ownership marker of a store being written;
- :mod:`.read`: the read API of a finished or partial store (``inspect``, ``top``, ``plot``).

The solver core never imports this package; the mapping layer and the command line do.
Importing the package itself is cheap: its modules are imported on use.
"""
