"""``dask-influence plot STORE -o FILE.png``: histogram of the mean influence of each training point.

The mean is over the test points (of the computed chunks, read one at a time). With
``--suspects`` (indices such as known or suspected mislabeled points, inline or in a file)
those points are drawn as a second histogram and as ticks under the axis, and the command
says how many of them are among the most harmful. Needs matplotlib.
"""

from __future__ import annotations

import os
import re
from typing import Any

import click
import numpy as np

from ..storage.layout import ATTR
from ..storage.read import mean_influence, open_store, require_up_mode


def parse_suspects(value: str, n_train: int) -> np.ndarray:
    """Indices from ``"3,17,42"`` or from a file (``.npy``, or text: integers separated by
    commas or whitespace, ``#`` comments). Raises ``ValueError`` for bad or out-of-range ones."""
    if os.path.isfile(value):
        if value.endswith(".npy"):
            raw = np.load(value).ravel()
            if not np.issubdtype(raw.dtype, np.integer):
                raise ValueError(f"--suspects file {value!r} holds {raw.dtype} values; save integer indices.")
            indices = raw.astype(np.int64)
        else:
            with open(value) as fh:
                text = "\n".join(line.split("#", 1)[0] for line in fh)
            indices = _ints(text, f"--suspects file {value!r}")
    else:
        if os.sep in value or value.endswith((".txt", ".csv", ".npy")):
            raise ValueError(f"--suspects file {value!r} does not exist.")
        indices = _ints(value, "--suspects")
    bad = indices[(indices < 0) | (indices >= n_train)]
    if bad.size:
        raise ValueError(
            f"--suspects has indices outside 0..{n_train - 1}: {', '.join(map(str, bad[:5]))}"
            f"{' ...' if bad.size > 5 else ''}."
        )
    return np.unique(indices)


def _ints(text: str, what: str) -> np.ndarray:
    tokens = [t for t in re.split(r"[\s,;]+", text.strip()) if t]
    try:
        return np.array([int(t) for t in tokens], dtype=np.int64)
    except ValueError:
        wrong = next(t for t in tokens if not re.fullmatch(r"[+-]?\d+", t))
        raise ValueError(
            f"{what} must be training indices such as 3,17,42 or a file of them; {wrong!r} is not an integer."
        ) from None


