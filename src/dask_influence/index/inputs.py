"""What an index was computed from: the inputs of its training blocks, recorded at build time
and checked against every test block of a query (as the solvers check ``feature_shape_``).

The record (attribute ``inputs`` of the index) holds, for every leaf of the first training block
(``"[0]"``, ``"[1]"`` for the ``x`` and ``y`` of pairs; the keys of a dict batch), its feature
shape (the shape of one sample) and dtype, and which leaf is the model's input proper (the
``x`` of pairs, a task's ``perturb``). A test block is refused in one line when that input has
another feature shape, or when any recorded leaf changes between integer and floating point
(integer inputs to a float model, float token ids); other shapes (a sequence length) may differ.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ..core import batches

INTEGER, FLOATING = "integer", "floating point"


def _kind(dtype: Any) -> str:
    return FLOATING if np.dtype(dtype).kind in "fc" else INTEGER


def describe(block: Any, pairs: bool, perturb: str | int | None) -> dict[str, Any]:
    """The record of a block (a batch of numpy arrays or tensors): ``{"leaves": {path: {"shape",
    "dtype"}}, "input": path or None}``."""
    arrays = batches.to_numpy(tuple(block) if isinstance(block, list) else block)
    leaves = {
        path: {"shape": [int(s) for s in np.shape(a)[1:]], "dtype": str(np.asarray(a).dtype)}
        for path, a in zip(batches.leaf_paths(arrays), batches.leaves(arrays))
    }
    if pairs:
        key: str | None = "[0]"
    elif perturb is None:
        key = None
    else:
        key = perturb if isinstance(perturb, str) else f"[{perturb}]"
    return {"leaves": leaves, "input": key if key in leaves else None}


def _label(path: str, pairs: bool, name: str) -> str:
    if pairs:
        return {"[0]": f"x_{name}" if name == "test" else "x", "[1]": f"y_{name}" if name == "test" else "y"}.get(
            path, path
        )
    return f"the input {path!r} of the {name} batch"


def check(recorded: dict[str, Any] | None, block: Any, pairs: bool, name: str = "test") -> None:
    """Refuse a block whose inputs do not match ``recorded`` (see the module docstring).

    Raises:
        ValueError: the input has another feature shape.
        TypeError: a leaf is integer where the index was built on floating point, or the reverse.
    """
    if not recorded:
        return  # an index built before inputs were recorded
    got = describe(block, pairs, None)["leaves"]
    key = recorded.get("input")
    for path, was in recorded["leaves"].items():
        now = got.get(path)
        if now is None:
            continue
        label = _label(path, pairs, name)
        if path == key and now["shape"] != was["shape"]:
            shape = ", ".join(map(str, was["shape"]))
            raise ValueError(
                f"{label} has feature shape {tuple(now['shape'])} but the index was built on inputs of feature "
                f"shape {tuple(was['shape'])}; pass inputs shaped (n{', ' if shape else ''}{shape})."
            )
        if _kind(now["dtype"]) != _kind(was["dtype"]):
            target = was["dtype"]
            raise TypeError(
                f"{label} has {_kind(now['dtype'])} dtype {now['dtype']}, but the index was built on "
                f"{_kind(was['dtype'])} inputs ({was['dtype']}); pass them as {target} "
                f"(e.g. .astype('{target}'))."
            )


def check_source(recorded: dict[str, Any] | None, source: Any, pairs: bool, name: str = "test") -> None:
    """The check of :func:`check` on what a data source knows without loading a block (the
    feature shape and dtype of its input leaf): refuses early, on the driver."""
    if not recorded or recorded.get("input") is None or source.input_dtype is None:
        return
    stand_in = np.empty((0, *source.feature_shape), dtype=source.input_dtype)
    key = recorded["input"]
    only = {"leaves": {key: recorded["leaves"][key]}, "input": key}
    block: Any = (stand_in, np.empty(0)) if pairs else {key: stand_in}
    if pairs:
        only["leaves"] = {"[0]": recorded["leaves"]["[0]"]}
    check(only, block, pairs, name)
