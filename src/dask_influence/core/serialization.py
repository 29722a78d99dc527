"""Fitted state as plain data: files read from disk are data, never code.

A saved solver (:meth:`InfluenceModel.save`) and a saved fit next to a store
(``<store>.fit.pt``, :func:`dask_influence.mapping.fitting.save_fit`) hold fitted state:
frozen dataclasses of tensors, tuples of them, floats, fitted preconditioners. Pickling those
objects would make every such file a program: unpickling calls whatever the file names, so a
crafted file runs arbitrary code when it is loaded. Here the state is turned into plain data
first and read back without unpickling any object:

- :func:`to_data` turns a state tree into plain data: ``None``, ``bool``, ``int``,
  ``float``, ``str``, tensors, lists and dicts with ``str`` keys. A tuple, a dict, a
  ``torch.Size``, a ``torch.dtype`` and an object of an allow-listed class become a dict
  tagged with ``"__kind__"`` (see below);
- :func:`from_data` rebuilds the tree; it builds only allow-listed classes and raises
  ``ValueError`` naming the file and the type for anything else;
- :func:`save` writes a record (a dict of such values plus ``"format"``) with ``torch.save``;
  :func:`load` reads it with ``torch.load(..., weights_only=True)``, whose restricted
  unpickler accepts tensors and builtin containers only and refuses every other global
  (``os.system``, a class, a function) without calling it.

The allow-list is :func:`serializable`: a class decorator that registers a class under a
name (its ``__name__`` unless given). The fitted states of the built-in solvers
(``DirectState``, ``ArnoldiState``, ``LowRankFactor``, ``EkfacState``, ``LayerFactors``) and
the two built-in preconditioners (``JacobiPreconditioner``, ``NystroemPreconditioner``) are
registered where they are defined; a custom preconditioner that should be saved with a CG
solver needs the decorator too. A dataclass is rebuilt by calling ``cls(**fields)`` (its
``__post_init__`` checks run); another class by ``cls.__new__(cls)`` and setting the saved
attributes (its ``__init__`` is not called).

The tagged forms::

    {"__kind__": "tuple", "items": [...]}
    {"__kind__": "dict", "items": {"key": ...}}
    {"__kind__": "size", "items": [2, 3]}                 # torch.Size
    {"__kind__": "dtype", "name": "float64"}              # torch.float64
    {"__kind__": "object", "class": "DirectState", "fields": {"blocks": ..., ...}}

Format history: format 1 (before this module) was a ``torch.save`` pickle of the objects
themselves; such a file cannot be read without running the code it names, so :func:`load`
refuses it and asks for a new fit. Format 2 is this one.
"""

from __future__ import annotations

import dataclasses
import errno
import os
import pickle
import re
import warnings
from collections.abc import Callable
from typing import Any, BinaryIO, TypeVar, Union, cast

import numpy as np
import torch
from torch import Tensor

__all__ = ["FORMAT", "serializable", "allowed_classes", "to_data", "from_data", "save", "load", "to_device"]

FORMAT = 2
"""The file format written by :func:`save` (the ``"format"`` entry of every record)."""

KIND = "__kind__"
"""The key that tags a dict as an encoded tuple, dict, ``torch.Size``, dtype or object."""

_CLASSES: dict[str, type] = {}
_NAMES: dict[type, str] = {}

T = TypeVar("T", bound=type)
File = Union[str, "os.PathLike[str]", BinaryIO]


# -- the allow-list -----------------------------------------------------------------------------------
def serializable(cls: T | None = None, *, name: str | None = None) -> Any:
    """Class decorator: allow instances of ``cls`` in saved files, under ``name`` (default ``cls.__name__``).

    Use as ``@serializable`` or ``@serializable(name="MyState")``. The name is what a file
    records; loading builds only classes registered under the recorded name. Registering a
    second class under a taken name is refused (re-registering the same class, e.g. after a
    module reload, replaces it).
    """

    def add(klass: T) -> T:
        key = name or klass.__name__
        existing = _CLASSES.get(key)
        if (
            existing is not None
            and existing is not klass
            and (existing.__module__, existing.__qualname__) != (klass.__module__, klass.__qualname__)
        ):
            raise ValueError(
                f"The serializable name {key!r} is taken by "
                f"{existing.__module__}.{existing.__qualname__}; pass @serializable(name=...)."
            )
        if existing is not None:
            _NAMES.pop(existing, None)
        _CLASSES[key] = klass
        _NAMES[klass] = key
        return klass

    return add if cls is None else add(cls)


