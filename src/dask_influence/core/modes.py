"""The two kinds of influence the library computes."""

from __future__ import annotations

from enum import Enum


class InfluenceMode(str, Enum):
    """Which influence to compute; the plain strings ``"up"`` and ``"perturbation"`` work too.

    Compare modes by value (``InfluenceMode.parse(mode) is InfluenceMode.up``), never a raw
    string by identity.
    """

    up = "up"
    """Up-weighting: ``grad L(z_test)^T H^-1 grad L(z)``, shape ``(n_test, n)``."""
    perturbation = "perturbation"
    """Input perturbation: ``grad L(z_test)^T H^-1 d/dx grad L(z)``, shape ``(n_test, n, *x.shape[1:])``."""

    @classmethod
    def parse(cls, value: str | InfluenceMode) -> InfluenceMode:
        """Accept an ``InfluenceMode`` or its string value; raise ``ValueError`` otherwise."""
        if isinstance(value, cls):
            return value
        if isinstance(value, str):
            try:
                return cls(value.strip().lower())
            except ValueError:
                pass
        raise ValueError(f"mode must be 'up' or 'perturbation' (or an InfluenceMode); got {value!r}.")
