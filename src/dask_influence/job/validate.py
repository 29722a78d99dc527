"""Reading and validating a job file: every problem found at once, one line each, with its
section and, for an unknown key, the closest valid one (``did you mean``). Pure: no click, no
cluster, no import of the user's code (that is :mod:`.factory`)."""

from __future__ import annotations

import dataclasses
import difflib
import os
import sys
import types
import typing
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..core.solvers.registry import load_plugins, solver_class
from ..errors import JobFileError
from ..mapping.security import JOB_SOURCE, TlsFiles
from .paths import resolve_path
from .sections import (
    _FACTORY,
    _REQUIRED_HINTS,
    EVALUATE_METHODS,
    LOCAL_KEYS,
    MODES,
    RENAMED_KEYS,
    REQUIRED_SECTIONS,
    SECTIONS,
    SOLVER_METHODS,
    TASK_NAMES,
    BlocksSection,
    ClusterSection,
    EvaluateSection,
    IndexSection,
    Job,
    ModelSection,
    OutputSection,
    SolverSection,
    TaskSection,
)

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib


def load_job(path: str | os.PathLike) -> Job:
    """Read and validate a job file.

    Relative paths in the file (``[model] path``, ``[output] store``) are relative to the
    file's directory.

    Raises:
        JobFileError: the file is missing, is not valid TOML, or breaks the schema; the
            message lists every problem, one per line.
    """
    path = Path(path)
    if not path.is_file():
        what = "is a directory" if path.is_dir() else "does not exist"
        raise JobFileError(f"the job file {str(path)!r} {what}; pass the path of a TOML job file.")
    try:
        with path.open("rb") as fh:
            data = tomllib.load(fh)
    except tomllib.TOMLDecodeError as exc:
        raise JobFileError(f"not valid TOML: {exc}", path=str(path)) from None
    except UnicodeDecodeError as exc:
        raise JobFileError(f"not valid TOML (not UTF-8 text): {exc}", path=str(path)) from None
    return parse_job(data, base_dir=path.resolve().parent, path=path)


def parse_job(
    data: Mapping[str, Any], *, base_dir: str | os.PathLike | None = None, path: str | os.PathLike | None = None
) -> Job:
    """Validate the parsed TOML ``data`` of a job file; see :func:`load_job`.

    Args:
        base_dir: directory that relative paths are resolved against (default: the
            current directory).
        path: the file the data came from, for messages.
    """
    base = Path(base_dir) if base_dir is not None else Path.cwd()
    problems: list[str] = []
    tables: dict[str, dict] = {}
    for key, value in data.items():
        if key in SECTIONS:
            if isinstance(value, Mapping):
                tables[key] = dict(value)
            else:
                problems.append(f"[{key}] must be a table (a [{key}] section); got {_describe(value)}.")
        else:
            problems.append(f"unknown section [{key}]{_suggest(key, SECTIONS, brackets=True)}")
    for name in REQUIRED_SECTIONS:
        if name == "solver" and "index" in data:
            continue  # an index job: `index` and `query` need no solver
        if name not in tables and name not in data:
            problems.append(f"[{name}] section is missing; {_REQUIRED_HINTS[name]}")

    model = _model(tables.get("model"), base, problems)
    task = _task(tables.get("task"), problems)
    solver = _solver(tables.get("solver"), base, problems)
    blocks = _blocks(tables.get("blocks", {}), problems)
    output = _output(tables.get("output"), base, problems)
    cluster = _cluster(tables.get("cluster", {}), problems, base)
    evaluate = _evaluate(tables.get("evaluate"), base, problems)
    index = _index(tables.get("index"), base, problems)
    if problems:
        raise JobFileError(problems, path=None if path is None else str(path))
    assert model and output  # for type checkers: no problems means all parsed
    return Job(
        model=model,
        solver=solver,
        output=output,
        blocks=blocks,
        cluster=cluster,
        path=None if path is None else Path(path),
        task=task,
        evaluate=evaluate,
        index=index,
    )


