"""What ``inspect`` says about a gradient index (torch-free: reads the zarr attributes only).

The index itself is :mod:`dask_influence.index`; its attributes live under :data:`INDEX_ATTR`.
"""

from __future__ import annotations

import math
from typing import Any

from .index_verify import INDEX_ATTR, damaged_blocks, data_arrays, problems, read_done
from .index_verify import verify as verify_index


def open_index_group(path: str) -> Any | None:
    """The index's zarr group read-only, or ``None`` when ``path`` holds no gradient index."""
    import zarr

    try:
        group: Any = zarr.open_group(path, mode="r")
    except Exception:
        return None
    return group if INDEX_ATTR in group.attrs else None


def describe_index(path: str, group: Any, *, verify: bool = False) -> dict[str, Any]:
    """The index's attributes and its completion (blocks written of all): a JSON-able dict.

    The completion is checked, not taken from the attribute: the done flags are read (one that
    does not decode counts as not written) and the chunk files listed; ``verify`` also reads and
    decodes every written chunk (:func:`~.index_verify.verify`). ``complete`` is true only when
    the attribute says so and every block is written and present (and, with ``verify``, decodes);
    ``damaged`` says what was found (``None``: nothing).
    """
    import numpy as np

    attrs = dict(group.attrs[INDEX_ATTR])
    if attrs.get("preconditioner") == "none" and attrs.get("regularization_setting") == "auto":
        attrs["regularization"] = 0.0  # what queries use (an index built before that rule stored 0.01)
    if "gradients_done" in group and all(name in group for name in data_arrays(group)):
        flags, _ = read_done(group)
        report = verify_index(group, mode="full" if verify else "exists")
        damaged = problems(report) or None
        checked = report.as_dict()
    else:
        flags, damaged, checked = np.zeros(0, dtype=bool), "its arrays are missing", None
    return {
        "kind": "gradient index",
        "path": path,
        **attrs,
        "complete_attribute": bool(attrs.get("complete")),
        "complete": bool(attrs.get("complete")) and bool(flags.all()) and damaged is None,
        "damaged": damaged,
        "verify": checked if verify else None,
        "blocks_done": int(flags.sum()) - (len(damaged_blocks(report)) if checked else 0),
        "blocks_total": int(flags.size),
        "bytes_per_point": _numbers_per_point(attrs)
        * {"float16": 2, "float32": 4, "float64": 8}.get(str(attrs.get("dtype")), 4),
    }


def _numbers_per_point(attrs: dict[str, Any]) -> int:
    """Stored numbers per training point: ``k``, or ``r sum_l (k_o + k_i)`` in a factored index."""
    if attrs.get("storage") == "factored":
        dims = (attrs.get("projection") or {}).get("layer_dims") or []
        return int(attrs.get("factor_rank", 0)) * sum(int(ko) + int(ki) for ko, ki in dims)
    return int(attrs.get("dim", 0))


def suggested_dim(attributes: dict) -> int | None:
    """The ``k`` to build with when the index's ``k`` is below the estimated effective dimension
    (the next power of 2 at or above it; 4x ``k`` when saturated; at most ``p``), else ``None``."""
    if "effective_dimension_projected" not in attributes:
        return None
    k, estimate = int(attributes["dim"]), attributes.get("effective_dimension")
    p = int(attributes.get("num_params") or 2**62)
    if k >= p or (estimate is not None and k >= min(estimate, p)):
        return None
    return min(4 * k if estimate is None else 1 << math.ceil(math.log2(estimate)), p)


def _curvature_line(d: dict[str, Any]) -> str | None:
    """How ``C`` was summed and stored (``None`` for an index built before these were recorded)."""
    recorded = d.get("ggn_estimate")
    estimate: dict[str, Any] = recorded if isinstance(recorded, dict) else {}
    kind = estimate.get("kind") if estimate else recorded
    if kind == "sampled":
        how: str | None = f"sampled GGN (true Fisher, {estimate['draws']} draws per sample, seed {estimate['seed']})"
    elif kind == "leading":
        how = f"GGN over each sample's leading output-curvature roots ({estimate.get('trace', 1.0):.0%} of the trace)"
    elif kind == "exact":
        how = "exact GGN"
    else:
        how = f"GGN ({kind})" if kind else None
    stored = d.get("curvature_dtype")
    if how is None and stored is None:
        return None
    parts = [how] if how else []
    parts.append(f"stored {stored or 'float64'}")
    return "  curvature   " + ", ".join(parts)


def _dimension_line(d: dict[str, Any]) -> str | None:
    """The effective dimension at the index's ``lambda`` and whether ``k`` is enough."""
    if d.get("effective_dimension_projected") is None:
        return None
    estimate, p = d.get("effective_dimension"), int(d.get("num_params") or 0)
    line = f"  eff. dim.   {d['effective_dimension_projected']:,.1f} of k = {d.get('dim')} (tr(C (C + lambda I)^-1)); "
    line += f"full curvature ~{min(estimate, p or estimate):,.0f}" if estimate is not None else "saturated"
    better = suggested_dim(d)
    return line + (f": k too small, build with projection_dim={better}" if better else ": k is enough")


def render_index(d: dict[str, Any]) -> str:
    """Text lines for :func:`describe_index`'s dict."""
    projection = d.get("projection") or {}
    if d.get("damaged"):
        status = (
            f"DAMAGED: {d['damaged']}; run the build again with --verify "
            "(`dask-influence index JOB.toml --verify`) to recompute them"
        )
    elif d.get("complete"):
        status = "complete" + (
            f" (all {d['verify']['checked']} written chunks read and decoded)" if d.get("verify") else ""
        )
    else:
        status = "INCOMPLETE; run the build again (`dask-influence index JOB.toml`) to write the rest"
    lines = [
        f"{d['path']}: gradient index, {status}",
        f"  points      {d.get('n_train', 0):,} in {d['blocks_total']} blocks ({d['blocks_done']} written)",
        f"  projection  {projection.get('kind')}, k = {d.get('dim')}, seed {projection.get('seed')}, "
        f"of p = {d.get('num_params', 0):,} parameters",
        f"  stored as   {d.get('dtype')}"
        + (f", factored (rank {d.get('factor_rank')} per layer)" if d.get("storage") == "factored" else "")
        + f" ({d['bytes_per_point']} bytes per point)",
        f"  precond.    {d.get('preconditioner')}"
        + (f" ({d['curvature']})" if d.get("curvature") else "")
        + (f", regularization {d['regularization']:g}" if isinstance(d.get("regularization"), (int, float)) else ""),
        *(line for line in (_curvature_line(d), _dimension_line(d)) if line),
        f"  task        {d.get('task_loss')}",
        f"  model       sha256 {str(d.get('model_checksum'))[:16]}...",
        f"  created     {d.get('created')}",
    ]
    return "\n".join(lines)
