"""The package's namespace shows the public API and nothing of its own plumbing."""

import dask_influence as di


def test_dir_lists_the_public_names_only():
    public = [name for name in dir(di) if not name.startswith("__")]
    assert public == sorted(set(di.__all__) - {"__version__"})
    for helper in ("Any", "TYPE_CHECKING", "annotations", "import_module", "version", "PackageNotFoundError"):
        assert not hasattr(di, helper), helper


def test_every_public_name_resolves():
    for name in di.__all__:
        assert getattr(di, name) is not None, name


def test_every_built_in_solver_is_exported():
    from dask_influence.core.solvers import SOLVERS

    for name, cls in SOLVERS.items():
        if cls.__module__.startswith("dask_influence."):
            assert getattr(di, cls.__name__, None) is cls and cls.__name__ in di.__all__, name