def histogram(
    mean: np.ndarray, out: str, *, suspects: np.ndarray | None = None, bins: int = 60, title: str | None = None
) -> None:
    """Write the histogram of ``mean`` (NaN entries left out) to ``out``."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:  # pragma: no cover - matplotlib is a dev dependency
        raise ImportError("`dask-influence plot` needs matplotlib: pip install matplotlib") from None

    finite = np.isfinite(mean)
    is_suspect = np.zeros(mean.shape, dtype=bool)
    if suspects is not None:
        is_suspect[suspects] = True
    fig = Figure(figsize=(7.5, 4.2), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    edges = np.histogram_bin_edges(mean[finite], bins=bins).tolist()
    others = mean[finite & ~is_suspect]
    label = "other training points" if is_suspect.any() else "training points"
    ax.hist(others, bins=edges, color="#4C72B0", alpha=0.85, label=f"{label} ({others.size:,})")
    if is_suspect.any():
        marked = mean[finite & is_suspect]
        ax.hist(marked, bins=edges, color="#DD4444", alpha=0.9, label=f"suspects ({marked.size:,})")
        # a tick under the histogram for each suspect (y in axes coordinates)
        ax.plot(
            marked, np.full(marked.shape, 0.012), "|", color="#DD4444", markersize=9, transform=ax.get_xaxis_transform()
        )
    ax.axvline(0.0, color="0.3", linewidth=0.8, linestyle="--")
    ax.set_yscale("log")
    ax.set_xlabel("mean influence over the test points  (< 0: harmful, > 0: helpful)")
    ax.set_ylabel("training points")
    ax.set_title(title or "Mean influence of each training point")
    ax.legend(loc="upper left")
    fig.savefig(out, dpi=120)


def default_title(store: str, group: Any) -> str:
    """``"<store name>: mean influence per training point (<method>, mode <mode>)"``."""
    config = dict(group.attrs.get(ATTR, {})).get("config") or {}
    name = os.path.basename(os.path.normpath(store)) or store
    method = config.get("method") or "unknown method"
    reg = config.get("regularization")
    details = f"{method}" + (f", regularization {reg:g}" if isinstance(reg, (int, float)) else "")
    return f"{name}: mean influence per training point ({details}, mode {config.get('mode', 'up')})"


def evaluation_plot(group: Any, name: str, out: str, *, title: str | None = None) -> str:
    """Predicted against actual changes of the evaluation ``name`` of a store (``dask-influence evaluate``).

    LDS: each subset's predicted change of each test point's measurement against the measured
    one, both centered per test point (the LDS ranks within a test point). LOO: the predicted
    change ``influence / n_train`` against the retrained one, with the line y = x. Returns a
    one-line description of what was drawn.
    """
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:  # pragma: no cover - matplotlib is a dev dependency
        raise ImportError("`dask-influence plot` needs matplotlib: pip install matplotlib") from None
    from ..evaluate.records import ATTR, GROUP

    found = sorted(group[GROUP].group_keys()) if GROUP in group else []
    if name not in found:
        raise ValueError(
            f"The store has no evaluation {name!r}"
            + (f" (it has {', '.join(found)})" if found else "; run `dask-influence evaluate JOB.toml` first")
            + "."
        )
    sub = group[GROUP][name]
    attrs = dict(sub.attrs.get(ATTR, {}))
    result = attrs.get("result") or {}
    kind = attrs.get("kind")
    fig = Figure(figsize=(5.5, 5.0), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    if kind == "lds" and "predictions" in sub:
        predicted = np.asarray(sub["predictions"][...], dtype=np.float64)
        actual = np.asarray(sub["measurements_mean"][...], dtype=np.float64)
        predicted = predicted - predicted.mean(axis=0)
        actual = actual - actual.mean(axis=0)
        label = f"LDS {result.get('lds_mean', float('nan')):.3f}"
        ax.set_xlabel("predicted change, centered per test point")
        ax.set_ylabel("measured after retraining, centered per test point")
    elif kind == "loo" and "predicted" in sub:
        predicted = np.asarray(sub["predicted"][...], dtype=np.float64)
        actual = np.asarray(sub["actual"][...], dtype=np.float64)
        label = f"Pearson {result.get('pearson', float('nan')):.4f}"
        ax.set_xlabel("predicted change of the test measurement (influence / n_train)")
        ax.set_ylabel("actual change after retraining without the point")
    else:
        raise ValueError(
            f"The evaluation {name!r} ({kind}) has no predictions to plot; run `dask-influence evaluate` to finish it."
        )
    ax.scatter(predicted.ravel(), actual.ravel(), s=8, alpha=0.6, color="#4C72B0")
    both = np.concatenate([predicted.ravel(), actual.ravel()])
    low, high = float(np.nanmin(both)), float(np.nanmax(both))
    if kind == "loo":
        ax.plot([low, high], [low, high], color="0.3", linewidth=0.8, linestyle="--", label="y = x")
        ax.legend(loc="upper left")
    ax.axhline(0.0, color="0.8", linewidth=0.6)
    ax.axvline(0.0, color="0.8", linewidth=0.6)
    ax.set_title(title or f"{name}: predicted vs actual ({label})")
    fig.savefig(out, dpi=120)
    return f"{name} ({kind}): {predicted.size:,} predicted vs actual pairs, {label}"


@click.command()
@click.argument("store", metavar="STORE")
@click.option(
    "-o",
    "--output",
    "out",
    required=True,
    metavar="FILE.png",
    help="The image to write (any format matplotlib knows by its extension).",
)
@click.option(
    "--suspects",
    metavar="INDICES|FILE",
    default=None,
    help="Training indices to mark: '3,17,42', or a file of them (text, or .npy).",
)
@click.option("--bins", type=click.IntRange(2), default=60, show_default=True, help="Histogram bins.")
@click.option("--title", default=None, help="Title of the plot.")
@click.option(
    "--evaluation",
    metavar="NAME",
    default=None,
    help="Draw predicted vs actual of the store's evaluation NAME (lds, loo; see `dask-influence evaluate`) "
    "instead of the histogram.",
)
def plot(store: str, out: str, suspects: str | None, bins: int, title: str | None, evaluation: str | None) -> None:
    """Plot a histogram of the mean influence of each training point of STORE.

    The mean is over the test points; harmful training points (e.g. mislabeled ones) sit
    on the left. --suspects marks given indices in red. --evaluation lds (or loo) draws
    predicted against actual changes of an evaluation instead.
    """
    from .run import one_line

    if evaluation is not None:
        if suspects:
            raise click.UsageError("--suspects marks the histogram; drop it with --evaluation.")
        try:
            drawn = evaluation_plot(open_store(store), evaluation, out, title=title)
        except (ValueError, TypeError, OSError, ImportError) as exc:
            raise click.ClickException(one_line(exc)) from None
        click.echo(f"Wrote {out}: {drawn}.")
        return

    try:
        group = open_store(store)
        require_up_mode(group, "plot")
        mean, count = mean_influence(group)
        if not np.isfinite(mean).any():
            raise ValueError(f"No influences in {store!r} are computed yet; run the job with --resume.")
        marked = parse_suspects(suspects, mean.size) if suspects else None
        histogram(mean, out, suspects=marked, bins=bins, title=title or default_title(store, group))
    except (ValueError, TypeError, OSError, ImportError) as exc:
        raise click.ClickException(one_line(exc)) from None
    n_test = group["influences"].shape[0]
    partial = int((count < n_test).sum())
    click.echo(
        f"Wrote {out}: mean influence of {int(np.isfinite(mean).sum()):,} training points over {n_test:,} test points."
    )
    if partial:
        click.echo(
            f"Warning: the store is incomplete; {partial:,} training points have fewer than {n_test:,} "
            "test points computed.",
            err=True,
        )
    if marked is not None and marked.size:
        others = np.delete(mean, marked)
        lowest = np.argsort(np.where(np.isfinite(mean), mean, np.inf), kind="stable")[: marked.size]
        found = np.intersect1d(lowest, marked).size
        click.echo(
            f"Suspects: {marked.size:,} marked; mean influence {np.nanmean(mean[marked]):.4g} "
            f"(others {np.nanmean(others):.4g}); {found:,} of them are among the {marked.size:,} "
            "most harmful training points."
        )
