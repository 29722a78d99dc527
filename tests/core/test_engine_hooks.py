"""The solver classes show users their handful of methods; the engine hooks (what the mapping
layer and subclasses call) are marked and kept out of the API reference (docs/architecture.md,
"How to add a solver"): every public method of ``SolverEngine`` is an engine hook, none of
``InfluenceModel``'s is, and docs/api.md filters each built-in solver's own hooks."""

from __future__ import annotations

import inspect
import re
from pathlib import Path

import yaml

from dask_influence.core.solvers.base import InfluenceModel
from dask_influence.core.solvers.engine import SolverEngine
from dask_influence.core.solvers.registry import SOLVERS

API_MD = Path(__file__).resolve().parents[2] / "docs" / "api.md"

USER_METHODS = {
    "fit",
    "influence_factors",
    "influences_from_factors",
    "influences",
    "self_influences",
    "per_sample_grads",
    "apply_inverse",
    "solve",
    "fingerprint",
    "save",
    "load",
    "is_fitted",
    "num_params",
    "dtype",
    "device",
    "regularization",
    "curvature",
    "blocks",
    "task",
}


def own_public(cls: type) -> dict[str, object]:
    """The public methods and properties a class defines itself (what mkdocstrings lists for it)."""
    return {
        name: value
        for name, value in vars(cls).items()
        if not name.startswith("_") and isinstance(value, (property, classmethod, staticmethod) + (type(own_public),))
    }


def is_hook(value: object) -> bool:
    function = value.fget if isinstance(value, property) else getattr(value, "__func__", value)
    return (inspect.getdoc(function) or "").startswith("Engine hook.")


def api_filters() -> dict[str, list[str]]:
    """``{class name: filters}`` of the ``:::`` entries of docs/api.md (mkdocs.yml's default: ``["!^_"]``)."""
    text = API_MD.read_text(encoding="utf-8")
    found = {}
    for match in re.finditer(r"^::: dask_influence\.(\w+)\n((?:    .*\n)*)", text, flags=re.M):
        options = yaml.safe_load(match.group(2).replace("\n    ", "\n")[4:]) if match.group(2) else None
        found[match.group(1)] = ((options or {}).get("options") or {}).get("filters", ["!^_"])
    return found


def shown(name: str, filters: list[str]) -> bool:
    negative = [f[1:] for f in filters if f.startswith("!")]
    positive = [f for f in filters if not f.startswith("!")]
    if any(re.search(p, name) for p in negative):
        return False
    return not positive or any(re.search(p, name) for p in positive)


def test_every_public_member_of_the_engine_is_a_marked_hook():
    members = own_public(SolverEngine)
    assert set(members) >= {"fit_blocks", "finish_fit", "shippable", "prepare_batch", "check_loss"}
    assert [name for name, value in members.items() if not is_hook(value)] == []


def test_influence_model_defines_the_user_methods_and_no_hook():
    members = own_public(InfluenceModel)
    assert USER_METHODS <= set(members), USER_METHODS - set(members)
    assert [name for name, value in members.items() if is_hook(value)] == []
    assert not set(members) & set(own_public(SolverEngine))  # no user method overrides a hook


def test_the_api_reference_lists_no_engine_hook_of_any_builtin_solver():
    filters = api_filters()
    builtin = {name: cls for name, cls in SOLVERS.items() if cls.__module__.startswith("dask_influence.")}
    assert set(builtin) >= {"direct", "cg", "lissa", "arnoldi", "nystroem", "ekfac"}
    hooks = set(own_public(SolverEngine))
    for cls in (InfluenceModel, *builtin.values()):
        assert cls.__name__ in filters, f"docs/api.md has no ::: entry for {cls.__name__}"
        members = own_public(cls)
        # a solver's override of an engine hook is marked like the hook
        unmarked = [name for name in members if name in hooks and not is_hook(members[name])]
        assert unmarked == [], f"{cls.__name__} overrides engine hooks without marking them: {unmarked}"
        listed = {name for name in members if shown(name, filters[cls.__name__])}
        expected = {name for name, value in members.items() if not is_hook(value)}
        assert listed == expected, (
            f"{cls.__name__}: docs/api.md lists {sorted(listed - expected)} (engine hooks), "
            f"hides {sorted(expected - listed)}"
        )


def test_ekfac_hooks_are_filtered_and_its_user_methods_listed():
    filters = api_filters()["EkfacInfluence"]
    ekfac = SOLVERS["ekfac"]
    assert [n for n in ("block_sums", "fit_from_sums", "check_loss") if shown(n, filters)] == []
    assert [
        n for n in ("curvature_matrix", "per_sample_grads_from_factors", "memory_budget") if not shown(n, filters)
    ] == []
    assert is_hook(vars(ekfac)["block_sums"]) and is_hook(vars(ekfac)["check_loss"])
