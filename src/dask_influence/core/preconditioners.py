"""Preconditioners for conjugate gradients: cheap approximations of ``(H + lambda I)^-1``.

A preconditioner is fitted on the unregularized curvature operator and the regularization,
then applied to blocks of residuals ``(p, k)``. ``num_applications`` counts how often it
was applied, so a test can prove that a configured preconditioner is actually used.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from .lowrank import LowRankFactor, nystroem_sketch
from .operators import LinearOperator
from .serialization import serializable


class Preconditioner:
    """Base class: ``fit(operator, regularization)`` then ``apply(r)`` ``(p, k) -> (p, k)``."""

    def __init__(self) -> None:
        self.num_applications = 0
        self._fitted = False

    def fit(self, operator: LinearOperator, regularization: float) -> Preconditioner:
        """Build an approximate inverse of ``operator + regularization * I``; returns ``self``."""
        self._fit(operator, float(regularization))
        self._fitted = True
        return self

    def apply(self, r: Tensor) -> Tensor:
        """The preconditioner applied to the residuals ``r`` ``(p, k)``."""
        if not self._fitted:
            raise RuntimeError(f"{type(self).__name__} is used before fit().")
        self.num_applications += 1
        return self._apply(r)

    def _fit(self, operator: LinearOperator, regularization: float) -> None:
        raise NotImplementedError

    def _apply(self, r: Tensor) -> Tensor:
        raise NotImplementedError


@serializable
class JacobiPreconditioner(Preconditioner):
    """Inverse of the diagonal of ``H + lambda I``, the diagonal estimated by Hutchinson.

    ``diag(H) ~ mean_k v_k * (H v_k)`` over ``num_probes`` Rademacher vectors ``v_k``
    (Bekas, Kokiopoulou & Saad 2007): one block product with ``num_probes`` columns.
    Estimates below ``floor`` times the mean absolute diagonal are raised to it, so the
    preconditioner stays positive definite.

    Args:
        num_probes: Rademacher probe vectors (more: a sharper diagonal).
        seed: seeds the probes.
        floor: relative lower bound on the estimated diagonal.
    """

    def __init__(self, num_probes: int = 16, *, seed: int = 0, floor: float = 1e-3):
        super().__init__()
        self.num_probes = int(num_probes)
        self.seed = int(seed)
        self.floor = float(floor)
        self.diagonal: Tensor | None = None

    def _fit(self, operator: LinearOperator, regularization: float) -> None:
        gen = torch.Generator().manual_seed(self.seed)
        probes = torch.randint(0, 2, (operator.size, self.num_probes), generator=gen) * 2 - 1
        probes = probes.to(device=operator.device, dtype=operator.dtype)
        diag = (probes * operator.matmat(probes)).mean(dim=1)
        floor = self.floor * float(diag.abs().mean()) + torch.finfo(diag.dtype).tiny
        self.diagonal = torch.clamp(diag, min=floor) + regularization

    def _apply(self, r: Tensor) -> Tensor:
        assert self.diagonal is not None
        return r / self.diagonal[:, None]


@serializable
class NystroemPreconditioner(Preconditioner):
    """Randomized Nystroem preconditioner of rank ``rank`` (Frangella, Tropp & Udell 2023).

    With ``H ~ U diag(s) U^T`` it applies
    ``(s_r + lambda) U diag(1/(s + lambda)) U^T + (I - U U^T)``, which maps the top ``rank``
    eigendirections to a common scale; CG then converges as if the condition number were
    about ``(s_r + lambda) / lambda``. Needs ``lambda > 0``.
    """

    def __init__(self, rank: int = 10, *, seed: int = 0):
        super().__init__()
        self.rank = int(rank)
        self.seed = int(seed)
        self.factor: LowRankFactor | None = None
        self._regularization = 0.0

    def _fit(self, operator: LinearOperator, regularization: float) -> None:
        if regularization <= 0:
            raise ValueError(
                "NystroemPreconditioner needs regularization > 0; pass a positive "
                "regularization to the solver or use preconditioner='jacobi'."
            )
        gen = torch.Generator().manual_seed(self.seed)
        self.factor = nystroem_sketch(operator, min(self.rank, operator.size), gen)
        self._regularization = regularization

    def _apply(self, r: Tensor) -> Tensor:
        assert self.factor is not None
        u, s = self.factor.basis, self.factor.eigenvalues
        mu = self._regularization
        coeff = u.T @ r
        # (s_r + mu) U diag(1/(s + mu)) U^T r + (r - U U^T r), with one product by U
        return r + u @ (coeff * ((s[-1] + mu) / (s + mu) - 1)[:, None])


def make_preconditioner(value: Any, *, rank: int = 10, seed: int = 0) -> Preconditioner | None:
    """Turn ``None``, ``"jacobi"``, ``"nystroem"`` or a :class:`Preconditioner` into one."""
    if value is None or isinstance(value, Preconditioner):
        return value
    if isinstance(value, str):
        key = value.strip().lower()
        if key == "jacobi":
            return JacobiPreconditioner(seed=seed)
        if key in ("nystroem", "nystrom"):
            return NystroemPreconditioner(rank=rank, seed=seed)
    raise ValueError(f"preconditioner must be None, 'jacobi', 'nystroem' or a Preconditioner instance; got {value!r}.")


def preconditioner_name(value: Any) -> str | None:
    """``None``, ``"jacobi"`` or ``"nystroem"`` for ``value`` (a name or an instance of the built-in
    classes); another :class:`Preconditioner` as ``"<ClassName>"``."""
    if value is None or isinstance(value, str):
        return value
    if type(value) is JacobiPreconditioner:
        return "jacobi"
    if type(value) is NystroemPreconditioner:
        return "nystroem"
    return f"<{type(value).__name__}>"
