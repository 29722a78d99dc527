"""The user's code a job file names: the factory (model, loss, data), the ``[task]``, the
solver; imported with ``[model] path`` searched first."""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from ..errors import JobFileError
from .sections import Job
from .validate import _suggest


@dataclass
class Problem:
    """What the factory returned: the model, the loss (or the ``[task]``'s Task) and the two
    map-style datasets."""

    model: Any
    loss: Any
    train: Any
    test: Any


@contextmanager
def search_path(paths: Sequence[str]) -> Iterator[None]:
    """``paths`` in front of ``sys.path`` for the duration of the block (importing the user's
    module, calling its factory), then ``sys.path`` as it was: a job leaves no directory of its
    own on the import path of the process that ran it."""
    added = [p for p in paths if p not in sys.path]
    sys.path[:0] = added
    try:
        yield
    finally:
        for p in added:
            if p in sys.path:
                sys.path.remove(p)


def _import_module(job: Job, module_name: str, factory: str, section_name: str, paths: Sequence[str]) -> Any:
    """Import ``module_name`` (``paths`` already searched first), or raise the one-line error that
    says whether it was not found or failed while importing."""
    try:
        return importlib.import_module(module_name)
    except ImportError as exc:
        if _module_found(module_name, exc):  # the module is there: its own imports failed
            missing = getattr(exc, "name", None) if isinstance(exc, ModuleNotFoundError) else None
            fix = (
                f"install {missing!r} in this environment (and on the workers)"
                if missing
                else "fix that import or install what it needs (here and on the workers)"
            )
            raise JobFileError(
                f"[{section_name}] factory {factory!r}: importing module {module_name!r} "
                f"({_origin(module_name)}) failed: {type(exc).__name__}: {' '.join(str(exc).split())}; {fix}.",
                path=_path(job),
            ) from exc
        searched = ", ".join(paths) or "sys.path"
        raise JobFileError(
            f"[{section_name}] factory {factory!r}: cannot import module {module_name!r} "
            f"({exc}); searched {searched}. Set [model] path to the directory that holds it.",
            path=_path(job),
        ) from None
    except Exception as exc:  # noqa: BLE001 - the module's own code failed while importing
        raise JobFileError(
            f"[{section_name}] factory {factory!r}: importing module {module_name!r} ({_origin(module_name)}) "
            f"raised {type(exc).__name__}: {' '.join(str(exc).split())}; fix the module (--traceback shows "
            "where).",
            path=_path(job),
        ) from exc


def load_factory(job: Job, factory: str | None = None, section_name: str = "model") -> Callable[..., Any]:
    """Import the ``[model] factory`` function (or another ``"module:function"``), with
    ``[model] path`` searched first (only while importing: ``sys.path`` is left as it was)."""
    paths = job.model.path
    factory = factory or job.model.factory
    module_name, function = factory.split(":", 1)
    _forget_shadowed(module_name, paths)
    with search_path(paths):
        module = _import_module(job, module_name, factory, section_name, paths)
    target: Any = module
    for part in function.split("."):
        if not hasattr(target, part):
            names = [n for n in dir(module) if not n.startswith("_") and callable(getattr(module, n))]
            raise JobFileError(
                f"[{section_name}] factory {factory!r}: module {module_name!r} has no "
                f"{function!r}{_suggest(function, names, what='functions')}",
                path=_path(job),
            )
        target = getattr(target, part)
    if not callable(target):
        raise JobFileError(
            f"[{section_name}] factory {factory!r} is a {type(target).__name__}, not a function.", path=_path(job)
        )
    return target


def _module_found(module_name: str, exc: ImportError) -> bool:
    """Whether ``exc``, raised importing ``module_name``, comes from inside the module (a
    dependency it imports is missing or broken) rather than from not finding it."""
    missing = getattr(exc, "name", None)
    if isinstance(exc, ModuleNotFoundError) and missing is not None:
        # not found: the module itself or one of its parent packages
        return not (module_name == missing or module_name.startswith(missing + "."))
    try:
        return importlib.util.find_spec(module_name) is not None
    except (ImportError, ValueError):
        return False


def _origin(module_name: str) -> str:
    """Where a module that failed while importing lives (its file), for messages."""
    try:
        spec = importlib.util.find_spec(module_name)
    except (ImportError, ValueError):
        spec = None
    return (spec.origin if spec is not None and spec.origin else "found on the path") or module_name


def load_task(job: Job) -> Any:
    """The :class:`~dask_influence.Task` of the ``[task]`` section (``None`` without one).

    Raises:
        JobFileError: the task function rejects its options, or the factory does not
            return a Task.
    """
    from .. import tasks
    from ..core.task import Task

    section = job.task
    if section is None:
        return None
    if section.name is not None:
        fn: Callable[..., Any] = getattr(tasks, section.name)
        where = f"[task] name {section.name!r}"
    else:
        assert section.factory is not None  # one of the two (checked when parsing)
        fn = load_factory(job, section.factory, "task")
        where = f"[task] factory {section.factory!r}"
    try:
        with search_path(job.model.path):
            task = fn(**section.options)
    except TypeError as exc:
        raise JobFileError(f"{where} does not take options {section.options}: {exc}", path=_path(job)) from None
    if not isinstance(task, Task):
        raise JobFileError(f"{where} returned a {type(task).__name__}; return a dask_influence.Task.", path=_path(job))
    return task


