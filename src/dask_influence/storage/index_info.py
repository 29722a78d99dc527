"""What ``inspect`` says about a gradient index (torch-free: reads the zarr attributes only).

The index itself is :mod:`dask_influence.index`; its attributes live under :data:`INDEX_ATTR`.
"""

from __future__ import annotations

from typing import Any

INDEX_ATTR = "dask_influence_index"


def open_index_group(path: str) -> Any | None:
    """The index's zarr group read-only, or ``None`` when ``path`` holds no gradient index."""
    import zarr

    try:
        group: Any = zarr.open_group(path, mode="r")
    except Exception:
        return None
    return group if INDEX_ATTR in group.attrs else None


def describe_index(path: str, group: Any) -> dict[str, Any]:
    """The index's attributes and its completion (blocks written of all): a JSON-able dict."""
    import numpy as np

    attrs = dict(group.attrs[INDEX_ATTR])
    flags = np.asarray(group["gradients_done"][:]) if "gradients_done" in group else np.zeros(0)
    return {
        "kind": "gradient index",
        "path": path,
        **attrs,
        "blocks_done": int((flags > 0).sum()),
        "blocks_total": int(flags.size),
        "bytes_per_point": int(attrs.get("dim", 0))
        * {"float16": 2, "float32": 4, "float64": 8}.get(str(attrs.get("dtype")), 4),
    }


def render_index(d: dict[str, Any]) -> str:
    """Text lines for :func:`describe_index`'s dict."""
    projection = d.get("projection") or {}
    lines = [
        f"{d['path']}: gradient index, {'complete' if d.get('complete') else 'INCOMPLETE'}",
        f"  points      {d.get('n_train', 0):,} in {d['blocks_total']} blocks ({d['blocks_done']} written)",
        f"  projection  {projection.get('kind')}, k = {d.get('dim')}, seed {projection.get('seed')}, "
        f"of p = {d.get('num_params', 0):,} parameters",
        f"  stored as   {d.get('dtype')} ({d['bytes_per_point']} bytes per point)",
        f"  precond.    {d.get('preconditioner')}"
        + (f" ({d['curvature']})" if d.get("curvature") else "")
        + (f", regularization {d['regularization']:g}" if isinstance(d.get("regularization"), (int, float)) else ""),
        f"  task        {d.get('task_loss')}",
        f"  model       sha256 {str(d.get('model_checksum'))[:16]}...",
        f"  created     {d.get('created')}",
    ]
    return "\n".join(lines)
