"""One rule for every path a job file names (``[model] path``, stores, fit files, certificates):
a URL (``s3://``, ``gs://``, ``memory://``, ...) is kept as written; a local path has ``~``
expanded and, when relative, is taken relative to the job file's directory."""

from __future__ import annotations

import os
from pathlib import Path

from ..storage.urls import is_url


def resolve_path(value: str, base: Path) -> str:
    """``value`` (stripped) as a URL or an absolute local path (``~`` expanded, relative to ``base``)."""
    value = value.strip()
    if is_url(value):
        return value
    value = os.path.expanduser(value)
    return os.path.normpath(value if os.path.isabs(value) else str(base / value))
