"""Where the index graphs run: in this process (``client="sync"``) or on a Dask client
(the given or current one, or an embedded ``LocalCluster`` started for the call:
:func:`~dask_influence.mapping.clients.dask_client`)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ..mapping.literals import sent_once

SYNC = "sync"


def check_client(client: Any) -> None:
    """Refuse a ``client`` that is neither a client, ``None`` nor ``'sync'``."""
    if isinstance(client, str) and client != SYNC:
        raise ValueError(f"client must be a distributed.Client, None or 'sync'; got {client!r}.")


def run(
    client: Any,
    dsk: dict,
    keys: list,
    *,
    on_done: Callable[[Any], None] | None = None,
    gpu: bool = False,
) -> list:
    """Compute ``keys`` of ``dsk``; ``on_done(key)`` is called here as each of them finishes."""
    if not keys:
        return []
    if client == SYNC:
        from dask.local import get_sync

        results = list(get_sync(dsk, keys))  # shared keys (the projector, test factors) computed once
        for key in keys if on_done is not None else ():
            on_done(key)  # type: ignore[misc]
        return results
    from distributed import as_completed

    with sent_once():
        futures = client.get(dsk, keys, sync=False, resources={"GPU": 1} if gpu else None)
    if on_done is not None:
        for future in as_completed(futures, loop=client.loop):  # also for a client that is not the default
            if future.status != "finished":
                break  # an error: gather raises it
            on_done(future.key)
    return client.gather(futures)
