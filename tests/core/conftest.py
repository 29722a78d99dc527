"""Fixtures shared by the EK-FAC tests."""

import pytest

from dask_influence.core.solvers import ekfac as ekfac_module


@pytest.fixture(params=["layers", "flat"])
def scoring(request, monkeypatch):
    """Both routes of up-weighting scores: per-layer contractions, and flat per-sample gradients."""
    monkeypatch.setattr(ekfac_module, "FLAT_SCORING_MAX_PARAMS", 0 if request.param == "layers" else 10**9)
    return request.param