def _model(table: dict | None, base: Path, problems: list[str]) -> ModelSection | None:
    if table is None:
        return None
    _unknown("model", table, SECTIONS["model"], problems)
    factory = table.get("factory")
    ok = True
    if factory is None:
        problems.append('[model] factory is required: the Python factory as "module:function".')
        ok = False
    elif not isinstance(factory, str):
        problems.append(f'[model] factory must be a string "module:function"; got {_describe(factory)}.')
        ok = False
    elif not _FACTORY.match(factory.strip()):
        problems.append(f'[model] factory must be "module:function" (e.g. "factory:make_problem"); got {factory!r}.')
        ok = False
    paths: list[str] = []
    raw = table.get("path", ".")
    items = [raw] if isinstance(raw, str) else raw
    if not isinstance(items, list) or not all(isinstance(p, str) and p for p in items):
        problems.append(f"[model] path must be a directory or a list of directories; got {_describe(raw)}.")
        ok = False
    else:
        paths = [resolve_path(p, base) for p in items]
    options = table.get("options", {})
    if not isinstance(options, Mapping):
        problems.append(
            f"[model] options must be a table of keyword arguments for the factory; got {_describe(options)}."
        )
        ok = False
    if not ok:
        return None
    assert isinstance(factory, str)  # checked above
    return ModelSection(factory=factory.strip(), path=tuple(paths), options=dict(options))


def _task(table: dict | None, problems: list[str]) -> TaskSection | None:
    if table is None:
        return None
    _unknown("task", table, SECTIONS["task"], problems)
    name, factory, options = table.get("name"), table.get("factory"), table.get("options", {})
    n_before = len(problems)
    if (name is None) == (factory is None):
        problems.append(
            '[task] needs either name (a ready-made task: "' + '", "'.join(TASK_NAMES) + '") or '
            'factory ("module:function" returning a dask_influence.Task), not '
            + ("both." if name is not None else "neither.")
        )
    elif name is not None and name not in TASK_NAMES:
        problems.append(
            f"[task] name must be one of {', '.join(TASK_NAMES)}; got {name!r}{_suggest(str(name), TASK_NAMES)}"
        )
    elif factory is not None and (not isinstance(factory, str) or not _FACTORY.match(factory.strip())):
        problems.append(f'[task] factory must be "module:function" (e.g. "tasks:make_task"); got {_describe(factory)}.')
    if not isinstance(options, Mapping):
        problems.append(f"[task] options must be a table of keyword arguments; got {_describe(options)}.")
    if len(problems) != n_before:
        return None
    return TaskSection(name=name, factory=None if factory is None else factory.strip(), options=dict(options))


def _solver(table: dict | None, base: Path, problems: list[str]) -> SolverSection | None:
    if table is None:
        return None
    method = table.get("method")
    params = {k: v for k, v in table.items() if k != "method" and k not in FIT_KEYS}
    fit = _fit_keys(table, base, problems)
    if method is None:
        problems.append(f"[solver] method is required; one of {', '.join(SOLVER_METHODS)}.")
        return None
    if not isinstance(method, str):
        problems.append(
            f"[solver] method must be a string, one of {', '.join(SOLVER_METHODS)}; got {_describe(method)}."
        )
        return None
    key = method.strip().lower()
    if key not in SOLVER_METHODS:
        load_plugins()  # solvers of other installed packages (entry points)
    if key not in SOLVER_METHODS:
        close = difflib.get_close_matches(key, list(SOLVER_METHODS), n=1, cutoff=0.5)
        hint = f"; did you mean {close[0]!r}?" if close else "."
        problems.append(f"[solver] unknown method {method!r}; choose one of {', '.join(SOLVER_METHODS)}{hint}")
        return None
    renames = solver_class(key).config_class.renamed  # old spellings of its hyperparameters
    section = SolverSection(method=key, params=_renamed_keys("solver", params, problems, renames), **fit)
    n_before = len(problems)
    _check_solver_params(section, problems)
    return section if len(problems) == n_before else None


#: ``[solver]`` keys about the fit itself rather than the solver class (SolverSection's fields).
FIT_KEYS = tuple(k for k in SECTIONS["solver"] if k != "method")


def _fit_keys(table: dict, base: Path, problems: list[str]) -> dict[str, Any]:
    """``distributed_fit`` and ``fit_file`` of ``[solver]``, checked."""
    fit_table = {k: v for k, v in table.items() if k in FIT_KEYS}
    return _section("solver", fit_table, SolverSection, problems, {"fit_file": _path(base)}, skip=("method", "params"))


