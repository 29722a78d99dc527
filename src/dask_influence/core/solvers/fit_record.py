"""A fitted solver as one record of plain data, and the checks that a record belongs to a solver.

One module for both places a fit is kept: ``solver.save(path)`` / ``InfluenceModel.load(path,
model, loss)`` (:mod:`.base`) and a job's saved fit next to its store (``<store>.fit.pt``,
:mod:`dask_influence.mapping.fitting`), which is the same record plus the training data's
fingerprint. Files are written and read by :mod:`..serialization` (format 2: ``torch.save`` of
plain data, read with ``weights_only=True``; objects are rebuilt only from its allow-list of
``@serializable`` classes): reading a record never runs code from the file.

The record (a ``dict``):

- ``method``: the registered solver name; ``class``: the solver class's name;
- ``hyperparameters``: ``config.to_dict()`` (a record written before a hyperparameter was renamed
  is read with the new name: ``SolverConfig.upgrade``);
- ``params_checksum``: sha256 of the flat trainable parameters ``theta`` (``(p,)``), and
  ``num_params``: ``p``;
- ``n_train``, ``feature_shape`` and ``float_inputs`` (optional on read) of the training data;
- ``task_loss``: the task's training loss by name (absent for a pair loss ``loss(outputs, targets)``);
- ``attributes``: the fitted state, ``{name: value}`` of the class's ``_saved_attributes``;
- a job's fit only: ``training_data``, the data's size, block sizes and sha256.
"""

from __future__ import annotations

import dataclasses
import hashlib
from typing import TYPE_CHECKING, Any, BinaryIO

import torch
from torch import Tensor

from .. import serialization
from .registry import load_plugins

if TYPE_CHECKING:
    from ..data import TrainingData
    from .base import InfluenceModel

REQUIRED = ("class", "hyperparameters", "params_checksum", "num_params", "n_train", "feature_shape", "attributes")
"""The keys every record has (``method``, ``float_inputs`` and ``task_loss`` may be absent)."""


def checksum(theta: Tensor) -> str:
    """sha256 (hex) of the flat trainable parameters ``theta`` (``(p,)``): what ties a fit to its weights."""
    return hashlib.sha256(theta.detach().cpu().contiguous().numpy().tobytes()).hexdigest()


def make(solver: InfluenceModel, theta: Tensor, **extra: Any) -> dict[str, Any]:
    """The record of a fitted ``solver`` whose trainable parameters are ``theta``, plus ``extra`` keys."""
    return {
        "method": type(solver).method,
        "class": type(solver).__name__,
        "hyperparameters": solver.config.to_dict(),
        "params_checksum": checksum(theta),
        "num_params": solver.num_params,
        "n_train": solver.n_train_,
        "feature_shape": tuple(solver.feature_shape_ or ()),
        # whether the training inputs were floating point (integer inputs are then refused with a
        # clear TypeError); optional on load, absent from older files
        "float_inputs": getattr(solver, "_float_inputs", None),
        # the task's training loss (by name; absent for a pair loss): the fit depends on it
        **({} if solver.objective.pairs else {"task_loss": solver.objective.loss_id()}),
        "attributes": {name: getattr(solver, name) for name in solver._saved_attributes},
        **extra,
    }


def write(solver: InfluenceModel, theta: Tensor, file: str | BinaryIO, **extra: Any) -> None:
    """Write :func:`make`'s record to ``file`` (a local path or a binary file)."""
    serialization.save(make(solver, theta, **extra), file)


def read(file: str | BinaryIO, *, where: str, what: str, refit: str) -> dict[str, Any]:
    """The record in ``file``, read as plain data and checked to have :data:`REQUIRED`'s keys.

    Raises:
        ValueError: naming ``where`` as not ``what`` (unreadable, not plain data, an old format, a
            key missing) and saying ``refit``, what to do instead.
    """
    # the allow-list holds the state classes of every imported solver module: the built-in ones (this
    # package's __init__ imports them all) and the entry-point solvers, loaded here
    load_plugins()
    record = serialization.load(file, source=where, what=what, refit=refit)
    missing = [k for k in REQUIRED if k not in record]
    if missing or not isinstance(record["hyperparameters"], dict) or not isinstance(record["attributes"], dict):
        raise ValueError(
            f"{where!r} is not {what}: it lacks {', '.join(missing) or 'the hyperparameters and attributes as dicts'}."
        )
    return record


