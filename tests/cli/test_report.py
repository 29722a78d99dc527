"""`dask-influence report`: the page's rows against the store, the content `show` renders,
escaping, self-containment; and the page as a real headless Chromium renders it.

The store is written by `dask-influence run` on a job whose factory returns 8x8 digit images
(scikit-learn's digits, a few labels flipped) and a `show` chosen by the factory's options:
a dict row with an image, a text with HTML in it, a PIL image, or one that raises.
"""

from __future__ import annotations

import base64
import io
import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
import zarr
from PIL import Image

from jobs import invoke

N_TRAIN, N_TEST, FLIPPED = 120, 12, (4, 17, 33, 60, 91)
HOSTILE = "<script>alert('x')</script> & \"quoted\""

FACTORY = '''
"""A logistic regression on 8x8 digits; `show` as the option asks."""
import numpy as np
import torch
from PIL import Image
from sklearn.datasets import load_digits
from torch.utils.data import TensorDataset

FLIPPED = {flipped}
HOSTILE = {hostile!r}


def make_problem(show="dict", n_train={n_train}, n_test={n_test}):
    digits = load_digits()
    x = torch.tensor(digits.data[: n_train + n_test] / 16.0, dtype=torch.float64)
    y = torch.tensor(digits.target[: n_train + n_test], dtype=torch.long)
    y[list(FLIPPED)] = (y[list(FLIPPED)] + 1) % 10
    torch.manual_seed(0)
    model = torch.nn.Linear(64, 10).double()
    loss = torch.nn.CrossEntropyLoss()
    optimizer = torch.optim.LBFGS(model.parameters(), max_iter=100)

    def closure():
        optimizer.zero_grad()
        value = loss(model(x[:n_train]), y[:n_train]) + 1e-3 * model.weight.square().sum()
        value.backward()
        return value

    optimizer.step(closure)
    model.eval()
    images = digits.images[: n_train + n_test] / 16.0  # (n, 8, 8) in [0, 1]

    def as_dict(i):
        return {{"image": images[i], "label": int(y[i]), "note": HOSTILE if i == 0 else ""}}

    def as_text(i):
        return f"digit with label {{int(y[i])}} " + HOSTILE

    def as_pil(i):
        return Image.fromarray((images[i] * 255).astype(np.uint8))

    def raising(i):
        if i % 2:
            raise KeyError(f"no row {{i}}")
        return "fine"

    shows = {{"dict": as_dict, "text": as_text, "pil": as_pil, "raise": raising, "none": None}}
    out = {{
        "model": model,
        "loss": loss,
        "train": TensorDataset(x[:n_train], y[:n_train]),
        "test": TensorDataset(x[n_train:], y[n_train:]),
    }}
    if shows[show] is not None:
        out["show"] = shows[show]
        out["show_test"] = lambda i: {{"image": images[n_train + i], "label": int(y[n_train + i])}}
    return out
'''

JOB = """
[model]
factory = "factory:make_problem"
options = {{ show = "{show}"{extra} }}

[solver]
method = "direct"
regularization = 1e-3

[blocks]
test = 5
train = 50

[output]
store = "{store}"
top_k = 3
self_influences = {self_influences}

[cluster]
sequential = true
"""


def write_job(root: Path, show: str, *, store: str = "digits.zarr", self_influences: bool = True, extra: str = ""):
    path = root / f"job_{show}{extra and '_other'}.toml"
    text = JOB.format(show=show, store=store, self_influences=str(self_influences).lower(), extra=extra)
    path.write_text(text)
    return path


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """A complete store of the digits job (self-influences, top-3), and one without self-influences."""
    root = tmp_path_factory.mktemp("report")
    (root / "factory.py").write_text(
        FACTORY.format(flipped=set(FLIPPED), hostile=HOSTILE, n_train=N_TRAIN, n_test=N_TEST)
    )
    for show in ("dict", "text", "pil", "raise", "none"):
        write_job(root, show)
    result = invoke("run", root / "job_dict.toml", "--quiet")
    assert result.exit_code == 0, result.output
    result = invoke("run", write_job(root, "none", store="plain.zarr", self_influences=False), "--quiet")
    assert result.exit_code == 0, result.output
    write_job(root, "none")  # back to the store with self-influences
    group = zarr.open_group(str(root / "digits.zarr"), mode="r")
    return {
        "root": root,
        "path": root / "digits.zarr",
        "influences": group["influences"][...].astype(np.float64),
        "self": group["self_influences"][...].astype(np.float64),
    }


