"""Fixtures shared by the CLI tests."""

import sys

import pytest


@pytest.fixture(autouse=True)
def restore_imports():
    """`run` in this process puts the factory's directory on sys.path and imports `factory`:
    each test gets the import state it started with back."""
    path, had = list(sys.path), sys.modules.get("factory")
    yield
    sys.path[:] = path
    if had is None:
        sys.modules.pop("factory", None)
    else:
        sys.modules["factory"] = had
