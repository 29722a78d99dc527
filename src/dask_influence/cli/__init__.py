"""The ``dask-influence`` command line: one module per subcommand."""
