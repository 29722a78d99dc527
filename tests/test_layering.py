"""The layering rules of docs/architecture.md, checked on the source: no import circle in
any package (nor across them), ``core/`` imports nothing of the mapping, storage, CLI or
job-file layers, nor Dask, zarr or fsspec; ``storage/`` imports no layer above it; ``mapping/``
imports neither the index, the evaluation, the job layer nor the CLI; ``job/`` never imports
the CLI. Imports inside functions count (a lazy import still ties the modules); imports under
``if TYPE_CHECKING:`` do not."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "dask_influence"


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in PACKAGE.rglob("*.py")}


def imports(name: str) -> set[str]:
    """Every module ``name`` imports (absolute names), outside ``if TYPE_CHECKING:`` blocks."""
    path = MODULES[name]
    tree = ast.parse(path.read_text(encoding="utf-8"))
    skipped = {
        id(node)
        for block in ast.walk(tree)
        if isinstance(block, ast.If) and "TYPE_CHECKING" in ast.dump(block.test)
        for node in ast.walk(block)
    }
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = package
            for _ in range(max(node.level - 1, 0)):
                base = base.rpartition(".")[0]
            target = (f"{base}.{node.module}" if node.module else base) if node.level else node.module or ""
            if node.module or not node.level:
                found.add(target)
            found.update(f"{target}.{alias.name}" for alias in node.names if f"{target}.{alias.name}" in MODULES)
    return found


def cycles(scope: str) -> list[list[str]]:
    """The import circles (strongly connected components of more than one module) within ``scope``."""
    graph = {
        m: {t for t in imports(m) if t in MODULES and t.startswith(scope) and t != m}
        for m in MODULES
        if m.startswith(scope)
    }
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in graph:
        if v not in index:
            visit(v)
    return found


def test_no_import_circle_in_core():
    assert cycles("dask_influence.core") == []


def test_core_imports_no_outer_layer_nor_dask_zarr_or_fsspec():
    outer = (
        "dask_influence.mapping",
        "dask_influence.storage",
        "dask_influence.cli",
        "dask_influence.jobfile",
        "dask_influence.index",
        "dask_influence.evaluate",
        "dask",
        "distributed",
        "zarr",
        "fsspec",
    )
    offending = {
        name: sorted(t for t in imports(name) if any(t == o or t.startswith(o + ".") for o in outer))
        for name in MODULES
        if name.startswith("dask_influence.core")
    }
    assert {k: v for k, v in offending.items() if v} == {}


PACKAGES = sorted({m for m in MODULES if m.count(".") == 1 and MODULES[m].name == "__init__.py"})


def test_no_import_circle_in_any_package_nor_across_them():
    assert len(PACKAGES) >= 7  # core, mapping, storage, index, evaluate, job, cli
    assert {package: cycles(package) for package in PACKAGES} == dict.fromkeys(PACKAGES, [])
    assert cycles("dask_influence") == []


def test_the_circle_finder_finds_a_two_module_circle(tmp_path, monkeypatch):
    """The check above would catch the circles it was written against (storage's
    factors <-> layout, completion <-> fits, index_info <-> index_verify)."""
    package = tmp_path / "dask_influence" / "storage"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "a.py").write_text("def f():\n    from .b import g\n")
    (package / "b.py").write_text("from .a import f\n")
    this = sys.modules[__name__]
    monkeypatch.setattr(this, "PACKAGE", tmp_path / "dask_influence")
    monkeypatch.setattr(this, "MODULES", {module_name(p): p for p in (tmp_path / "dask_influence").rglob("*.py")})
    assert cycles("dask_influence.storage") == [["dask_influence.storage.a", "dask_influence.storage.b"]]


def _offending(layer: str, forbidden: tuple[str, ...]) -> dict[str, list[str]]:
    """The modules of ``layer`` that import a module of ``forbidden``, and what they import."""
    prefixes = tuple(f"dask_influence.{name}" for name in forbidden)
    found = {
        name: sorted(t for t in imports(name) if any(t == p or t.startswith(p + ".") for p in prefixes))
        for name in MODULES
        if name == f"dask_influence.{layer}" or name.startswith(f"dask_influence.{layer}.")
    }
    return {k: v for k, v in found.items() if v}


def test_storage_imports_no_layer_above_it():
    assert _offending("storage", ("core", "mapping", "index", "evaluate", "job", "jobfile", "cli")) == {}


def test_mapping_imports_neither_index_evaluate_job_nor_cli():
    assert _offending("mapping", ("index", "evaluate", "job", "jobfile", "cli")) == {}


def test_job_layer_never_imports_the_cli():
    assert _offending("job", ("cli",)) == {}
    assert _offending("jobfile", ("cli",)) == {}
