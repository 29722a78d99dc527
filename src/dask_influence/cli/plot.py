"""``dask-influence plot STORE -o FILE.png``: histogram of the mean influence of each training point.

The mean is over the test points (of the computed chunks, read one at a time). With
``--suspects`` (indices such as known or suspected mislabeled points, inline or in a file)
those points are drawn as a second histogram and as ticks under the axis, and the command
says how many of them are among the most harmful. ``--by self`` draws the stored
self-influences instead (``[output] self_influences = true``), the score that finds
mislabeled points (AUC 0.87 on the text example, where the mean influence scores 0.14).
Needs matplotlib.
"""

from __future__ import annotations

import os
import re
import textwrap
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


XLABELS = {
    "mean": "mean influence over the test points  (< 0: harmful, > 0: helpful)",
    "self": "self-influence  (high: the model had to memorize the point; suspects of mislabeling)",
}


def histogram(
    mean: np.ndarray,
    out: Any,
    *,
    suspects: np.ndarray | None = None,
    bins: int = 60,
    title: str | None = None,
    by: str = "mean",
    dpi: int = 120,
) -> None:
    """Write the histogram of ``mean`` (``(n_train,)``, NaN entries left out) to ``out`` (a
    path, or a binary file object with ``format`` from its name: PNG).

    ``by="self"``: the values are self-influences (positive); their bins are logarithmic
    when they span more than two decades."""
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
    values = mean[finite]
    log_x = by == "self" and values.size > 0 and values.min() > 0 and values.max() > 100 * values.min()
    if log_x:
        edges = np.geomspace(values.min(), values.max(), bins + 1).tolist()
        ax.set_xscale("log")
    else:
        edges = np.histogram_bin_edges(values, bins=bins).tolist()
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
    if by != "self":
        ax.axvline(0.0, color="0.3", linewidth=0.8, linestyle="--")
    ax.set_yscale("log")
    ax.set_ylim(bottom=0.5)  # a bin of one point stays visible on the log axis
    ax.set_xlabel(XLABELS[by])
    ax.set_ylabel("training points")
    default = "Self-influence of each training point" if by == "self" else "Mean influence of each training point"
    ax.set_title("\n".join(textwrap.wrap(title or default, 80)), fontsize=11)  # wrapped: never clipped
    ax.legend(loc="best")
    fig.savefig(out, dpi=dpi, format="png" if not isinstance(out, (str, os.PathLike)) else None)


def default_title(store: str, group: Any, by: str = "mean") -> str:
    """``"<store name>: mean influence per training point (<method>, mode <mode>)"`` (``by="self"``:
    ``self-influence``)."""
    config = dict(group.attrs.get(ATTR, {})).get("config") or {}
    name = os.path.basename(os.path.normpath(store)) or store
    method = config.get("method") or "unknown method"
    reg = config.get("regularization")
    details = f"{method}" + (f", regularization {reg:g}" if isinstance(reg, (int, float)) else "")
    what = "self-influence" if by == "self" else "mean influence"
    return f"{name}: {what} per training point ({details}, mode {config.get('mode', 'up')})"


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
    _readable_ticks(ax)
    ax.set_title(title or f"{name}: predicted vs actual ({label})")
    fig.savefig(out, dpi=120)
    return f"{name} ({kind}): {predicted.size:,} predicted vs actual pairs, {label}"