def solver_parameters(method: str) -> dict[str, Any]:
    """The keys a job file may give for ``method``: ``{name: type}`` of its configuration's fields."""
    return solver_class(method).config_class.types()


def _check_solver_params(section: SolverSection, problems: list[str]) -> None:
    """The keys, types and values of ``[solver]`` against the solver's configuration class."""
    n_before = len(problems)
    config_class = section.solver_class.config_class
    allowed = config_class.types()
    for name, value in section.params.items():
        if name not in allowed:
            problems.append(
                f"[solver] unknown key {name!r}"
                f"{_suggest(name, ['method', *allowed, *FIT_KEYS], what=f'keys for method {section.method!r}')}"
            )
            continue
        problem = _check_type(value, allowed[name])
        if problem:
            problems.append(f"[solver] {name} {problem}; got {_describe(value)}.")
    for name in config_class.required():
        if name not in section.params:
            problems.append(f"[solver] {name} is required for method {section.method!r}.")
    if len(problems) == n_before:  # the keys and types are right: now the values
        problem = _check_solver_values(config_class, section.params)
        if problem:
            problems.append(problem)


def _check_solver_values(config_class: Any, params: dict[str, Any]) -> str | None:
    """``None`` if ``params`` (keys and types checked) make a ``config_class`` (the solver's
    configuration dataclass, which validates its values without a model), else one line naming
    the key, the value and what is accepted, e.g. ``[solver] rank must be a positive int or 'auto';
    got 'ten'.``"""
    try:
        config_class(**params)
        return None
    except (TypeError, ValueError) as exc:
        message = " ".join(str(exc).split())
    if any(message.startswith(f"{name} ") for name in params):
        return f"[solver] {message}"
    required = {name: params[name] for name in config_class.required() if name in params}
    for name, value in params.items():  # the key whose value alone is refused
        try:
            config_class(**{**required, name: value})
        except (TypeError, ValueError):
            return f"[solver] {name} = {_describe(value)} is not accepted: {message}"
    return f"[solver] the values are not accepted: {message}"


def _check_type(value: Any, hint: Any) -> str | None:
    """``None`` if a TOML ``value`` fits the annotation ``hint``, else what it must be."""
    if hint is Any:
        return None
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin is typing.Union or origin is types.UnionType:
        members = [a for a in args if a is not type(None)]
        results = [_check_type(value, a) for a in members]
        if any(r is None for r in results):
            return None
        found = list(dict.fromkeys(r for r in results if r))
        if found and all(r.startswith("must be ") for r in found):
            return "must be " + " or ".join(r.removeprefix("must be ") for r in found)
        return " or ".join(found) or "has an unsupported type"
    if hint is bool:
        return None if isinstance(value, bool) else "must be true or false"
    if hint is int:
        return None if isinstance(value, int) and not isinstance(value, bool) else "must be an integer"
    if hint is float:
        return None if isinstance(value, (int, float)) and not isinstance(value, bool) else "must be a number"
    if hint is str:
        return None if isinstance(value, str) else "must be a string"
    if origin in (list, tuple, Sequence, typing.Sequence) or hint in (list, tuple):
        inner = args[0] if args else Any
        if isinstance(value, list) and all(_check_type(v, inner) is None for v in value):
            return None
        return "must be a list" + (" of strings" if inner is str else "")
    return "cannot be set in a job file (it needs a Python object)"


def _blocks(table: dict, problems: list[str]) -> BlocksSection:
    _unknown("blocks", table, SECTIONS["blocks"], problems)
    return BlocksSection(**_section("blocks", table, BlocksSection, problems))


def _output(table: dict | None, base: Path, problems: list[str]) -> OutputSection | None:
    if table is None:
        return None
    _unknown("output", table, SECTIONS["output"], problems)
    n_before = len(problems)
    store = _required_path("output", table, problems, base, 'the path or URL of the zarr store, e.g. "influences.zarr"')
    mode = Rule('"up" or "perturbation"', lambda v: v.strip().lower(), lambda v: _lowered(v) in MODES)
    values = _section("output", table, OutputSection, problems, {"mode": mode}, skip=("store",))
    if "top_k" in values and values.get("mode") == "perturbation":
        problems.append(
            '[output] top_k needs mode = "up" (perturbation influences have one value per '
            'feature); remove top_k or set mode = "up".'
        )
    if len(problems) != n_before or store is None:
        return None
    return OutputSection(store=store, **values)


