"""What `inspect` says of how a gradient index summed its curvature, for each recorded form of
``ggn_estimate`` (an index's attributes): exact, sampled, the leading output roots, or not recorded."""

from __future__ import annotations

import pytest

from dask_influence.storage.index_info import _curvature_line


@pytest.mark.parametrize(
    ("estimate", "line"),
    [
        ("exact", "  curvature   exact GGN, stored float32"),
        (
            {"kind": "sampled", "draws": 2, "seed": 7},
            "  curvature   sampled GGN (true Fisher, 2 draws per sample, seed 7), stored float32",
        ),
        (
            {"kind": "leading", "trace": 0.99},
            "  curvature   GGN over each sample's leading output-curvature roots (99% of the trace), stored float32",
        ),
        ({"kind": "blocked"}, "  curvature   GGN (blocked), stored float32"),
        (None, "  curvature   stored float32"),
    ],
)
def test_the_curvature_line_names_how_the_ggn_was_summed(estimate, line):
    assert _curvature_line({"ggn_estimate": estimate, "curvature_dtype": "float32"}) == line


def test_an_index_without_records_has_no_curvature_line():
    assert _curvature_line({}) is None
