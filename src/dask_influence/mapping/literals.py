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


BROADCAST_BYTES = 128 * 2**20
"""A graph literal holding more array bytes than this is broadcast to the workers before a
submission (:func:`broadcast_large`) instead of travelling inside the graph."""


def payload_bytes(value: Any, limit: int | None = None) -> int:
    """The bytes of the torch tensors and numpy arrays reachable from ``value`` (through object
    attributes, dicts, lists, tuples and sets; each storage counted once). Stops counting once
    the total passes ``limit``."""
    import numpy as np
    import torch

    seen: set[int] = set()
    total = 0
    stack = [value]
    while stack and (limit is None or total <= limit):
        item = stack.pop()
        if id(item) in seen:
            continue
        seen.add(id(item))
        if isinstance(item, torch.Tensor):
            storage = item.untyped_storage()
            if storage.data_ptr() not in seen:
                seen.add(storage.data_ptr())
                total += storage.nbytes()
        elif isinstance(item, np.ndarray):
            total += item.nbytes
        elif isinstance(item, dict):
            stack.extend(item.values())
        elif isinstance(item, (list, tuple, set, frozenset)):
            stack.extend(item)
        elif hasattr(item, "__dict__") and not isinstance(item, type):
            stack.extend(vars(item).values())
    return total


def broadcast_large(client: Any, dsk: dict, threshold: int | None = None) -> dict:
    """``dsk`` with each literal task ``(unbox, Literal)`` of more than ``threshold`` array bytes
    replaced by a future of its value, scattered to every worker first (``threshold``: default
    :data:`BROADCAST_BYTES`).

    A literal travels inside the submitted graph: the client pickles the whole graph, and the
    scheduler (in the client's process with an embedded cluster) holds it until a worker has
    computed the key. For a fitted solver of GPT-2-small's size (EK-FAC: 2.2 GB) that is two
    more copies in the client's process, which the kernel's out-of-memory killer ended on a
    24 GB machine. Broadcast, the value is pickled once and held by the workers only. The price:
    a literal is recomputed if its worker is lost; a broadcast value survives while one worker
    holding it does (each holds it). Small literals (every test's solver) stay in the graph. On a
    local cluster the client sends the value to the workers itself (:func:`.clients.direct_to_workers`),
    not through the scheduler.
    """
    from .clients import direct_to_workers

    threshold = BROADCAST_BYTES if threshold is None else threshold
    out = dict(dsk)
    direct = None
    for key, task in dsk.items():
        if isinstance(task, tuple) and len(task) == 2 and task[0] is unbox and isinstance(task[1], Literal):
            if payload_bytes(task[1].value, threshold) > threshold:
                direct = direct_to_workers(client) if direct is None else direct
                out[key] = client.scatter(task[1].value, broadcast=True, hash=False, direct=direct or None)
    return out
