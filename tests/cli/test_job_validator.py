"""One validator for every section's keys, driven by the section's dataclass: each field of
``[blocks]``, ``[output]``, ``[cluster]``, ``[index]``, ``[evaluate]`` and ``[solver]``'s fit keys
refuses a value of the wrong kind in one line, ``[section] key must be ...; got ...``, with
the messages the job file has always given."""

from __future__ import annotations

import dataclasses

import pytest

from dask_influence.errors import JobFileError
from dask_influence.job import parse_job
from dask_influence.job.sections import (
    BlocksSection,
    ClusterSection,
    EvaluateSection,
    IndexSection,
    OutputSection,
)

BASE = {"model": {"factory": "f:g"}, "solver": {"method": "direct"}, "output": {"store": "s.zarr"}}
REQUIRED = {"index": {"store": "i.zarr"}, "evaluate": {"retrain": "r:t"}}
CASES = [
    (section, f.name)
    for section, cls in (
        ("blocks", BlocksSection),
        ("output", OutputSection),
        ("cluster", ClusterSection),
        ("index", IndexSection),
        ("evaluate", EvaluateSection),
    )
    for f in dataclasses.fields(cls)
] + [("solver", "distributed_fit"), ("solver", "fit_file")]


def problems(section: str, key: str, value) -> list[str]:
    data = {name: dict(table) for name, table in BASE.items()}
    data.setdefault(section, {}).update(REQUIRED.get(section, {}))
    data[section][key] = value
    with pytest.raises(JobFileError) as refused:
        parse_job(data, base_dir="/jobs")
    return refused.value.problems


@pytest.mark.parametrize(("section", "key"), CASES)
def test_every_field_of_every_section_refuses_a_wrong_value_in_one_line(section, key):
    wrong = [1, 2] if key in ("options", "security") else {"a": 1}  # a TOML table (a list for tables)
    found = problems(section, key, wrong)
    assert len(found) == 1, found
    if key == "security":
        assert found[0].startswith("[cluster] security must be a table such as { ca_file = ")
    elif section == "index" and key == "store":
        assert found[0] == '[index] store is required: the index\'s path, e.g. "index.zarr"; got a table.'
    else:
        assert found[0].startswith(f"[{section}] {key} must be ") and found[0].endswith(
            "; got [1, 2]." if key == "options" else "; got a table."
        )


@pytest.mark.parametrize(
    ("section", "key", "value", "message"),
    [
        ("blocks", "train", "x", "[blocks] train must be a positive integer; got 'x'."),
        ("blocks", "test", 0, "[blocks] test must be a positive integer; got 0."),
        ("output", "mode", "sideways", '[output] mode must be "up" or "perturbation"; got \'sideways\'.'),
        ("cluster", "gpu", "yes", "[cluster] gpu must be true or false; got 'yes'."),
        (
            "cluster",
            "memory_limit",
            "lots",
            '[cluster] memory_limit must be a number of bytes, a size such as "4GiB", or "auto"; got \'lots\'.',
        ),
        ("index", "projection", "fancy", "[index] projection must be one of "),
        ("index", "seed", -1, "[index] seed must be a positive integer; got -1."),
        ("index", "storage", "sparse", "[index] storage must be one of "),
        ("index", "factor_rank", 0, "[index] factor_rank must be a positive integer (the factors kept per layer)"),
        ("evaluate", "methods", ["lds", "x"], "[evaluate] methods must be a list of 'lds', 'loo', 'mislabel'; got"),
        ("evaluate", "methods", "x", "[evaluate] methods must be a list of 'lds', 'loo', 'mislabel'; got ['x']."),
        ("evaluate", "n_subsets", 1, "[evaluate] n_subsets must be an integer of at least 2; got 1."),
        ("evaluate", "fraction", 1.5, "[evaluate] fraction must be a number between 0 and 1 (e.g. 0.5); got 1.5."),
        ("solver", "fit_file", "", "[solver] fit_file must be a path or URL; got ''."),
    ],
)
def test_the_messages_stay_those_of_the_job_file(section, key, value, message):
    assert problems(section, key, value)[0].startswith(message)


def test_good_values_are_converted_as_the_sections_hold_them():
    data = {name: dict(table) for name, table in BASE.items()}
    data["output"] |= {"mode": " Perturbation ", "self_influences": True}
    data["evaluate"] = {"retrain": " r:t ", "methods": "loo", "points": [3, 1], "fraction": 1 / 4}
    data["index"] = {"store": "i.zarr", "layers": ["fc1"], "seed": 0, "storage": "factored", "factor_rank": 2}
    job = parse_job(data, base_dir="/jobs")
    assert job.index.build_options()["storage"] == "factored" and job.index.build_options()["factor_rank"] == 2
    assert (job.output.mode, job.output.store, job.output.self_influences) == ("perturbation", "/jobs/s.zarr", True)
    assert (job.evaluate.retrain, job.evaluate.methods, job.evaluate.points) == ("r:t", ("loo",), (3, 1))
    assert (job.index.store, job.index.layers, job.index.seed) == ("/jobs/i.zarr", ("fc1",), 0)
