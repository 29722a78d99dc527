"""Where the index graphs run: in this process (``client="sync"``) or on a Dask client
(the given or current one, or an embedded ``LocalCluster`` started for the call:
:func:`~dask_influence.mapping.clients.dask_client`)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ..mapping.literals import broadcast_large, sent_once
from ..progress import Meter

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
    meter: Meter | None = None,
    counts: dict[Any, int] | None = None,
) -> list:
    """Compute ``keys`` of ``dsk``; ``on_done(key)`` is called here as each of them finishes.

    ``meter`` (progress) is advanced by ``counts[key]`` as each key of ``counts`` finishes (any
    key of the graph, e.g. the leaves of a reduction; default: 1 per key of ``keys``)."""
    if not keys:
        return []
    counted = counts if counts is not None else dict.fromkeys(keys, 1)
    if meter is None or not meter.progress.show:
        counted = {}
    if client == SYNC:
        from dask.callbacks import Callback
        from dask.local import get_sync

        def posttask(key: Any, result: Any, dsk: Any, state: Any, worker: Any) -> None:
            if key in counted:
                meter.advance(counted[key])  # type: ignore[union-attr]

        with Callback(posttask=posttask) if counted else _nothing():
            results = list(get_sync(dsk, keys))  # shared keys (the projector, test factors) computed once
        for key in keys if on_done is not None else ():
            on_done(key)  # type: ignore[misc]
        return results
    from distributed import as_completed

    wanted = set(keys)
    extra = [key for key in counted if key not in wanted]  # followed, and released as they finish
    with sent_once():  # a projector of more than BROADCAST_BYTES (a 124M-parameter model) goes to the workers first
        futures = client.get(
            broadcast_large(client, dsk), list(keys) + extra, sync=False, resources={"GPU": 1} if gpu else None
        )
    futures, side = futures[: len(keys)], futures[len(keys) :]
    if on_done is not None or counted:
        for future in as_completed(futures + side, loop=client.loop):  # also for a client that is not the default
            if future.status != "finished":
                break  # an error: gather raises it
            if future.key in counted:
                meter.advance(counted[future.key])  # type: ignore[union-attr]
            if future.key in wanted:
                if on_done is not None:
                    on_done(future.key)
            else:
                future.release()
    return client.gather(futures)


def _nothing() -> Any:
    from contextlib import nullcontext

    return nullcontext()
