"""Values placed in a Dask graph as they are, with a token given instead of computed."""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any


class Literal:
    """A value placed in a graph as is, with a cheap, given Dask token.

    Dask tokenizes every literal of a submitted graph, pickling objects it does not know
    (twice, to check determinism): for a solver of a million parameters with its fitted
    factors that costs a good fraction of a second per submission. The key the value sits
    under is already unique, so the token given here (a fingerprint or a random id) is all
    Dask needs. :func:`unbox` returns the value on the worker.
    """

    def __init__(self, value: Any, token: str):
        self.value = value
        self.token = str(token)

    def __dask_tokenize__(self) -> str:
        return self.token


def unbox(box: Literal) -> Any:
    """The value of a :class:`Literal` (a graph task: ``(unbox, Literal(value, token))``)."""
    return box.value


@contextmanager
def sent_once() -> Iterator[None]:
    """Silence ``distributed``'s "Sending large graph" warning around a submission.

    The solver and an in-memory dataset are graph literals on purpose (sent once, fetched
    once per worker, recomputable if their worker is lost), so the warning's advice (load
    the data with Dask instead) does not apply to them.
    """
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Sending large graph", category=UserWarning)
        yield