def _forget_shadowed(module: str, paths: Sequence[str]) -> None:
    """Drop an imported module of the same name that does not come from the job's ``paths``.

    Two jobs in one process may both have a ``factory.py`` in different directories; the
    second must not get the first one's module from ``sys.modules``.
    """
    from importlib.machinery import PathFinder

    top = module.split(".", 1)[0]
    cached = sys.modules.get(top)
    if cached is None or not paths:
        return
    spec = PathFinder.find_spec(top, list(paths))
    if spec is None or spec.origin is None:
        return
    if os.path.realpath(getattr(cached, "__file__", "") or "") != os.path.realpath(spec.origin):
        for name in [n for n in sys.modules if n == top or n.startswith(top + ".")]:
            del sys.modules[name]
        importlib.invalidate_caches()


def load_problem(job: Job) -> Problem:
    """Call the factory and check what it returns.

    The factory returns a dict (or an object with attributes) with ``model`` (an
    ``nn.Module``), ``loss`` (``loss(outputs, targets)``), ``train`` and ``test`` (map-style
    datasets of ``(x, y)`` pairs); other entries are ignored. With a ``[task]`` section the
    loss is the task (a ``loss`` the factory returns is not used) and the datasets' items may
    be of any structure (dicts, as Hugging Face datasets give them).

    Raises:
        JobFileError: the factory cannot be imported or returns something else.
    """
    import torch
    from torch.utils.data import IterableDataset

    factory = load_factory(job)
    with search_path(job.model.path):  # a factory may import its neighbours when called
        result = factory(**job.model.options)
    name = job.model.factory
    parts: dict[str, Any] = {}
    missing = []
    task = load_task(job)
    for key in ("model", "loss", "train", "test"):
        if key == "loss" and task is not None:
            parts[key] = task
            continue
        if isinstance(result, Mapping):
            present = key in result
            value = result.get(key)
        else:
            present = hasattr(result, key)
            value = getattr(result, key, None)
        if not present:
            missing.append(key)
        parts[key] = value
    if task is None and "train" not in missing:
        keys = _dict_item_keys(parts["train"])
        if keys is not None:  # a Hugging Face style dataset: a loss(outputs, targets) cannot take it
            raise JobFileError(
                f"the factory {name!r} returned train items that are dicts (keys {keys}) and the job has no "
                '[task] section; add one to score them, e.g. [task] name = "classification" (cross-entropy on '
                'model(**inputs).logits, labels under "labels"; or "causal_lm", "regression"; see docs/tasks.md).',
                path=_path(job),
            )
    if missing:
        raise JobFileError(
            f"the factory {name!r} returned a {type(result).__name__} without "
            f"{', '.join(missing)}; return a dict with model, {'' if task is not None else 'loss, '}train and test.",
            path=_path(job),
        )
    problems = []
    if not isinstance(parts["model"], torch.nn.Module):
        problems.append(
            f"the factory {name!r} returned a model of type {type(parts['model']).__name__}; return a torch.nn.Module."
        )
    if task is None and not callable(parts["loss"]):
        problems.append(
            f"the factory {name!r} returned a loss of type {type(parts['loss']).__name__}; "
            "return a callable loss(outputs, targets), e.g. torch.nn.CrossEntropyLoss()."
        )
    for key in ("train", "test"):
        data = parts[key]
        if (
            isinstance(data, IterableDataset)
            or not (hasattr(data, "__len__") and hasattr(data, "__getitem__"))
            or isinstance(data, (str, bytes, Mapping))
        ):
            problems.append(
                f"the factory {name!r} returned {key} of type {type(data).__name__}; return a "
                "map-style torch Dataset of (x, y) pairs, e.g. TensorDataset(x, y)"
                + (" (or, with [task], of dicts)." if task is not None else ".")
            )
    if problems:
        raise JobFileError(problems, path=_path(job))
    return Problem(**parts)


def _dict_item_keys(data: Any) -> str | None:
    """The keys of a dataset's first item when it is a dict (``None`` otherwise, or when it cannot
    be read here: the checks of the data then say what is wrong)."""
    try:
        item = data[0] if hasattr(data, "__getitem__") and len(data) else None
    except Exception:  # noqa: BLE001 - a dataset that fails here fails later with its own error
        return None
    return ", ".join(map(str, item)) if isinstance(item, Mapping) else None


def make_solver(job: Job, model: Any, loss: Any) -> Any:
    """The (unfitted) solver of ``[solver]`` for ``model`` and ``loss`` (a loss or a Task)."""
    section = job.need_solver()
    return section.solver_class(model, loss, **section.params)


def _path(job: Job) -> str | None:
    return None if job.path is None else str(job.path)