class Page(HTMLParser):
    """What a report page holds: the test sections, each table's rows (data-index, data-value)
    with their cells' text, the images' sources, and the elements used."""

    def __init__(self, text: str) -> None:
        super().__init__()
        self.tests: list[int] = []
        self.tables: list[dict] = []  # {"kind", "test", "head", "rows": [(index, value, [cell texts])]}
        self.images: list[dict] = []
        self.tags: set[str] = set()
        self._test: int | None = None
        self._cell: list[str] | None = None
        self._head = False
        self._ranking = False  # inside a ranking table (not the test point's own content table)
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        self.tags.add(tag)
        if tag == "section" and "data-test" in a:
            self._test = int(a["data-test"])
            self.tests.append(self._test)
        elif tag == "table" and "ranking" in a.get("class", ""):
            kind = a["class"].split()[1]
            self.tables.append({"kind": kind, "test": self._test if kind in ("helpful", "harmful") else None})
            self.tables[-1].update(head=[], rows=[])
            self._ranking = True
        elif not self._ranking:
            pass
        elif tag == "thead":
            self._head = True
        elif tag == "tr" and "data-index" in a:
            self.tables[-1]["rows"].append((int(a["data-index"]), float(a["data-value"]), []))
        elif tag in ("td", "th"):
            self._cell = []
        if tag == "img":
            self.images.append(a)
            if self._cell is not None:
                self._cell.append("[img]")

    def handle_endtag(self, tag):
        if tag == "table":
            self._ranking = False
        elif not self._ranking:
            pass
        elif tag == "thead":
            self._head = False
        elif tag in ("td", "th") and self._cell is not None:
            text = "".join(self._cell).strip()
            if self._head and self.tables and tag == "th":
                self.tables[-1]["head"].append(text)
            elif tag == "td" and self.tables and self.tables[-1]["rows"]:
                self.tables[-1]["rows"][-1][2].append(text)
            self._cell = None

    def handle_data(self, data):
        if self._cell is not None:
            self._cell.append(data)

    def table(self, kind, test=None):
        found = [t for t in self.tables if t["kind"] == kind and t["test"] == test]
        assert len(found) == 1, (kind, test, [(t["kind"], t["test"]) for t in self.tables])
        return found[0]


def expected_rows(store, n_test=10, k=5, n_suspects=20):
    """What the page must list, from the store's arrays by numpy alone."""
    values, selfs = store["influences"], store["self"]
    tests = np.argsort(-np.abs(values).max(axis=1), kind="stable")[:n_test]
    return {
        "tests": tests.tolist(),
        "helpful": {int(i): np.argsort(-values[i], kind="stable")[:k].tolist() for i in tests},
        "harmful": {int(i): np.argsort(values[i], kind="stable")[:k].tolist() for i in tests},
        "suspects": np.argsort(-selfs, kind="stable")[:n_suspects].tolist(),
        "harmful-mean": np.argsort(values.mean(axis=0), kind="stable")[:n_suspects].tolist(),
    }


def make_report(store, *args):
    out = store["root"] / f"report_{abs(hash(args))}.html"
    result = invoke("report", store["path"], "-o", out, *args)
    assert result.exit_code == 0, result.output
    return out.read_text(encoding="utf-8"), result


def test_report_rows_equal_the_store_and_show_renders_dict_rows_with_images(store):
    text, result = make_report(store, "--job", store["root"] / "job_dict.toml", "-n", 4, "-k", 3, "--suspects", 6)
    expected = expected_rows(store, n_test=4, k=3, n_suspects=6)
    assert result.stdout.strip().startswith(f"Wrote {store['root']}/report_")
    assert result.stdout.strip().endswith(
        "4 test points with their 3 most helpful and harmful training points, 6 self-influence suspects."
    )
    page = Page(text)
    assert page.tests == expected["tests"]
    values = store["influences"]
    for i in expected["tests"]:
        for kind in ("helpful", "harmful"):
            rows = page.table(kind, i)["rows"]
            assert [r[0] for r in rows] == expected[kind][i]
            np.testing.assert_allclose([r[1] for r in rows], values[i, expected[kind][i]], rtol=1e-6)
    suspects = page.table("suspects")
    assert [r[0] for r in suspects["rows"]] == expected["suspects"]
    np.testing.assert_allclose([r[1] for r in suspects["rows"]], store["self"][expected["suspects"]], rtol=1e-6)
    assert [r[0] for r in page.table("harmful-mean")["rows"]] == expected["harmful-mean"]
    # dict rows: one column per key, the image as a thumbnail of the digit itself
    assert suspects["head"] == ["rank", "index", "self-influence", "mean influence", "image", "label", "note"]
    first = suspects["rows"][0]
    assert first[2][4] == "[img]"
    digits = __import__("sklearn.datasets", fromlist=["load_digits"]).load_digits()
    label = (digits.target[first[0]] + (1 if first[0] in FLIPPED else 0)) % 10
    assert first[2][5] == str(label)
    thumbs = [img for img in page.images if img.get("class") == "thumb"]
    alt = f"image of training point {first[0]}"
    src = next(img["src"] for img in thumbs if img["alt"] == alt)
    with Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1]))) as image:
        pixels = np.asarray(image)
    np.testing.assert_array_equal(pixels, np.round(digits.images[first[0]] / 16.0 * 255).astype(np.uint8))
    # the test point's own content (show_test), and what the store was computed with
    assert f'<section class="test-point" id="test-{expected["tests"][0]}"' in text
    assert any(img["alt"] == f"image of test point {expected['tests'][0]}" for img in page.images)
    assert "<th>Method</th><td>DirectInfluence</td>" in text
    assert "<th>Shape</th><td>12 test x 120 training points</td>" in text
    assert "<th>Status</th><td>complete: 9 of 9 chunks computed</td>" in text
    assert "<th>Self-influences</th><td>120 of 120 training points computed</td>" in text
    assert "<th>Parameters</th><td>" in text and "regularization=0.001" in text