def mismatches(record: dict[str, Any], solver: InfluenceModel, theta: Tensor) -> list[str]:
    """What in ``record`` says it was not fitted for ``solver`` with the parameters ``theta``: another
    class, other fit-relevant hyperparameters (``solve_time`` ones such as the regularization of
    the factorizing solvers may differ), another training loss, other weights. Empty: it belongs."""
    problems = []
    name = type(solver).__name__
    if record.get("class") != name:
        problems.append(f"it holds a fitted {record.get('class')}, not a {name}")
    else:
        ours = solver.config.fit_relevant()
        recorded = type(solver.config).upgrade(record.get("hyperparameters", {}))  # names renamed since: the new ones
        saved = {k: v for k, v in recorded.items() if k not in solver.config.solve_time}
        differ = sorted(k for k in set(ours) | set(saved) if not same_value(ours.get(k), saved.get(k)))
        if differ:
            problems.append(f"its hyperparameters differ ({', '.join(differ)})")
    task_loss = None if solver.objective.pairs else solver.objective.loss_id()
    if record.get("task_loss") != task_loss:
        problems.append(f"it was fitted with another training loss ({record.get('task_loss') or 'a pair loss'})")
    if record.get("num_params") != theta.numel() or record.get("params_checksum") != checksum(theta):
        problems.append("it was fitted with other model weights (the checksum of the trainable parameters differs)")
    return problems


def restore(
    solver: InfluenceModel,
    record: dict[str, Any],
    theta: Tensor,
    data: TrainingData | None,
    *,
    where: str,
    float_inputs: bool | None = None,
) -> None:
    """Set ``record``'s fitted attributes on ``solver`` (on its device) and finish its fit
    (``data``: the training data of solvers that apply the curvature at solve time, else ``None``)."""
    unknown = sorted(set(record["attributes"]) - set(solver._saved_attributes))
    if unknown:
        raise ValueError(
            f"{where!r} holds attributes {', '.join(unknown)} that {type(solver).__name__} does not "
            "save; it was not written for this solver."
        )
    for name, value in record["attributes"].items():
        if solver.device.type != "cpu":
            value = serialization.to_device(value, solver.device)
        setattr(solver, name, value)
    solver.finish_fit(
        theta,
        data,
        n=record["n_train"],
        feature_shape=record["feature_shape"],
        float_inputs=float_inputs if float_inputs is not None else record.get("float_inputs"),
    )


def constructor_keywords(hyperparameters: dict[str, Any]) -> dict[str, Any]:
    """Saved hyperparameters as constructor keywords: a value ``config.to_dict()`` could only
    record by its class name (``"<MyPreconditioner>"``, a custom preconditioner instance)
    becomes ``None``; the fitted object itself comes back with the saved attributes."""
    return {
        k: None if isinstance(v, str) and len(v) > 2 and v[0] == "<" and v[-1] == ">" else v
        for k, v in hyperparameters.items()
    }


def same_value(a: Any, b: Any) -> bool:
    """Whether two hyperparameter values are the same: tensors by value, sequences item by
    item, plain values by ``==``, other objects (a preconditioner instance) by their class."""
    if isinstance(a, Tensor) or isinstance(b, Tensor):
        return (
            isinstance(a, Tensor)
            and isinstance(b, Tensor)
            and a.shape == b.shape
            and bool(torch.equal(a.cpu(), b.cpu()))
        )
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(same_value(u, v) for u, v in zip(a, b))
    if isinstance(a, (bool, int, float, str, type(None))) or isinstance(b, (bool, int, float, str, type(None))):
        return a == b
    return type(a) is type(b)


def to_device(value: Any, device: torch.device) -> Any:
    """The tensors of a (dataclass, tuple or list) state moved to ``device``."""
    if isinstance(value, Tensor):
        return value.to(device)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        changes = {f.name: to_device(getattr(value, f.name), device) for f in dataclasses.fields(value) if f.init}
        return dataclasses.replace(value, **changes)
    if isinstance(value, tuple):
        return tuple(to_device(v, device) for v in value)
    if isinstance(value, list):
        return [to_device(v, device) for v in value]
    return value