def _cluster(table: dict, problems: list[str], base: Path | None = None) -> ClusterSection:
    _unknown("cluster", table, SECTIONS["cluster"], problems)
    values: dict[str, Any] = {}
    if "security" in table:
        security = _security(table["security"], base or Path.cwd(), problems)
        if security is not None:
            values["security"] = security
    rules = {
        "scheduler": Rule('an address such as "tcp://scheduler:8786"', _stripped, _nonempty_str),
        "memory_limit": Rule('a number of bytes, a size such as "4GiB", or "auto"', ok=_memory_limit_ok),
    }
    values |= _section("cluster", table, ClusterSection, problems, rules, skip=("security",))
    local = [k for k in LOCAL_KEYS if k in table]
    if "scheduler" in table and local:
        problems.append(
            f"[cluster] give either scheduler or local settings ({', '.join(local)}), not both: "
            "a running scheduler has its own workers."
        )
    remote = [k for k in ("scheduler", "security") if k in table]
    if table.get("sequential") is True and (remote or local):
        problems.append(f"[cluster] sequential = true computes in this process; remove {', '.join(remote + local)}.")
    return ClusterSection(**values)


SECURITY_KEYS = ("ca_file", "cert", "key")


def _security(table: Any, base: Path, problems: list[str]) -> TlsFiles | None:
    """``[cluster] security``: the TLS files of the client, as paths relative to the job file."""
    if not isinstance(table, dict):
        problems.append(
            '[cluster] security must be a table such as { ca_file = "ca.pem", cert = "client.pem", '
            f'key = "client-key.pem" }}; got {_describe(table)}.'
        )
        return None
    _unknown("cluster.security", table, SECURITY_KEYS, problems)
    values: dict[str, str] = {}
    for key in SECURITY_KEYS:
        if key not in table:
            continue
        value = table[key]
        if isinstance(value, str) and value.strip():
            values[key] = resolve_path(value, base)
        else:
            problems.append(f"[cluster] security {key} must be the path of a PEM file; got {_describe(value)}.")
    missing = [k for k in ("ca_file", "cert") if k not in table]
    if missing:
        problems.append(
            f"[cluster] security needs ca_file (the cluster's CA certificate) and cert (this client's certificate; "
            f"key: its private key, unless the cert file holds it); {' and '.join(missing)} missing."
        )
        return None
    return TlsFiles(**values, source=JOB_SOURCE) if values else None


def _index(table: dict | None, base: Path, problems: list[str]) -> IndexSection | None:
    if table is None:
        return None
    _unknown("index", table, SECTIONS["index"], problems)
    n_before = len(problems)
    store = table.get("store")
    if not _nonempty_str(store):
        problems.append(f'[index] store is required: the index\'s path, e.g. "index.zarr"; got {_describe(store)}.')
    from ..core.operators import Curvature
    from ..core.projection import KINDS
    from ..index.factored import STORAGES
    from ..index.gradient_index import PRECONDITIONERS
    from ..index.layout import DTYPES

    rules = {  # the choices GradientIndex.build accepts, from where it defines them
        "projection": _one_of(KINDS),
        "dtype": _one_of(("auto", *DTYPES)),
        "preconditioner": _one_of(PRECONDITIONERS),
        "curvature": _one_of(tuple(c.value for c in Curvature)),
        "seed": Rule("a positive integer", ok=lambda v: _positive_int(v) or (type(v) is int and v == 0)),
        "regularization": Rule(
            'a number >= 0 or "auto"', ok=lambda v: v == "auto" or (type(v) in (int, float) and v >= 0)
        ),
        "ggn_draws": Rule(
            '"auto", 0 (the exact GGN) or a number of drawn labels',
            ok=lambda v: v == "auto" or (type(v) is int and v >= 0),
        ),
        "layers": Rule(
            "a list of module names", tuple, lambda v: isinstance(v, list) and all(isinstance(x, str) for x in v)
        ),
        "storage": _one_of(STORAGES),
        "factor_rank": Rule("a positive integer (the factors kept per layer)", ok=_positive_int),
    }
    values = _section("index", table, IndexSection, problems, rules, skip=("store",))
    if len(problems) != n_before:
        return None
    assert isinstance(store, str)  # checked above
    return IndexSection(store=resolve_path(store, base), **values)