def test_report_escapes_every_text_and_is_one_self_contained_file(store):
    title = 'Digits <b>report</b> & "friends"'
    text, _ = make_report(store, "--job", store["root"] / "job_text.toml", "--title", title, "-n", 2)
    assert "<script" not in text and "alert('x')" not in text
    assert "&lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt; &amp; &quot;quoted&quot;" in text
    assert "<title>Digits &lt;b&gt;report&lt;/b&gt; &amp; &quot;friends&quot;</title>" in text
    page = Page(text)
    assert page.table("suspects")["head"][-1] == "content"
    cells = [r[2][-1] for r in page.table("suspects")["rows"]]
    assert all(c.startswith("digit with label ") and c.endswith(HOSTILE) for c in cells)
    # self-contained: no reference outside the file, every image inline PNG, no script or link
    assert "http://" not in text and "https://" not in text
    assert not page.tags & {"script", "link", "iframe", "object", "embed"}
    assert not re.search(r"\b(src|href)=\"(?!data:image/png;base64,|#)", text)
    assert len(page.images) >= 3  # the three distributions at least
    for img in page.images:
        with Image.open(io.BytesIO(base64.b64decode(img["src"].split(",", 1)[1]))) as image:
            assert image.format == "PNG" and min(image.size) > 0


def test_report_renders_pil_images_and_without_a_job_indices_only(store):
    text, _ = make_report(store, "--job", store["root"] / "job_pil.toml", "-n", 1)
    cells = [r[2][-1] for r in Page(text).table("suspects")["rows"]]
    assert cells == ["[img]"] * 20
    text, result = make_report(store, "-n", 1)
    page = Page(text)
    assert page.table("suspects")["head"] == ["rank", "index", "self-influence", "mean influence"]
    assert "Training points are shown by index only: pass the job file" in text
    assert not [img for img in page.images if img.get("class") == "thumb"]
    text, result = make_report(store, "--job", store["root"] / "job_none.toml", "-n", 1)
    assert (
        "Note: the factory of " + str(store["root"] / "job_none.toml") + " returns no `show`; training points are "
        "shown by index. Return show(index) -> str | image | dict from it to see them."
    ) in result.stderr


def test_a_show_that_raises_is_shown_in_its_cells_and_warned(store):
    text, result = make_report(store, "--job", store["root"] / "job_raise.toml", "-n", 1)
    rows = Page(text).table("suspects")["rows"]
    for index, _, cells in rows:
        assert cells[-1] == ("fine" if index % 2 == 0 else f"show({index}) raised KeyError: 'no row {index}'")
    odd = next(index for index, _, _ in rows if index % 2)
    assert f"Warning: show({odd}) raised KeyError: 'no row {odd}'" in result.stderr
    assert "call(s) of show raised; the first: show(" in text


def test_report_without_self_influences_and_refusals(store, tmp_path):
    plain = store["root"] / "plain.zarr"
    result = invoke("report", plain, "-o", tmp_path / "plain.html")
    assert result.exit_code == 0, result.output
    assert result.stdout.strip().endswith("no self-influences in the store.")
    text = (tmp_path / "plain.html").read_text()
    page = Page(text)
    assert not [t for t in page.tables if t["kind"] == "suspects"]
    assert "<th>Self-influences</th><td>not stored (set [output] self_influences = true)</td>" in text
    mean = zarr.open_group(str(plain), mode="r")["influences"][...].astype(np.float64).mean(axis=0)
    assert [r[0] for r in page.table("harmful-mean")["rows"]] == np.argsort(mean, kind="stable")[:20].tolist()

    other = write_job(store["root"], "dict", extra=", n_train = 100")
    result = invoke("report", store["path"], "-o", tmp_path / "x.html", "--job", other)
    assert result.exit_code == 1
    assert result.output.strip().splitlines()[-1] == (
        f"Error: the factory of {str(other)!r} returns 100 train points but the store has 120; pass the job file "
        "that wrote the store (with the same [model] options)."
    )
    assert not (tmp_path / "x.html").exists()
    result = invoke("report", tmp_path / "missing.zarr", "-o", tmp_path / "x.html")
    assert result.exit_code == 1
    assert "No store at" in result.output and "pass the path of a zarr store" in result.output