def load_solver(cls: type[InfluenceModel], where: str, model: Any, loss: Any, train: Any) -> InfluenceModel:
    """:meth:`InfluenceModel.load`: the fitted solver of the record at ``where`` for ``model`` and
    ``loss`` (``cls`` the base class: the registered class the record names), after checking that
    the record is one ``save`` wrote for that class, its hyperparameters, training loss and
    the model's weights; ``train`` for the solvers that apply the curvature at solve time."""
    from ..gradients import flat_params

    saved = read(
        where,
        where=where,
        what="a file written by InfluenceModel.save()",
        refit=f"fit the solver again and save it ({cls.__name__}(model, loss, ...).fit(train).save(path))",
    )
    if cls.__module__ == f"{__package__}.base" and saved.get("method"):  # InfluenceModel.load: the class it names
        from .registry import solver_class

        cls = solver_class(saved["method"])
    if saved["class"] != cls.__name__:
        raise ValueError(f"{where!r} holds a fitted {saved['class']}; use {saved['class']}.load().")
    saved["hyperparameters"] = cls.config_class.upgrade(saved["hyperparameters"])  # written before a rename
    unknown = sorted(set(saved["hyperparameters"]) - set(cls.config_class.field_names()))
    if unknown:
        raise ValueError(
            f"{where!r} records hyperparameters {', '.join(unknown)} that {cls.__name__} "
            "does not take (written by another version?); fit again."
        )
    solver = cls(model, loss, **constructor_keywords(saved["hyperparameters"]))
    recorded = saved.get("task_loss")
    current = None if solver.objective.pairs else solver.objective.loss_id()
    if recorded != current:
        raise ValueError(
            f"{where!r} was fitted with the training loss {recorded or 'loss(outputs, targets) of (x, y) pairs'}, "
            f"but this solver's is {current or 'a loss(outputs, targets) of (x, y) pairs'}; load it with the "
            "task (or loss) it was fitted with, or fit again."
        )
    theta = flat_params(solver.model, solver._functions.spec)  # a float32 copy of a half-precision model
    if theta.numel() != saved["num_params"] or checksum(theta) != saved["params_checksum"]:
        raise ValueError(
            f"The model's trainable parameters differ from those the saved {cls.__name__} was "
            "fitted with; load it with the same trained model (weights and frozen layers), "
            "or fit again."
        )
    if cls.needs_training_data and train is None:
        raise ValueError(
            f"{cls.__name__} applies the curvature from the training data when it solves; "
            f"pass it: {cls.__name__}.load(path, model, loss, train=train_loader)."
        )
    source = None
    if cls.needs_training_data:
        source = solver.training_data(train)
        source.scan()
    restore(solver, saved, theta, source, where=where)
    return solver


def fingerprint(solver: InfluenceModel) -> str:
    """A deterministic hash of ``solver``: method, hyperparameters (a renamed one under its old name,
    ``SolverConfig.fingerprint_dict``: a rename keeps fingerprints), the task (not for a pair loss:
    those keep the fingerprints of earlier versions), the model's weights and, when fitted, the
    fitted state. Two solvers with the same fingerprint give the same influences."""
    h = hashlib.sha256(f"{solver.method or type(solver).__name__};".encode())
    hash_tree(h, solver.config.fingerprint_dict())  # renamed hyperparameters under their old names
    if not solver.objective.pairs:
        hash_tree(h, solver.objective.describe())
    for p in solver.model.parameters():
        h.update(p.detach().cpu().contiguous().numpy().tobytes())
    if solver.is_fitted:
        hash_tree(h, solver.fitted_state())
    return h.hexdigest()[:32]


def hash_tree(h: Any, value: Any) -> None:
    """Feed ``value`` (tensors, numbers, strings, containers, dataclasses, plain objects) to ``h``."""
    import dataclasses

    if isinstance(value, Tensor):
        t = value.detach().cpu().contiguous()
        h.update(f"T{t.dtype}{tuple(t.shape)};".encode())
        h.update(t.numpy().tobytes() if t.dtype not in (torch.bfloat16,) else t.float().numpy().tobytes())
    elif isinstance(value, (bool, int, float, str, type(None))):
        h.update(f"{type(value).__name__}={value!r};".encode())
    elif isinstance(value, dict):
        h.update(b"{")
        for key in sorted(value, key=str):
            h.update(f"{key}:".encode())
            hash_tree(h, value[key])
        h.update(b"}")
    elif isinstance(value, (list, tuple)):
        h.update(b"[")
        for item in value:
            hash_tree(h, item)
        h.update(b"]")
    elif dataclasses.is_dataclass(value) and not isinstance(value, type):
        h.update(f"{type(value).__name__}(".encode())
        hash_tree(h, {f.name: getattr(value, f.name) for f in dataclasses.fields(value)})
        h.update(b")")
    elif hasattr(value, "__dict__"):
        h.update(f"{type(value).__name__}(".encode())
        hash_tree(h, {k: v for k, v in vars(value).items() if k != "num_applications"})
        h.update(b")")
    else:
        h.update(repr(type(value)).encode())