def allowed_classes() -> dict[str, type]:
    """``{name: class}`` of every class a saved file may hold: those whose modules are imported (the
    solvers package imports every built-in solver, and :mod:`.solvers.fit_record`, the one reader of
    saved fits, also loads the registry's entry-point solvers first)."""
    return dict(_CLASSES)


# -- encoding --------------------------------------------------------------------------------------------
def to_data(value: Any, *, where: str = "value") -> Any:
    """``value`` as plain data: ``None``/``bool``/``int``/``float``/``str``, tensors, lists, dicts with
    ``str`` keys (tuples, dicts, sizes, dtypes and allow-listed objects as tagged dicts).

    Args:
        where: names ``value`` in the error message (``"attributes.state_"``).

    Raises:
        TypeError: a value of a type that is neither plain data nor allow-listed (naming it
            and where it sits), or a dict with a non-``str`` key.
    """
    if value is None or type(value) in (bool, int, float, str):
        return value
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        return float(value)
    if isinstance(value, str):
        return str(value)
    if isinstance(value, Tensor):
        return _compact(value.detach())
    if isinstance(value, torch.Size):
        return {KIND: "size", "items": [int(s) for s in value]}
    if isinstance(value, torch.dtype):
        return {KIND: "dtype", "name": str(value).removeprefix("torch.")}
    if isinstance(value, list):
        return [to_data(v, where=f"{where}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, tuple) and type(value) is tuple:
        return {KIND: "tuple", "items": [to_data(v, where=f"{where}[{i}]") for i, v in enumerate(value)]}
    if isinstance(value, dict):
        bad = [k for k in value if not isinstance(k, str)]
        if bad:
            raise TypeError(f"Cannot save {where}: a dict key {bad[0]!r} is not a string.")
        return {KIND: "dict", "items": {k: to_data(v, where=f"{where}.{k}") for k, v in value.items()}}
    name = _NAMES.get(type(value))
    if name is None:
        raise TypeError(
            f"Cannot save {where}: a {type(value).__module__}.{type(value).__qualname__} is neither plain data "
            "(numbers, strings, tensors, lists, tuples, dicts) nor a class allowed in saved files; decorate "
            "its class with @dask_influence.core.serialization.serializable."
        )
    if dataclasses.is_dataclass(value):
        fields = {f.name: getattr(value, f.name) for f in dataclasses.fields(value)}
    else:
        fields = dict(vars(value))
    return {KIND: "object", "class": name, "fields": {k: to_data(v, where=f"{where}.{k}") for k, v in fields.items()}}


def _compact(t: Tensor) -> Tensor:
    """``t``, or a copy of it when it is a view of a larger storage (``torch.save`` writes whole storages)."""
    if t.is_sparse or t.layout != torch.strided:
        return t
    if t.untyped_storage().nbytes() > t.numel() * t.element_size():
        return t.clone()  # keeps the strides of a dense tensor: results stay bit for bit the same
    return t


# -- decoding --------------------------------------------------------------------------------------------
def from_data(data: Any, *, source: str = "the data", device: torch.device | str | None = None) -> Any:
    """Rebuild what :func:`to_data` encoded; builds only allow-listed classes.

    Args:
        source: names the file in error messages.
        device: move every tensor there (default: leave them where they are).

    Raises:
        ValueError: naming ``source`` and the offending type: an object of a class that is not
            allow-listed, an unknown tag, or any value that is not plain data.
    """
    return _decode(data, source, None if device is None else torch.device(device), "record")


def _decode(data: Any, source: str, device: torch.device | None, where: str) -> Any:
    if data is None or type(data) in (bool, int, float, str):
        return data
    if type(data) is Tensor or type(data) is torch.nn.Parameter:
        return data if device is None else data.to(device)
    if type(data) is list:
        return [_decode(v, source, device, f"{where}[{i}]") for i, v in enumerate(data)]
    if type(data) is not dict or not isinstance(data.get(KIND), str):
        raise _refuse(
            source, f"{where} is a {type(data).__module__}.{type(data).__qualname__}, which a data file never holds"
        )
    kind = data[KIND]
    if kind == "tuple":
        return tuple(_decode(v, source, device, f"{where}[{i}]") for i, v in enumerate(_list(data, source, where)))
    if kind == "size":
        items = _list(data, source, where)
        if not all(type(s) is int for s in items):
            raise _refuse(source, f"{where} is a torch.Size of non-integers")
        return torch.Size(items)
    if kind == "dtype":
        dtype = getattr(torch, str(data.get("name")), None)
        if not isinstance(dtype, torch.dtype):
            raise _refuse(source, f"{where} names an unknown dtype {data.get('name')!r}")
        return dtype
    if kind == "dict":
        return {k: _decode(v, source, device, f"{where}.{k}") for k, v in _dict(data, "items", source, where).items()}
    if kind == "object":
        return _decode_object(data, source, device, where)
    raise _refuse(source, f"{where} has the unknown kind {kind!r}")


def _decode_object(data: dict, source: str, device: torch.device | None, where: str) -> Any:
    name = data.get("class")
    cls = _CLASSES.get(name) if isinstance(name, str) else None
    if cls is None:
        raise _refuse(
            source,
            f"{where} is an object of the unknown type {name!r}; a saved file may hold only "
            f"these classes: {', '.join(sorted(_CLASSES))}",
        )
    fields = {k: _decode(v, source, device, f"{where}.{k}") for k, v in _dict(data, "fields", source, where).items()}
    bad = [k for k in fields if not k.isidentifier() or k.startswith("__")]
    if bad:
        raise _refuse(source, f"{where} ({name}) has the attribute name {bad[0]!r}")
    if dataclasses.is_dataclass(cls):
        declared = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(fields) - set(declared))
        if unknown:
            raise _refuse(
                source,
                f"{where} ({name}) has fields {', '.join(unknown)} that {name} does not have "
                "(written by another version?)",
            )
        try:
            obj = cls(**{k: v for k, v in fields.items() if declared[k].init})
        except (TypeError, ValueError) as err:
            raise _refuse(source, f"{where} ({name}) cannot be rebuilt: {err}") from None
        for k, v in fields.items():
            if not declared[k].init:
                object.__setattr__(obj, k, v)
        return obj
    # mypy resolves ``cls.__new__`` on a ``type`` to the metaclass's ``type.__new__``.
    obj = cast(Any, cls).__new__(cls)
    for k, v in fields.items():
        object.__setattr__(obj, k, v)
    return obj


def _list(data: dict, source: str, where: str) -> list:
    items = data.get("items")
    if type(items) is not list:
        raise _refuse(source, f"{where} ({data[KIND]}) has no list of items")
    return items


def _dict(data: dict, key: str, source: str, where: str) -> dict:
    items = data.get(key)
    if type(items) is not dict or not all(isinstance(k, str) for k in items):
        raise _refuse(source, f"{where} ({data[KIND]}) has no dict of {key} with string keys")
    return items


def _refuse(source: str, reason: str) -> ValueError:
    return ValueError(f"{source!r} is not a valid data file: {reason}; it was refused.")


def to_device(value: Any, device: torch.device | str) -> Any:
    """A copy of a state tree (allow-listed objects included) with every tensor on ``device``."""
    return from_data(to_data(value), device=device)


# -- files -----------------------------------------------------------------------------------------------
def save(record: dict[str, Any], file: File) -> None:
    """Write ``record`` (``{str: value}``) as plain data with ``torch.save``, adding ``"format": FORMAT``.

    ``file``: a path or a binary file object. A path is written whole or not at all: the
    bytes are formed in memory, written to a temporary file next to it and renamed over it
    (a full disk raises ``OSError`` "No space left on device" and leaves no partial file).

    Raises:
        TypeError: a value that cannot be saved (see :func:`to_data`); nothing is written.
    """
    import io

    data = {"format": FORMAT, **{k: to_data(v, where=k) for k, v in record.items() if k not in ("format", CHECKSUM)}}
    data[CHECKSUM] = content_digest(data)
    if hasattr(file, "write"):
        torch.save(data, file)
        return
    buffer = io.BytesIO()
    torch.save(data, buffer)
    _write_whole(os.fspath(file), buffer.getvalue())


def _write_whole(path: str, data: bytes) -> None:
    """``data`` at ``path`` whole or not at all: a temporary file next to it, renamed over it."""
    import uuid

    temp = f"{path}.{uuid.uuid4().hex[:8]}.tmp"
    try:
        with open(temp, "xb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(temp, path)
    except OSError as err:  # a failed write names no file: name the one being written
        if err.filename is not None and err.filename != temp:
            raise
        advice = "; free space on that disk or write the file elsewhere" if err.errno == errno.ENOSPC else ""
        raise OSError(err.errno, f"{err.strerror or err} writing {len(data):,} bytes{advice}", path) from None
    finally:
        if os.path.exists(temp):
            os.remove(temp)


CHECKSUM = "sha256"
"""The record entry holding :func:`content_digest` of everything else in the record."""


def content_digest(data: dict[str, Any]) -> str:
    """sha256 of a plain-data record (every entry but :data:`CHECKSUM`): keys, values, and each
    tensor's dtype, shape and bytes, so that any change of the contents changes it."""
    import hashlib

    h = hashlib.sha256()

    def feed(value: Any) -> None:
        if isinstance(value, Tensor):
            t = value.detach().cpu().contiguous()
            h.update(f"T{t.dtype}{tuple(t.shape)};".encode())
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
        elif isinstance(value, dict):
            h.update(b"{")
            for key in sorted(value, key=str):
                h.update(f"{key!r}:".encode())
                feed(value[key])
            h.update(b"}")
        elif isinstance(value, list):
            h.update(b"[")
            for item in value:
                feed(item)
            h.update(b"]")
        else:
            h.update(f"{type(value).__name__}={value!r};".encode())

    feed({k: v for k, v in data.items() if k != CHECKSUM})
    return h.hexdigest()


def load(
    file: File,
    *,
    source: str | None = None,
    what: str = "a file written by dask-influence",
    refit: str = "fit again",
    device: torch.device | str | None = None,
    check: Callable[[dict], None] | None = None,
) -> dict[str, Any]:
    """Read a record written by :func:`save`, without running any code from the file.

    The file is read with ``torch.load(..., weights_only=True)``: its pickle may hold only
    tensors and builtin containers, and a reference to anything else (a function such as
    ``os.system``, any class) is refused before it is called. The values are then rebuilt by
    :func:`from_data`, which builds only allow-listed classes.

    Args:
        source: names the file in error messages (default: the path).
        what: what the file should be, for the error messages (``"a saved fit (written by ...)"``).
        refit: how to make a new file, for the message that refuses an old format.
        device: move every tensor there (default: the CPU).
        check: called with the raw record (format checked, values not yet rebuilt) to refuse it early.

    Raises:
        ValueError: naming the file: not a readable file, not plain data (a pickled object or
            function: refused unrun), written in format 1 (fit again), another format, or
            holding a type that is not allow-listed.
    """
    if source is None:
        source = repr(file) if hasattr(file, "read") else os.fspath(file)
    try:
        with warnings.catch_warnings():  # a plain pickle (not torch.save's) draws a protocol warning
            warnings.filterwarnings("ignore", message="Detected pickle protocol", category=UserWarning)
            raw = torch.load(file if hasattr(file, "read") else os.fspath(file), map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - every failure to read is one message; nothing ran
        raise ValueError(_unreadable(source, what, refit, err)) from None
    if not isinstance(raw, dict) or "format" not in raw:
        raise ValueError(f"{source!r} is not {what}: it holds no record with a format number.")
    if raw["format"] == 1:
        raise ValueError(_old_format(source, refit))
    if raw["format"] != FORMAT:
        raise ValueError(
            f"{source!r} is not {what}: it has file format {raw['format']!r}, and this version "
            f"of dask-influence reads format {FORMAT} (written by another version?); {refit}."
        )
    if raw.get(CHECKSUM) != content_digest(raw):
        raise ValueError(
            f"{source!r} is damaged: its contents do not match the checksum recorded when it was written "
            f"(a changed byte, a partial copy, or an edit); it is not used. {refit[:1].upper()}{refit[1:]}."
        )
    if check is not None:
        check(raw)
    return {
        k: (v if k == "format" else from_data(v, source=source, device=device)) for k, v in raw.items() if k != CHECKSUM
    }


def _old_format(source: str, refit: str) -> str:
    return (
        f"{source!r} was written by an older version of dask-influence (file format 1, a pickle of Python "
        "objects, which cannot be read without running code from the file); it is not read. "
        f"Files are now plain data (format {FORMAT}): {refit}."
    )


_GLOBAL = re.compile(r"GLOBAL\s+([\w.]+)")


def _unreadable(source: str, what: str, refit: str, err: Exception) -> str:
    """The message for a file ``torch.load(weights_only=True)`` refused or could not read."""
    found = _GLOBAL.search(str(err))
    if found and found.group(1).startswith("dask_influence."):
        return _old_format(source, refit)
    if found:
        return (
            f"{source!r} is not {what}: it refers to the Python object {found.group(1)!r}, and a saved "
            "file may hold only data (tensors, numbers, strings, lists, dicts and allow-listed state "
            "classes). It was refused without running anything; do not load it with a tool that "
            "unpickles (it may run code)."
        )
    if isinstance(err, pickle.UnpicklingError):
        return (
            f"{source!r} is not {what}: it is not a file of plain data (tensors and builtin containers; "
            "its contents use an instruction or object that a data file never holds). It was refused "
            "without running anything."
        )
    if isinstance(err, EOFError):
        return f"{source!r} is not {what}: the file is empty or truncated (an interrupted write or copy); {refit}."
    text = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    if "central directory" in text or "zip archive" in text or "Errno 22" in text:
        text = f"the file is truncated or damaged ({text.split('. ')[0]})"
    return f"{source!r} is not {what}: {text}; {refit}."
