"""Local paths and fsspec URLs in one place.

A store, its lock and a saved fit are named by a local path (``out.zarr``, ``~/runs/a.zarr``)
or by a URL that fsspec understands (``s3://bucket/out.zarr``, ``file:///tmp/out.zarr``,
``memory://out.zarr``). Everything that has to tell the two apart, or do a file operation on
either, goes through these functions:

- :func:`is_url`: the one test for "is this a URL" (it contains ``://``);
- :func:`with_suffix` and :func:`join`: names next to or inside a store;
- :func:`filesystem`: the fsspec filesystem and inner path of a URL;
- :func:`exists`, :func:`open_file`, :func:`read_file`, :func:`create_new`,
  :func:`replace_atomically`, :func:`remove`: file operations on local disk or through fsspec.

fsspec is imported only when a URL is used.
"""

from __future__ import annotations

import contextlib
import errno
import os
import time
import uuid
from typing import Any


def is_url(path: str | os.PathLike) -> bool:
    """True when ``path`` is a URL (``scheme://...``, opened through fsspec), False for a local path.

    A ``file://`` URL is a URL too: it goes through fsspec like any other.
    """
    return "://" in os.fspath(path)


def with_suffix(path: str | os.PathLike, suffix: str) -> str:
    """``path`` with ``suffix`` appended after dropping trailing slashes.

    The name of a file that sits next to a store: ``with_suffix("out.zarr/", ".lock")`` is
    ``"out.zarr.lock"``; URLs work the same way (``s3://b/out.zarr`` -> ``s3://b/out.zarr.lock``).
    """
    return os.fspath(path).rstrip("/") + suffix


def join(base: str | os.PathLike, *parts: str) -> str:
    """``parts`` inside ``base``: :func:`os.path.join` for a local path, ``/``-joined for a URL.

    For a URL, slashes at the joins are collapsed to one (``join("memory://a/", "/b")`` is
    ``"memory://a/b"``) and the scheme is kept.
    """
    base = os.fspath(base)
    if not is_url(base):
        return os.path.join(base, *parts)
    pieces = [p.strip("/") for p in parts if p.strip("/")]
    return "/".join([base.rstrip("/")] + pieces) if pieces else base


def filesystem(url: str | os.PathLike) -> tuple[Any, str]:
    """The fsspec filesystem of ``url`` and the path inside it (``fsspec.core.url_to_fs``).

    Also accepts a local path (fsspec's local filesystem), though the other functions here
    handle local paths with :mod:`os` directly.
    """
    from fsspec.core import url_to_fs

    return url_to_fs(os.fspath(url))


def exists(path: str | os.PathLike) -> bool:
    """Whether a file or directory exists at ``path`` (:func:`os.path.exists`, or fsspec's ``exists``)."""
    path = os.fspath(path)
    if not is_url(path):
        return os.path.exists(path)
    fs, inner = filesystem(path)
    return bool(fs.exists(inner))


def open_file(path: str | os.PathLike, mode: str = "rb", **kwargs: Any) -> Any:
    """Open ``path`` for reading or writing; use the result in a ``with`` statement.

    A local path is opened with :func:`open` (``kwargs`` such as ``encoding`` pass through);
    a URL with ``fsspec.open`` (``kwargs`` are its storage options and text options). A local
    write is not atomic; see :func:`replace_atomically`.
    """
    path = os.fspath(path)
    if not is_url(path):
        return open(path, mode, **kwargs)
    import fsspec

    return fsspec.open(path, mode, **kwargs)


def create_new(path: str | os.PathLike, data: bytes) -> bool:
    """Create the file ``path`` holding ``data`` unless it exists; False (nothing written) if it does.

    Local: atomic (``O_CREAT | O_EXCL``), creating missing parent directories; two processes
    racing for the same path cannot both succeed. URL: check-then-write, best effort (object
    stores have no exclusive create).
    """
    path = os.fspath(path)
    if is_url(path):
        fs, inner = filesystem(path)
        if fs.exists(inner):
            return False
        fs.pipe_file(inner, data)
        return True
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    # The whole content goes to a temporary file first, then a hard link puts it at ``path``
    # atomically and only if ``path`` does not exist: a full disk fails while writing the
    # temporary file (removed), never leaving an empty or partial ``path`` behind.
    temp = f"{path}.{uuid.uuid4().hex[:8]}.new"
    try:
        with open(temp, "xb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        try:
            os.link(temp, path)
        except FileExistsError:
            return False
        except OSError as err:  # a filesystem without hard links: exclusive create, then write
            if err.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV):
                raise
            return _create_exclusive(path, data)
        return True
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.remove(temp)


def _create_exclusive(path: str, data: bytes) -> bool:
    """``O_CREAT | O_EXCL`` then write (the fallback without hard links); a failed write removes the file."""
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        return False
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    except OSError:
        with contextlib.suppress(FileNotFoundError):
            os.remove(path)
        raise
    return True


def replace_atomically(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path``, replacing any existing file, so that readers never see a partial file.

    Local: written to ``<path>.<random>.tmp`` next to it, then renamed over it with
    :func:`os.replace` (atomic on POSIX); the temporary file is removed if writing fails.
    URL: one ``pipe_file`` (object stores replace whole objects).
    """
    path = os.fspath(path)
    if is_url(path):
        fs, inner = filesystem(path)
        fs.pipe_file(inner, data)
        return
    tmp = f"{path}.{uuid.uuid4().hex}.tmp"
    try:
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.remove(tmp)
        except OSError:
            pass
        raise


def remove(path: str | os.PathLike) -> None:
    """Delete the file ``path``; nothing happens if there is none."""
    path = os.fspath(path)
    try:
        if is_url(path):
            fs, inner = filesystem(path)
            fs.rm_file(inner)
        else:
            os.remove(path)
    except FileNotFoundError:
        pass


def read_file(path: str | os.PathLike) -> tuple[bytes, float] | None:
    """The content and modification time (Unix seconds) of the file ``path``, or ``None`` if there is none.

    For a URL whose filesystem cannot tell the modification time, the current time is returned.
    """
    path = os.fspath(path)
    try:
        if is_url(path):
            fs, inner = filesystem(path)
            if not fs.exists(inner):
                return None
            data = fs.cat_file(inner)
            try:
                mtime = fs.modified(inner).timestamp()
            except Exception:
                mtime = time.time()
            return data, mtime
        with open(path, "rb") as f:
            return f.read(), os.fstat(f.fileno()).st_mtime
    except FileNotFoundError:
        return None


__all__ = [
    "is_url",
    "with_suffix",
    "join",
    "filesystem",
    "exists",
    "open_file",
    "create_new",
    "replace_atomically",
    "remove",
    "read_file",
]