def _evaluate(table: dict | None, base: Path, problems: list[str]) -> EvaluateSection | None:
    if table is None:
        return None
    table = _renamed_keys("evaluate", table, problems)
    _unknown("evaluate", table, SECTIONS["evaluate"], problems)
    n_before = len(problems)
    retrain = table.get("retrain")
    if retrain is None:
        problems.append('[evaluate] retrain is required: the retraining function as "module:function".')
    elif not isinstance(retrain, str) or not _FACTORY.match(retrain.strip()):
        problems.append(
            f'[evaluate] retrain must be "module:function" (e.g. "retrain:train"); got {_describe(retrain)}.'
        )
    if isinstance(table.get("methods"), str):  # one method: a list of one
        table = {**table, "methods": [table["methods"]]}
    methods = Rule(
        f"a list of {', '.join(repr(m) for m in EVALUATE_METHODS)}",
        lambda v: tuple(dict.fromkeys(v)),
        lambda v: isinstance(v, list) and bool(v) and all(m in EVALUATE_METHODS for m in v),
    )
    rules = {
        "options": _OPTIONS,
        "store": _path(base),
        "methods": methods,
        "n_subsets": _at_least(2),
        "seeds": _at_least(1),
        "n_bootstrap": _at_least(1),
        "seed": Rule("a non-negative integer", ok=lambda v: _integer(v) and v >= 0),
        "fraction": _fraction("0.5"),
        "confidence": _fraction("0.95"),
        "points": Rule(
            "a number of random training points or a list of training indices",
            lambda v: v if _positive_int(v) else tuple(v),
            lambda v: _positive_int(v) or _index_list(v),
        ),
        "corrupted": Rule("a list of training indices", tuple, _index_list),
    }
    values = _section("evaluate", table, EvaluateSection, problems, rules, skip=("retrain",))
    if "mislabel" in values.get("methods", ()) and not values.get("corrupted"):
        problems.append('[evaluate] methods = ["mislabel"] needs corrupted = [...] (the corrupted training indices).')
    if len(problems) != n_before:
        return None
    assert isinstance(retrain, str)  # checked above
    return EvaluateSection(retrain=retrain.strip(), **values)


# -- one validator for the keys of every section, driven by its dataclass ----------------------


_REFUSED = object()


@dataclass(frozen=True)
class Rule:
    """What one key's value must be.

    Attributes:
        expected: completes ``[section] key must be ...; got VALUE.``
        convert: the value the section's dataclass holds (applied once ``ok`` holds).
        ok: whether a value (as TOML gives it) is acceptable.
    """

    expected: str
    convert: Callable[[Any], Any] = lambda v: v
    ok: Callable[[Any], bool] = lambda v: True


