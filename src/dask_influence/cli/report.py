"""``dask-influence report STORE -o report.html``: one static HTML page that a person reads.

The page holds, for the ``-n`` most interesting test points (those with the largest
``|influence|`` to any training point, usually the ones the model gets wrong), their ``-k``
most helpful and most harmful training points with their scores; the training points with
the highest self-influence (the suspects of mislabeling) and the most harmful on average;
histograms of the mean influence and the self-influence (PNG, inline); and what the store
was computed with (method, parameters, shapes, completion, versions).

With ``--job JOB.toml`` the job's factory is called once, and the training points are
rendered by the ``show`` it may return (``show(index) -> str | PIL image | numpy image |
dict``: text, a thumbnail, or the cells of a table row), test points by ``show_test``;
without them the page lists indices only. The page is one file: no server, no script, no
reference outside it (CSS inline, images as ``data:`` URIs); every text from the store or
the factory is escaped.

Memory: one pass over the computed chunks of the store (streamed), plus a few vectors of
``n_train`` and ``n_test``.
"""

from __future__ import annotations

import base64
import datetime as _dt
import html
import io
import os
import sys
import time
from collections.abc import Callable, Mapping
from typing import Any

import click
import numpy as np

from .options import TRACEBACK

__all__ = ["report", "write_report", "content_html"]

TEXT_LIMIT = 600
"""Characters of a ``show`` text shown before it is cut (with an ellipsis)."""
THUMBNAIL = 96
"""The longest side, in pixels, of an image a ``show`` returns, as drawn in the page."""


def esc(value: Any) -> str:
    """``value`` as escaped HTML text (quotes included)."""
    return html.escape(str(value), quote=True)


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


# -- rendering what `show` returns ------------------------------------------------------------


def _image_array(value: Any) -> np.ndarray | None:
    """``value`` as an ``(H, W)`` or ``(H, W, 3|4)`` uint8 array when it is an image (a numpy
    array or torch tensor of 2 dimensions, or 3 with 1, 3 or 4 channels first or last), else None.

    uint8 and bool are taken as they are, other integers in 0..255 as 8-bit values, floats in
    [0, 1] as intensities; anything else is stretched from its minimum to its maximum."""
    if hasattr(value, "detach") and hasattr(value, "cpu"):  # a torch tensor
        value = value.detach().cpu().numpy()
    if not isinstance(value, np.ndarray) or value.ndim not in (2, 3) or value.size == 0:
        return None
    a = value
    if a.ndim == 3 and a.shape[0] in (1, 3, 4) and a.shape[-1] not in (1, 3, 4):
        a = np.moveaxis(a, 0, -1)
    if a.ndim == 3 and a.shape[-1] == 1:
        a = a[..., 0]
    if a.ndim == 3 and a.shape[-1] not in (3, 4):
        return None
    if min(a.shape[:2]) < 2:  # a row or a column of numbers, not a picture
        return None
    if a.dtype == np.uint8:
        return a
    if a.dtype == bool:
        return a.astype(np.uint8) * 255
    if not (np.issubdtype(a.dtype, np.number)):
        return None
    integer = np.issubdtype(a.dtype, np.integer)
    a = np.nan_to_num(a.astype(np.float64))
    low, high = float(a.min()), float(a.max())
    if integer and low >= 0 and high <= 255:
        low, high = 0.0, 255.0  # 8-bit pixel values
    elif not integer and low >= 0 and high <= 1:
        low, high = 0.0, 1.0  # intensities in [0, 1]
    # anything else: stretched from its minimum (black) to its maximum (white)
    scale = 255.0 / (high - low) if high > low else 0.0
    return np.clip((a - low) * scale, 0, 255).round().astype(np.uint8)