def _readable_ticks(ax: Any) -> None:
    """At most 6 ticks per axis, small and large values in scientific notation with the power
    of ten written once, in the axis label (``... (x10^-4)``; Matplotlib's own place for it, the
    axis' end, collides with a long x label): leave-one-out changes (``influence / n_train``,
    often 1e-4 to 1e-6) otherwise got up to 11 labels of 8 characters, overlapping."""
    from matplotlib.ticker import MaxNLocator

    for axis in (ax.xaxis, ax.yaxis):
        axis.set_major_locator(MaxNLocator(nbins=6))
    ax.ticklabel_format(style="sci", scilimits=(-2, 4), useMathText=True)
    ax.figure.canvas.draw()  # the formatters choose their power of ten when drawn
    for axis in (ax.xaxis, ax.yaxis):
        offset = axis.get_major_formatter().get_offset()
        if offset:
            axis.set_label_text(f"{axis.get_label_text()} ({offset})")
            axis.offsetText.set_visible(False)


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
@click.option(
    "--by",
    type=click.Choice(["mean", "self"]),
    default="mean",
    show_default=True,
    help="mean: mean influence over the test points; self: the stored self-influence (finds mislabeled "
    "points; needs [output] self_influences = true).",
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
def plot(
    store: str, out: str, suspects: str | None, by: str, bins: int, title: str | None, evaluation: str | None
) -> None:
    """Plot a histogram of the mean influence (or, --by self, the self-influence) of each
    training point of STORE.

    The mean is over the test points; harmful training points sit on the left. Mislabeled
    points show best by self-influence (--by self), on the right. --suspects marks given
    indices in red. --evaluation lds (or loo) draws predicted against actual changes of an
    evaluation instead.
    """
    from .output import one_line

    if evaluation is not None:
        if suspects or by != "mean":
            raise click.UsageError("--suspects and --by draw the histogram; drop them with --evaluation.")
        try:
            drawn = evaluation_plot(open_store(store), evaluation, out, title=title)
        except (ValueError, TypeError, OSError, ImportError) as exc:
            raise click.ClickException(one_line(exc)) from None
        click.echo(f"Wrote {out}: {drawn}.")
        return

    try:
        group = open_store(store)
        require_up_mode(group, "plot")
        if by == "self":
            from .rank import self_influence

            mean = self_influence(group, "plot --by self")
            count = np.where(np.isfinite(mean), group["influences"].shape[0], 0)
            if not np.isfinite(mean).any():
                raise ValueError(f"No self-influences in {store!r} are computed yet; run the job with --resume.")
        else:
            mean, count = mean_influence(group)
            if not np.isfinite(mean).any():
                raise ValueError(f"No influences in {store!r} are computed yet; run the job with --resume.")
        marked = parse_suspects(suspects, mean.size) if suspects else None
        histogram(mean, out, suspects=marked, bins=bins, title=title or default_title(store, group, by), by=by)
    except (ValueError, TypeError, OSError, ImportError) as exc:
        raise click.ClickException(one_line(exc)) from None
    n_test = group["influences"].shape[0]
    partial = int((count < n_test).sum())
    if by == "self":
        click.echo(f"Wrote {out}: self-influence of {int(np.isfinite(mean).sum()):,} training points.")
    else:
        click.echo(
            f"Wrote {out}: mean influence of {int(np.isfinite(mean).sum()):,} training points over "
            f"{n_test:,} test points."
        )
    if partial and by == "self":
        click.echo(
            f"Warning: the store is incomplete; {partial:,} training points have no self-influence computed yet.",
            err=True,
        )
    elif partial:
        click.echo(
            f"Warning: the store is incomplete; {partial:,} training points have fewer than {n_test:,} "
            "test points computed.",
            err=True,
        )
    if marked is not None and marked.size:
        others = np.delete(mean, marked)
        if by == "self":
            extreme = np.argsort(np.where(np.isfinite(mean), -mean, np.inf), kind="stable")[: marked.size]
            where = "highest self-influence"
        else:
            extreme = np.argsort(np.where(np.isfinite(mean), mean, np.inf), kind="stable")[: marked.size]
            where = "most harmful"
        found = np.intersect1d(extreme, marked).size
        click.echo(
            f"Suspects: {marked.size:,} marked; {'self-influence' if by == 'self' else 'mean influence'} "
            f"{np.nanmean(mean[marked]):.4g} (others {np.nanmean(others):.4g}); {found:,} of them are among the "
            f"{marked.size:,} {where} training points."
        )
