"""The mapping layer: data -> block plan -> Dask graph of per-block tasks -> zarr."""