def _png_uri(image: Any) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def _img(image: Any, alt: str) -> str:
    """An ``<img>`` of a PIL image: shrunk to :data:`THUMBNAIL` pixels, small ones drawn larger
    with sharp pixels."""
    from PIL import Image

    if image.mode not in ("L", "RGB", "RGBA"):
        image = image.convert("RGBA" if "A" in image.getbands() else "RGB")
    if max(image.size) > THUMBNAIL:
        image = image.copy()
        image.thumbnail((THUMBNAIL, THUMBNAIL), Image.Resampling.LANCZOS)
    width, height = image.size
    scale = max(1, min(THUMBNAIL // 2 // max(width, height), 8))  # 8x8 digits drawn at 48 px
    return (
        f'<img class="thumb" src="{_png_uri(image)}" width="{width * scale}" height="{height * scale}" '
        f'alt="{esc(alt)}">'
    )


def content_html(value: Any, alt: str = "") -> str:
    """HTML for one value a ``show`` function returned (not a dict): escaped text (cut after
    :data:`TEXT_LIMIT` characters), or an inline PNG thumbnail of an image (PIL image, numpy
    array or torch tensor of shape ``(H, W)``, ``(H, W, C)`` or ``(C, H, W)``, C in 1, 3, 4)."""
    if value is None:
        return ""
    if type(value).__module__.startswith("PIL.") and hasattr(value, "save") and hasattr(value, "size"):
        return _img(value, alt)
    pixels = _image_array(value)
    if pixels is not None:
        from PIL import Image

        return _img(Image.fromarray(pixels), alt)
    if isinstance(value, float):
        text = f"{value:.6g}"
    elif isinstance(value, np.ndarray):
        text = np.array2string(value, precision=4, threshold=20, separator=", ")
    else:
        text = str(value)
    if len(text) > TEXT_LIMIT:
        text = text[:TEXT_LIMIT] + " …"
    return f'<span class="text">{esc(text)}</span>'


class Shower:
    """Calls a ``show`` function once per index (cached); an error becomes the cell's text
    and is counted (the page is written anyway)."""

    def __init__(self, show: Callable[[int], Any] | None, what: str) -> None:
        self.show = show
        self.what = what
        self.cache: dict[int, Any] = {}
        self.errors: list[str] = []

    def __call__(self, index: int) -> Any:
        if self.show is None:
            return None
        if index not in self.cache:
            try:
                self.cache[index] = self.show(index)
            except Exception as exc:  # noqa: BLE001 - the user's function: shown, not fatal
                message = f"{self.what}({index}) raised {type(exc).__name__}: {' '.join(str(exc).split())}"
                self.errors.append(message)
                self.cache[index] = _Failed(message)
        return self.cache[index]


class _Failed(str):
    """The text shown in place of a ``show`` that raised."""


def _columns(contents: list[Any]) -> list[str]:
    """The keys of the dict contents, in first-seen order (each becomes a column)."""
    keys: list[str] = []
    for c in contents:
        if isinstance(c, Mapping):
            keys += [str(k) for k in c if str(k) not in keys]
    return keys


SELF = "self-influence"
"""The name of the self-influence column (never coloured as helpful or harmful: it is positive)."""


def _sign(value: float) -> str:
    """The CSS class of an influence: ``pos`` (helpful, green), ``neg`` (harmful, red)."""
    return "pos" if value > 0 else "neg" if value < 0 else ""


def ranking_table(
    rows: list[tuple[int, float]],
    shower: Shower,
    *,
    kind: str,
    score: str,
    extra: dict[str, np.ndarray] | None = None,
) -> str:
    """A table of training points: rank, index, the score (and ``extra`` columns of per-point
    values), then the content of each point: one column per key when ``show`` returns dicts,
    else one ``content`` column."""
    contents = [shower(i) for i, _ in rows]
    keys = _columns(contents)
    plain = shower.show is not None and any(not isinstance(c, Mapping) for c in contents)
    extra = extra or {}
    head = ["rank", "index", score, *extra, *keys] + (["content"] if plain else [])
    out = [f'<table class="ranking {esc(kind)}"><thead><tr>']
    out += [f"<th>{esc(h)}</th>" for h in head]
    out.append("</tr></thead><tbody>")
    for rank, ((index, value), content) in enumerate(zip(rows, contents), 1):
        sign = _sign(value) if score != SELF else ""
        out.append(f'<tr data-index="{index}" data-value="{value!r}">')
        out.append(f'<td class="num">{rank}</td><td class="num idx">{index}</td>')
        out.append(f'<td class="num {sign}">{value:.4g}</td>')
        for name, values in extra.items():
            v = float(values[index])
            out.append(f'<td class="num {_sign(v) if name != SELF else ""}">{v:.4g}</td>')
        mapping = content if isinstance(content, Mapping) else {}
        for key in keys:
            found = next((v for k, v in mapping.items() if str(k) == key), None)
            out.append(f"<td>{content_html(found, f'{key} of training point {index}')}</td>")
        if plain:
            cell = "" if isinstance(content, Mapping) else content_html(content, f"training point {index}")
            out.append(f'<td class="{"failed" if isinstance(content, _Failed) else "content"}">{cell}</td>')
        out.append("</tr>")
    out.append("</tbody></table>")
    return "".join(out)


def _test_content(value: Any, index: int) -> str:
    if value is None:
        return ""
    if isinstance(value, Mapping):
        cells = "".join(
            f"<tr><th>{esc(k)}</th><td>{content_html(v, f'{k} of test point {index}')}</td></tr>"
            for k, v in value.items()
        )
        return f'<table class="test-content">{cells}</table>'
    return f'<div class="test-content">{content_html(value, f"test point {index}")}</div>'


# -- reading the store ------------------------------------------------------------------------


def scan(group: Any) -> dict[str, Any]:
    """One streamed pass over the computed chunks of ``influences``.

    Returns per training point (``(n_train,)``) ``mean``, ``min``, ``max`` and ``count`` (NaN
    where nothing is computed), per test point (``(n_test,)``) ``row_absmax`` (the largest
    ``|influence|``, NaN where nothing is computed) and ``row_count``, and the overall
    ``summary`` (min, max, mean, fraction positive, values).
    """
    from ..storage.read import done_blocks

    n_test, n_train = group["influences"].shape[:2]
    total = np.zeros(n_train)
    low = np.full(n_train, np.inf)
    high = np.full(n_train, -np.inf)
    count = np.zeros(n_train, dtype=np.int64)
    absmax = np.full(n_test, -np.inf)
    row_count = np.zeros(n_test, dtype=np.int64)
    values = positive = 0
    for (r0, c0), block in done_blocks(group):
        b = np.asarray(block, dtype=np.float64)
        rows, cols = b.shape[:2]
        total[c0 : c0 + cols] += b.sum(axis=0)
        low[c0 : c0 + cols] = np.minimum(low[c0 : c0 + cols], b.min(axis=0))
        high[c0 : c0 + cols] = np.maximum(high[c0 : c0 + cols], b.max(axis=0))
        count[c0 : c0 + cols] += rows
        absmax[r0 : r0 + rows] = np.maximum(absmax[r0 : r0 + rows], np.abs(b).max(axis=1))
        row_count[r0 : r0 + rows] += cols
        values += b.size
        positive += int((b > 0).sum())
    seen = count > 0
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = np.where(seen, total / np.maximum(count, 1), np.nan)
    return {
        "mean": mean,
        "min": np.where(seen, low, np.nan),
        "max": np.where(seen, high, np.nan),
        "count": count,
        "row_absmax": np.where(row_count > 0, absmax, np.nan),
        "row_count": row_count,
        "summary": {
            "values": values,
            "min": float(np.nanmin(np.where(seen, low, np.nan))) if values else None,
            "max": float(np.nanmax(np.where(seen, high, np.nan))) if values else None,
            "mean": float(total.sum() / values) if values else None,
            "fraction_positive": positive / values if values else None,
        },
    }


def interesting_tests(row_absmax: np.ndarray, n: int) -> np.ndarray:
    """The ``n`` test indices with the largest ``row_absmax`` (``(n_test,)``, NaN: not computed,
    left out), largest first; ties keep the lower index first."""
    seen = np.flatnonzero(~np.isnan(row_absmax))
    return seen[np.argsort(-row_absmax[seen], kind="stable")][:n]


# -- figures ------------------------------------------------------------------------------------


def _figure_uri(draw: Callable[[Any], None]) -> str:
    buffer = io.BytesIO()
    draw(buffer)
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def _scatter(mean: np.ndarray, selfs: np.ndarray, suspects: np.ndarray, out: Any) -> None:
    """Mean influence against self-influence of each training point, the suspects in red."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7.5, 4.2), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ok = np.isfinite(mean) & np.isfinite(selfs)
    marked = np.zeros(mean.shape, dtype=bool)
    marked[suspects] = True
    ax.scatter(mean[ok & ~marked], selfs[ok & ~marked], s=9, color="#4C72B0", alpha=0.6, label="training points")
    ax.scatter(mean[ok & marked], selfs[ok & marked], s=16, color="#DD4444", label="listed suspects")
    if ok.any() and selfs[ok].min() > 0 and selfs[ok].max() > 100 * selfs[ok].min():
        ax.set_yscale("log")
    ax.axvline(0.0, color="0.3", linewidth=0.8, linestyle="--")
    ax.set_xlabel("mean influence over the test points  (< 0: harmful, > 0: helpful)")
    ax.set_ylabel("self-influence")
    ax.set_title("Mean influence against self-influence", fontsize=11)
    ax.legend(loc="best")
    fig.savefig(out, dpi=100, format="png")


# -- the page -----------------------------------------------------------------------------------

CSS = """
body { font: 15px/1.45 -apple-system, "Segoe UI", "DejaVu Sans", Helvetica, Arial, sans-serif;
       color: #1d232b; background: #fff; margin: 0; }
main { max-width: 1180px; margin: 0 auto; padding: 24px 28px 48px; }
h1 { font-size: 26px; margin: 0 0 4px; }
h2 { font-size: 20px; margin: 34px 0 10px; padding-bottom: 4px; border-bottom: 2px solid #e3e7ec; }
h3 { font-size: 16px; margin: 0 0 8px; }
p.lead { color: #4a5561; margin: 0 0 12px; }
.note { color: #4a5561; font-size: 13.5px; }
.warn { background: #fff4e0; border-left: 4px solid #e8a33d; padding: 8px 12px; margin: 12px 0; }
nav { font-size: 14px; margin: 12px 0 0; }
nav a { margin-right: 14px; }
a { color: #2a62b8; text-decoration: none; }
table { border-collapse: collapse; font-size: 13.5px; }
th, td { padding: 4px 9px; text-align: left; vertical-align: top; }
thead th { background: #eef1f5; border-bottom: 1px solid #cfd6de; white-space: nowrap; }
tbody tr:nth-child(even) { background: #f7f9fb; }
td.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
td.pos { color: #1d7a3a; } td.neg { color: #b3261e; }
td.idx { font-weight: 600; }
td.failed { color: #b3261e; font-style: italic; }
.text { white-space: pre-wrap; word-break: break-word; font-family: "DejaVu Sans Mono", Menlo, Consolas, monospace;
        font-size: 12.5px; }
img.thumb { image-rendering: pixelated; border: 1px solid #d5dbe2; vertical-align: middle; }
table.facts th { background: none; font-weight: 600; color: #4a5561; white-space: nowrap; border: 0; }
table.facts td { border: 0; }
table.facts tbody tr:nth-child(even) { background: none; }
section.test-point { border: 1px solid #e3e7ec; border-radius: 8px; padding: 14px 16px; margin: 16px 0; }
.pair { display: flex; flex-wrap: wrap; gap: 18px; margin-top: 10px; }
.pair > div { flex: 1 1 520px; min-width: 0; overflow-x: auto; }
.pair.stacked > div { flex-basis: 100%; }
.test-content { margin: 4px 0 6px; }
table.test-content th { background: none; color: #4a5561; font-weight: 600; border: 0; }
figure { margin: 10px 0 20px; }
figure img { max-width: 100%; height: auto; border: 1px solid #e3e7ec; }
figcaption { color: #4a5561; font-size: 13.5px; margin-top: 4px; }
footer { margin-top: 40px; color: #7a8591; font-size: 12.5px; }
"""


def _facts(items: list[tuple[str, str]]) -> str:
    rows = "".join(f"<tr><th>{esc(k)}</th><td>{esc(v)}</td></tr>" for k, v in items if v not in ("", None))
    return f'<table class="facts"><tbody>{rows}</tbody></table>'


def _computed_with(d: dict, summary: dict, self_count: tuple[int, int] | None) -> list[tuple[str, str]]:
    shape = d.get("shape") or []
    params = dict(d.get("parameters") or {})
    if d.get("regularization") is not None:
        params.setdefault("regularization", d["regularization"])
    completion = d.get("completion") or {}
    inf = completion.get("influences", {"done": 0, "total": 0})
    status = "complete" if d.get("complete") else "INCOMPLETE"
    blocks = (
        f"test {len(d.get('test_block_sizes') or [])} blocks of {(d.get('test_block_sizes') or ['?'])[0]:,}, "
        f"train {len(d.get('train_block_sizes') or [])} blocks of {(d.get('train_block_sizes') or ['?'])[0]:,}"
        if d.get("test_block_sizes") and d.get("train_block_sizes")
        else ""
    )
    fit = d.get("fit") or {}
    solver = d.get("solver_info") or {}
    items = [
        ("Store", d.get("store", "")),
        ("Status", f"{status}: {inf['done']:,} of {inf['total']:,} chunks computed"),
        ("Method", str(d.get("method") or "unknown")),
        ("Parameters", ", ".join(f"{k}={_fmt(v)}" for k, v in sorted(params.items()))),
        ("Mode", f"{d.get('mode')} (influence[i, j] > 0: training point j helps test point i)"),
        ("dtype", str(d.get("dtype") or "")),
        ("Model parameters", f"{d['num_params']:,}" if isinstance(d.get("num_params"), int) else ""),
        ("Shape", f"{shape[0]:,} test x {shape[1]:,} training points" if len(shape) >= 2 else ""),
        ("Blocks", blocks),
        ("Completion", "; ".join(f"{k} {v['done']:,}/{v['total']:,}" for k, v in completion.items())),
        (
            "Influences",
            (
                f"min {summary['min']:.4g}, max {summary['max']:.4g}, mean {summary['mean']:.4g}, "
                f"positive {summary['fraction_positive']:.1%} of {summary['values']:,} computed values"
            )
            if summary["values"]
            else "none computed yet",
        ),
        (
            "Self-influences",
            f"{self_count[0]:,} of {self_count[1]:,} training points computed"
            if self_count
            else "not stored (set [output] self_influences = true)",
        ),
        ("Stored top-k", str(d["top_k"]) if d.get("top_k") else ""),
        (
            "Fit",
            f"generation {fit.get('generation')} ({fit.get('reason')}, since {fit.get('since')})"
            if fit.get("generation", 1) > 1
            else "",
        ),
        (
            "Solver",
            f"{solver.get('measure')} at most {solver.get('max_relative_residual', float('nan')):.3g} "
            f"(tolerance {solver.get('tolerance')}), {solver.get('not_converged')} test point(s) above it"
            if solver.get("blocks_recorded")
            else "",
        ),
        ("Created", str(d.get("created") or "")),
        ("Completed", str(d.get("completed") or "")),
        ("Written by", ", ".join(f"{k} {v}" for k, v in (d.get("versions") or {}).items())),
    ]
    return items


def write_report(
    store: str,
    out: str,
    *,
    show: Callable[[int], Any] | None = None,
    show_test: Callable[[int], Any] | None = None,
    n_test: int = 10,
    k: int = 5,
    n_suspects: int = 20,
    title: str | None = None,
    source: str | None = None,
) -> dict[str, Any]:
    """Write the report of ``store`` to ``out`` (one HTML file); returns what it holds:
    ``test_points`` (indices listed), ``suspects`` (self-influence, highest first, or None),
    ``harmful`` (lowest mean influence first), ``bytes`` and ``show_errors`` (messages of
    ``show`` calls that raised).

    ``show(j)`` / ``show_test(i)`` render training point ``j`` / test point ``i``
    (:func:`content_html`; a dict gives one column per key).
    """
    from ..storage.read import describe, open_store, require_up_mode, top_of_row
    from .plot import histogram
    from .rank import self_influence

    group = open_store(store)
    require_up_mode(group, "report")
    d = describe(store, group, stats=False)
    n_rows, n_train = group["influences"].shape[:2]
    s = scan(group)
    if not s["summary"]["values"]:
        raise ValueError(f"No influences in {store!r} are computed yet; run the job with --resume.")
    selfs = self_influence(group, "report") if "self_influences" in group else None
    shower, test_shower = Shower(show, "show"), Shower(show_test, "show_test")
    name = os.path.basename(os.path.normpath(store)) or store
    page_title = title or f"Influence report: {name}"
    mean = s["mean"]

    def sorted_by(values: np.ndarray, highest: bool, n: int) -> list[tuple[int, float]]:
        seen = np.flatnonzero(np.isfinite(values))
        order = seen[np.argsort(-values[seen] if highest else values[seen], kind="stable")][:n]
        return [(int(j), float(values[j])) for j in order]

    suspects = sorted_by(selfs, True, n_suspects) if selfs is not None else None
    harmful = sorted_by(mean, False, n_suspects)
    tests = interesting_tests(s["row_absmax"], n_test)

    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{esc(page_title)}</title><style>{CSS}</style></head><body><main>",
        f"<h1>{esc(page_title)}</h1>",
        f'<p class="lead">{n_rows:,} test points x {n_train:,} training points, {esc(d.get("method"))}. '
        "Positive influence means <b>helpful</b>: removing the training point would raise the loss on the test "
        "point; negative means harmful. Mislabeled training points show best by their <b>self-influence</b> "
        "(the suspects below), not by their mean influence.</p>",
    ]
    if not d.get("complete"):
        parts.append(
            '<p class="warn">This store is incomplete: everything below covers the computed chunks only. '
            "Run the job again with --resume to complete it.</p>"
        )
    if show is None:
        parts.append(
            '<p class="note">Training points are shown by index only: pass the job file '
            "(<code>--job JOB.toml</code>) whose factory returns <code>show(index)</code> to see them.</p>"
        )
    nav = ['<a href="#suspects">Suspects</a>'] if suspects is not None else []
    nav += ['<a href="#tests">Test points</a>', '<a href="#harmful">Most harmful</a>']
    nav += ['<a href="#distributions">Distributions</a>', '<a href="#computed">Computed with</a>']
    parts.append(f"<nav>{''.join(nav)}</nav>")
    # the sections, in the order they are read: suspects, test points, harmful, plots, provenance
    computed: list[str] = []
    suspects_part: list[str] = []
    harmful_part: list[str] = []
    plots: list[str] = []
    tests_part: list[str] = []

    self_count = None
    if selfs is not None:
        self_count = (int(np.isfinite(selfs).sum()), n_train)
    computed.append('<h2 id="computed">Computed with</h2>')
    computed.append(_facts(_computed_with(d, s["summary"], self_count)))

    mean_col = {"mean influence": mean}
    if suspects is not None:
        suspects_part.append('<h2 id="suspects">Suspects: highest self-influence</h2>')
        suspects_part.append(
            '<p class="note">Self-influence grad L(z)<sup>T</sup> H<sup>-1</sup> grad L(z): how much the model had to '
            "bend to fit the point. Mislabeled and corrupted points tend to have high values (measured on "
            "examples/transformers: AUC 0.87 for its flipped labels, against 0.14 by mean influence). "
            f"The {len(suspects)} highest of {self_count[0] if self_count else 0:,}.</p>"
        )
        suspects_part.append(ranking_table(suspects, shower, kind="suspects", score=SELF, extra=mean_col))
    harmful_part.append('<h2 id="harmful">Most harmful on average: lowest mean influence</h2>')
    harmful_part.append(
        f'<p class="note">Mean over the test points of each training point\'s influence; the {len(harmful)} lowest. '
        "Points that hurt many test predictions; not necessarily mislabeled.</p>"
    )
    extra = {SELF: selfs} if selfs is not None else None
    harmful_part.append(ranking_table(harmful, shower, kind="harmful-mean", score="mean influence", extra=extra))

    plots.append('<h2 id="distributions">Distributions</h2>')
    marked = np.array([j for j, _ in suspects], dtype=np.int64) if suspects else None
    uri = _figure_uri(
        lambda f: histogram(
            mean,
            f,
            suspects=marked,
            title=f"{name}: mean influence per training point",
            dpi=100,
        )
    )
    caption = "Mean influence of each training point over the test points (log count axis)"
    caption += "; the listed self-influence suspects in red." if marked is not None else "."
    plots.append(f'<figure><img src="{uri}" alt="histogram of mean influence"><figcaption>{caption}</figcaption>')
    plots.append("</figure>")
    if selfs is not None and marked is not None:
        assert selfs is not None
        uri = _figure_uri(
            lambda f: histogram(
                selfs, f, suspects=marked, title=f"{name}: self-influence per training point", by="self", dpi=100
            )
        )
        plots.append(
            f'<figure><img src="{uri}" alt="histogram of self-influence"><figcaption>Self-influence of each '
            "training point; the listed suspects in red.</figcaption></figure>"
        )
        uri = _figure_uri(lambda f: _scatter(mean, selfs, marked, f))
        plots.append(
            f'<figure><img src="{uri}" alt="mean influence against self-influence"><figcaption>Each training '
            "point's mean influence against its self-influence.</figcaption></figure>"
        )

    tests_part.append('<h2 id="tests">Test points</h2>')
    tests_part.append(
        f'<p class="note">The {len(tests)} test point(s) of {n_rows:,} with the largest |influence| to any training '
        f"point (usually the ones the model gets wrong), each with its {k} most helpful and most harmful training "
        "points.</p>"
    )
    for i in tests:
        i = int(i)
        top = top_of_row(group, i, k)
        tests_part.append(f'<section class="test-point" id="test-{i}" data-test="{i}">')
        tests_part.append(f'<h3>Test point {i} <span class="note">largest |influence| {s["row_absmax"][i]:.4g}')
        tests_part.append(f" (from the {esc(top['source'])})</span></h3>")
        tests_part.append(_test_content(test_shower(i), i))
        if top["missing_train_blocks"]:
            tests_part.append(
                f'<p class="warn">{top["missing_train_blocks"]} train block(s) of this row are not computed yet.</p>'
            )
        tests_part.append('<div class="pair">' if show is None else '<div class="pair stacked">')
        for kind, label in (("helpful", "Most helpful"), ("harmful", "Most harmful")):
            tests_part.append(f"<div><h3>{label}</h3>")
            tests_part.append(ranking_table(top[kind], shower, kind=kind, score="influence", extra=extra))
            tests_part.append("</div>")
        tests_part.append("</div></section>")

    parts += suspects_part + tests_part + harmful_part + plots + computed

    errors = shower.errors + test_shower.errors
    if errors:
        parts.append(
            f'<p class="warn">{len(errors)} call(s) of show raised; the first: {esc(errors[0])}. '
            "Those cells show the error.</p>"
        )
    now = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    from .. import __version__

    made = f"dask-influence {__version__} report, {now}" + (f", from {source}" if source else "")
    parts.append(f"<footer>{esc(made)}</footer></main></body></html>")
    text = "\n".join(parts) + "\n"
    with open(out, "w", encoding="utf-8") as f:
        f.write(text)
    return {
        "test_points": [int(i) for i in tests],
        "suspects": suspects,
        "harmful": harmful,
        "bytes": len(text.encode("utf-8")),
        "show_errors": errors,
    }


def _factory_show(job_file: str, n_train: int, n_test: int) -> tuple[Any, Any]:
    """Call the job's factory once; its ``show`` and ``show_test`` (None where absent).

    Raises ``ValueError`` when the factory's datasets do not have the store's sizes (another job)."""
    from ..jobfile import load_factory, load_job

    job = load_job(job_file)
    if job.model is None:
        raise ValueError(f"the job file {job_file!r} has no [model] factory; pass the job file that wrote the store.")
    result = load_factory(job)(**job.model.options)

    def part(key: str) -> Any:
        return result.get(key) if isinstance(result, Mapping) else getattr(result, key, None)

    for key, n in (("train", n_train), ("test", n_test)):
        data = part(key)
        if data is not None and hasattr(data, "__len__") and len(data) != n:
            raise ValueError(
                f"the factory of {job_file!r} returns {len(data):,} {key} points but the store has {n:,}; pass the "
                "job file that wrote the store (with the same [model] options)."
            )
    show, show_test = part("show"), part("show_test")
    for key, fn in (("show", show), ("show_test", show_test)):
        if fn is not None and not callable(fn):
            raise TypeError(
                f"the factory of {job_file!r} returns {key} of type {type(fn).__name__}; return a function "
                f"{key}(index) -> str | image | dict."
            )
    return show, show_test


@click.command()
@click.argument("store", metavar="STORE")
@click.option("-o", "--output", "out", required=True, metavar="FILE.html", help="The HTML file to write.")
@click.option(
    "--job",
    "job_file",
    metavar="JOB.toml",
    default=None,
    help="The job file that wrote STORE: its factory's show(index) (and show_test) render the points "
    "(text, images, table rows). Without it the report shows indices only.",
)
@click.option(
    "-n",
    "n_test",
    type=click.IntRange(1),
    default=10,
    show_default=True,
    help="How many test points: those with the largest |influence| to any training point.",
)
@click.option(
    "-k", "k", type=click.IntRange(1), default=5, show_default=True, help="Helpful and harmful per test point."
)
@click.option(
    "--suspects",
    "n_suspects",
    type=click.IntRange(1),
    default=20,
    show_default=True,
    help="How many training points to list by self-influence and by mean influence.",
)
@click.option("--title", default=None, help="Title of the page.")
@TRACEBACK
def report(
    store: str,
    out: str,
    job_file: str | None,
    n_test: int,
    k: int,
    n_suspects: int,
    title: str | None,
    traceback: bool,
) -> None:
    """Write a static HTML report of STORE that a person reads: per test point the most helpful
    and harmful training points (their content through the job's show function with --job),
    the self-influence suspects, the distributions and what the store was computed with.

    One file (no server, no script, images inline) that opens in any browser.
    """
    from ..storage.read import open_store
    from .run import one_line, user_errors

    start = time.perf_counter()
    show = show_test = None
    with user_errors(traceback):
        group = open_store(store)
        rows, cols = group["influences"].shape[:2]
        if job_file is not None:
            click.echo(f"Calling the factory of {job_file} for show()...", err=True)
            show, show_test = _factory_show(job_file, cols, rows)
            if show is None:
                click.echo(
                    f"Note: the factory of {job_file} returns no `show`; training points are shown by index. Return "
                    "show(index) -> str | image | dict from it to see them.",
                    err=True,
                )
        try:
            done = write_report(
                store,
                out,
                show=show,
                show_test=show_test,
                n_test=n_test,
                k=k,
                n_suspects=n_suspects,
                title=title,
                source=job_file,
            )
        except ImportError as exc:
            raise click.ClickException(f"{one_line(exc)} (the report's plots need matplotlib and Pillow)") from None
    for message in done["show_errors"][:3]:
        click.echo(f"Warning: {message}", err=True)
    suspects = (
        f"{len(done['suspects'])} self-influence suspects"
        if done["suspects"] is not None
        else "no self-influences in the store"
    )
    click.echo(
        f"Wrote {out} ({done['bytes'] / 1024:,.0f} KiB) in {time.perf_counter() - start:.1f} s: "
        f"{len(done['test_points'])} test points with their {k} most helpful and harmful training points, {suspects}."
    )
    sys.stdout.flush()