def test_report_of_an_incomplete_store_lists_the_computed_chunks_only(store, tmp_path):
    copy = tmp_path / "incomplete.zarr"
    shutil.copytree(store["path"], copy)
    group = zarr.open_group(str(copy), mode="r+")
    group["influences_done"][1, 0] = 0  # test rows 5..9 x train columns 0..49 not done
    group["topk_done"][1] = 0
    group["self_influences_done"][0] = 0  # self-influences of 0..49 not done
    values = store["influences"].copy()
    values[5:10, :50] = np.nan
    out = tmp_path / "incomplete.html"
    result = invoke("report", copy, "-o", out, "-n", N_TEST, "-k", 3, "--suspects", 5)
    assert result.exit_code == 0, result.output
    text = out.read_text()
    assert "This store is incomplete: everything below covers the computed chunks only." in text
    assert "<th>Status</th><td>INCOMPLETE: 8 of 9 chunks computed</td>" in text
    assert "<th>Self-influences</th><td>70 of 120 training points computed</td>" in text
    page = Page(text)
    absmax = np.nanmax(np.abs(values), axis=1)
    assert page.tests == np.argsort(-absmax, kind="stable").tolist()
    for i in (5, 9, 0):
        row = np.where(np.isnan(values[i]), -np.inf, values[i])
        assert [r[0] for r in page.table("helpful", i)["rows"]] == np.argsort(-row, kind="stable")[:3].tolist()
    assert text.count("1 train block(s) of this row are not computed yet.") == 5
    selfs = store["self"].copy()
    selfs[:50] = -np.inf
    assert [r[0] for r in page.table("suspects")["rows"]] == np.argsort(-selfs, kind="stable")[:5].tolist()


def _chromium() -> str | None:
    return next((shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome") if shutil.which(n)), None)


@pytest.mark.subprocess
@pytest.mark.skipif(_chromium() is None, reason="no chromium binary (apt-get install chromium)")
def test_the_report_in_headless_chromium(store, tmp_path):
    text, _ = make_report(store, "--job", store["root"] / "job_dict.toml", "-n", 3, "-k", 3, "--suspects", 6)
    page_path = tmp_path / "report.html"
    page_path.write_text(text, encoding="utf-8")
    browser = [
        _chromium(),
        "--headless",
        "--no-sandbox",  # root in a container
        "--disable-gpu",
        "--hide-scrollbars",
        f"--user-data-dir={tmp_path / 'profile'}",
    ]
    shot = tmp_path / "shot.png"
    run = subprocess.run(
        [*browser, f"--screenshot={shot}", "--window-size=1200,4200", page_path.as_uri()],
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert run.returncode == 0 and shot.exists(), run.stderr[-2000:]
    with Image.open(shot) as image:
        assert image.size == (1200, 4200)
        pixels = np.asarray(image.convert("RGB")).astype(int)
    flat = pixels.reshape(-1, 3)
    not_white = (flat.min(axis=1) < 235).mean()
    assert 0.03 < not_white < 0.6, not_white  # text, tables and plots on a white page
    dark = (flat.max(axis=1) < 90).sum()  # the text
    assert dark > 5000
    blue = (np.abs(flat - [103, 135, 188]).sum(axis=1) < 12).sum()  # the histograms' bars: the inline PNGs drew
    assert blue > 2000
    heading = pixels[10:60, 30:500]  # the title, dark on white, at the top left
    assert (heading.max(axis=2) < 90).sum() > 500

    dom = subprocess.run([*browser, "--dump-dom", page_path.as_uri()], capture_output=True, text=True, timeout=180)
    assert dom.returncode == 0, dom.stderr[-2000:]
    page = Page(dom.stdout)
    expected = expected_rows(store, n_test=3, k=3, n_suspects=6)
    assert page.tests == expected["tests"]
    for i in expected["tests"]:
        assert [r[0] for r in page.table("helpful", i)["rows"]] == expected["helpful"][i]
        assert [r[0] for r in page.table("harmful", i)["rows"]] == expected["harmful"][i]
    assert [r[0] for r in page.table("suspects")["rows"]] == expected["suspects"]
    assert "Influence report: digits.zarr" in dom.stdout
