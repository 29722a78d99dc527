"""The URL helpers of ``dask_influence.storage.urls`` on local paths, ``file://`` and ``memory://``.

``memory://`` is fsspec's in-process filesystem: no network, but the same code path as an
object store (no exclusive create, whole-object writes).
"""

from __future__ import annotations

import os
import uuid

import fsspec
import pytest

from dask_influence.storage import urls


@pytest.fixture
def mem():
    """A fresh directory on fsspec's in-memory filesystem, removed afterwards."""
    root = f"memory://test-urls-{uuid.uuid4().hex}"
    yield root
    fs = fsspec.filesystem("memory")
    if fs.exists(root):
        fs.rm(root, recursive=True)


def test_is_url():
    assert urls.is_url("s3://bucket/out.zarr")
    assert urls.is_url("file:///tmp/out.zarr")
    assert urls.is_url("memory://out.zarr")
    assert not urls.is_url("out.zarr")
    assert not urls.is_url("/tmp/out.zarr")
    assert not urls.is_url("~/runs/a:b.zarr")


def test_is_url_accepts_path_objects(tmp_path):
    assert not urls.is_url(tmp_path / "out.zarr")


def test_with_suffix_drops_trailing_slashes():
    assert urls.with_suffix("out.zarr", ".lock") == "out.zarr.lock"
    assert urls.with_suffix("out.zarr//", ".lock") == "out.zarr.lock"
    assert urls.with_suffix("s3://bucket/out.zarr/", ".fit.pt") == "s3://bucket/out.zarr.fit.pt"


def test_join_local_and_url(tmp_path):
    assert urls.join(str(tmp_path), "a", "b.json") == os.path.join(str(tmp_path), "a", "b.json")
    assert urls.join("memory://root/", "/a/", "b.json") == "memory://root/a/b.json"
    assert urls.join("s3://bucket/out.zarr") == "s3://bucket/out.zarr"
    assert urls.join("s3://bucket", "") == "s3://bucket"


def test_local_files(tmp_path):
    path = str(tmp_path / "sub" / "x.lock")
    assert not urls.exists(path) and urls.read_file(path) is None
    assert urls.create_new(path, b"first")  # creates the missing parent directory
    assert not urls.create_new(path, b"second")  # exclusive: the first stays
    data, mtime = urls.read_file(path)
    assert data == b"first" and abs(mtime - os.path.getmtime(path)) < 1e-6
    urls.replace_atomically(path, b"third")
    with urls.open_file(path, "rb") as f:
        assert f.read() == b"third"
    assert os.listdir(tmp_path / "sub") == ["x.lock"]  # no temporary file left behind
    with urls.open_file(str(tmp_path / "y.txt"), "w", encoding="utf-8") as f:
        f.write("text")
    assert (tmp_path / "y.txt").read_text() == "text"
    urls.remove(path)
    assert not urls.exists(path)
    urls.remove(path)  # a missing file is not an error


def test_replace_atomically_keeps_the_old_file_when_writing_fails(tmp_path):
    path = str(tmp_path / "x.lock")
    urls.replace_atomically(path, b"old")
    with pytest.raises(TypeError):
        urls.replace_atomically(path, "not bytes")  # type: ignore[arg-type]
    assert open(path, "rb").read() == b"old"
    assert os.listdir(tmp_path) == ["x.lock"]


def test_file_urls_reach_the_local_disk(tmp_path):
    path = tmp_path / "a.bin"
    url = f"file://{path}"
    assert urls.is_url(url) and not urls.exists(url)
    assert urls.create_new(url, b"payload")
    assert path.read_bytes() == b"payload"
    assert urls.exists(url) and not urls.create_new(url, b"other")
    with urls.open_file(url, "rb") as f:
        assert f.read() == b"payload"
    fs, inner = urls.filesystem(url)
    assert fs.protocol[0] == "file" and inner.endswith("a.bin")
    urls.remove(url)
    assert not path.exists()


def test_memory_urls_through_fsspec(mem):
    url = urls.join(mem, "out.zarr.lock")
    fs = fsspec.filesystem("memory")
    assert not urls.exists(url) and urls.read_file(url) is None
    assert urls.create_new(url, b'{"owner": "a"}')
    assert not urls.create_new(url, b'{"owner": "b"}')
    assert fs.cat_file(url) == b'{"owner": "a"}'
    data, mtime = urls.read_file(url)
    assert data == b'{"owner": "a"}' and mtime > 0
    urls.replace_atomically(url, b'{"owner": "c"}')
    with urls.open_file(url, "rb") as f:
        assert f.read() == b'{"owner": "c"}'
    with urls.open_file(urls.join(mem, "fit.pt"), "wb") as f:
        f.write(b"\x00\x01")
    assert fs.cat_file(urls.join(mem, "fit.pt")) == b"\x00\x01"
    assert urls.exists(mem)  # a "directory" holding files
    urls.remove(url)
    assert not urls.exists(url)
    urls.remove(url)


def test_the_lock_and_store_use_the_helpers_on_urls(mem):
    from dask_influence.storage import lock, store

    url = urls.join(mem, "out.zarr")
    assert lock.lock_path(url + "/") == url + ".lock"
    store.check_path(url)  # URLs are not probed
    with lock.StoreLock(url, heartbeat_seconds=3600) as held:
        assert urls.exists(url + ".lock")
        found = lock.read_lock(url)
        assert found is not None and found.owner == held.info.owner and not found.unreadable
    assert not urls.exists(url + ".lock") and lock.read_lock(url) is None
