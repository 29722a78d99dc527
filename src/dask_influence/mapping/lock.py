"""Compatibility name of :mod:`dask_influence.storage.lock`, where the store lock now lives.

``dask_influence.mapping.lock`` IS that module (the same module object, not a copy), so
reading or patching a name here (``HEARTBEAT_SECONDS`` in the tests) acts on the lock itself.
New code imports :mod:`dask_influence.storage.lock`.
"""

import sys

from ..storage import lock as _lock

sys.modules[__name__] = _lock
