"""The in-memory solver core: torch only, knows nothing of Dask or zarr."""