def _integer(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _nonempty_str(value: Any) -> bool:
    return isinstance(value, str) and bool(value.strip())


def _stripped(value: Any) -> Any:
    return value.strip()


def _lowered(value: Any) -> Any:
    return value.strip().lower() if isinstance(value, str) else None


_POSITIVE_INT = Rule("a positive integer", ok=lambda v: _positive_int(v))
_BOOL = Rule("true or false", ok=lambda v: isinstance(v, bool))
_OPTIONS = Rule("a table of keyword arguments", dict, lambda v: isinstance(v, Mapping))
_BY_TYPE = {"int": _POSITIVE_INT, "int | None": _POSITIVE_INT, "bool": _BOOL, "bool | None": _BOOL}
"""The rule of a field whose section gives none, by the field's annotation."""


def _one_of(choices: Sequence[str]) -> Rule:
    return Rule(f"one of {', '.join(choices)}", ok=lambda v: v in choices)


def _at_least(minimum: int) -> Rule:
    return Rule(f"an integer of at least {minimum}", ok=lambda v: _integer(v) and v >= minimum)


def _fraction(example: str) -> Rule:
    return Rule(
        f"a number between 0 and 1 (e.g. {example})",
        float,
        lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and 0 < v < 1,
    )


def _path(base: Path) -> Rule:
    """A path (resolved against ``base``: :func:`~.paths.resolve_path`) or a URL."""
    return Rule("a path or URL", lambda v: resolve_path(v, base), _nonempty_str)


def _section(
    section: str,
    table: Mapping[str, Any],
    cls: type,
    problems: list[str],
    rules: Mapping[str, Rule] | None = None,
    *,
    skip: Sequence[str] = (),
) -> dict[str, Any]:
    """The values of ``table`` for the fields of the section's dataclass ``cls`` (``skip``: fields
    the caller checks itself), each checked by its rule (``rules``, else by the field's type:
    ``int`` a positive integer, ``bool`` true or false). One problem per refused value:
    ``[section] key must be EXPECTED; got VALUE.``"""
    rules = rules or {}
    values: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        if f.name in skip or f.name not in table:
            continue
        rule = rules.get(f.name) or _BY_TYPE[str(f.type)]
        value = table[f.name]
        if rule.ok(value):
            values[f.name] = rule.convert(value)
        else:
            problems.append(f"[{section}] {f.name} must be {rule.expected}; got {_describe(value)}.")
    return values


def _required_path(section: str, table: Mapping[str, Any], problems: list[str], base: Path, what: str) -> str | None:
    """``table["store"]`` resolved (:func:`~.paths.resolve_path`); ``None`` with a problem if missing or not a path."""
    store = table.get("store")
    if store is None:
        problems.append(f"[{section}] store is required: {what}.")
        return None
    if not _nonempty_str(store):
        problems.append(f"[{section}] store must be a path or URL; got {_describe(store)}.")
        return None
    return resolve_path(store, base)


def _renamed_keys(section: str, table: dict, problems: list[str], renamed: Mapping[str, str] | None = None) -> dict:
    """``table`` with the old spellings of :data:`RENAMED_KEYS` (or ``renamed``: ``{old: new}``, a
    solver's renamed hyperparameters) renamed, each with a ``RenamedWarning``; a table with both
    spellings of a key is a problem."""
    renamed = RENAMED_KEYS.get(section, {}) if renamed is None else renamed
    renames = {old: new for old, new in renamed.items() if old in table}
    if not renames:
        return table
    import warnings

    from ..errors import RenamedWarning

    table = dict(table)
    for old, new in renames.items():
        if new in table:
            problems.append(f"[{section}] pass {new} only ({old} is its old spelling).")
            table.pop(old)
            continue
        table[new] = table.pop(old)
        warnings.warn(
            f"[{section}] {old} is now spelled {new}; the old spelling still works in this release and will be "
            "removed in the next.",
            RenamedWarning,
            stacklevel=2,
        )
    return table


def _index_list(value: Any) -> bool:
    return (
        isinstance(value, list)
        and bool(value)
        and all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in value)
    )


def _memory_limit_ok(value: Any) -> bool:
    if isinstance(value, bool):
        return False
    if isinstance(value, (int, float)):
        return value > 0
    if isinstance(value, str):
        if value.strip().lower() == "auto":
            return True
        from dask.utils import parse_bytes

        try:
            return parse_bytes(value) > 0
        except (ValueError, TypeError):
            return False
    return False


def _positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def _unknown(section: str, table: Mapping, valid: Sequence[str], problems: list[str]) -> None:
    for key in table:
        if key not in valid:
            problems.append(f"[{section}] unknown key {key!r}{_suggest(key, valid)}")


def _suggest(key: str, valid: Any, *, brackets: bool = False, what: str | None = None) -> str:
    """``"; did you mean 'x'?"`` for the closest valid key, else the list of valid keys."""
    valid = list(valid)
    close = difflib.get_close_matches(str(key), valid, n=1, cutoff=0.6)
    if close:
        return f"; did you mean [{close[0]}]?" if brackets else f"; did you mean {close[0]!r}?"
    listed = ", ".join(f"[{v}]" if brackets else v for v in valid)
    return f"; valid {what or ('sections' if brackets else 'keys')}: {listed}."


def _describe(value: Any) -> str:
    """A TOML value as a message shows it: ``'big'``, ``-3``, ``a table``, ``a list``."""
    if isinstance(value, Mapping):
        return "a table"
    if isinstance(value, list) and len(repr(value)) > 40:
        return "a list"
    return repr(value)
