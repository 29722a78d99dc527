"""Compatibility name of :mod:`dask_influence.storage.store`, where the zarr store now lives.

``dask_influence.mapping.store`` IS that module (the same module object, not a copy): every
name it had (``ATTR``, ``StoreLayout``, ``prepare_store``, ``is_complete``, ``verify_store``,
the write tasks ...) is there, and patching one here (as the tests do with ``is_complete``)
patches what :mod:`dask_influence.cli.run` uses. New code imports :mod:`dask_influence.storage`.
"""

import sys

from ..storage import store as _store

sys.modules[__name__] = _store
