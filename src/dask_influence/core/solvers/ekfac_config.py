"""EkfacConfig: the hyperparameters of :class:`~.ekfac.EkfacInfluence`, checked at construction."""

from __future__ import annotations

from dataclasses import dataclass, field
from types import MappingProxyType
from typing import ClassVar

from ..output_curvature import OUTPUT_CURVATURES
from .config import SolverConfig, check_positive_int, check_seed, hyperparameter
from .ekfac_layers import TIED_CHOICES

FISHER_CHOICES = ("auto", "exact", "sampled")
"""EK-FAC's ``fisher``: the output curvature's exact roots, the sampled Fisher, or the cheaper."""


@dataclass(frozen=True)
class EkfacConfig(SolverConfig):
    """Hyperparameters of :class:`EkfacInfluence` (its curvature is always the GGN)."""

    curvature: str = field(default="ggn", init=False, metadata={"help": "Always 'ggn'."})
    update_diagonal: bool = hyperparameter(
        True, "True for EK-FAC (a second pass refits the eigenvalues), False for K-FAC."
    )
    layers: tuple[str, ...] | None = hyperparameter(
        None,
        "Names of the modules to include (None: every trainable Linear, Conv2d, Embedding and Hugging Face "
        "Conv1D); other trainable parameters are left out (zero factor entries) with one warning.",
    )
    output_curvature: str | None = hyperparameter(
        None,
        "The loss's curvature in the outputs (formerly task=): 'classification' (cross-entropy on logits), "
        "'regression' (mean squared error), 'autograd' (the loss's own Hessian in the outputs) or None: the "
        "task's own (Task.output_curvature), inferred from nn.CrossEntropyLoss/nn.MSELoss, else 'autograd'.",
    )
    fisher: str = hyperparameter(
        "auto",
        "How the loss's curvature in the outputs enters the factors: 'exact' (back-propagate every root of it: "
        "c per sample, (T-1) V for a causal LM), 'sampled' (the true Fisher: fisher_draws labels drawn from the "
        "model per position, one backward pass each) or 'auto' (exact where it costs at most "
        "EXACT_ROOTS_BUDGET = 256 backward passes per chunk, else sampled).",
    )
    fisher_draws: int = hyperparameter(
        1, "Labels drawn per position for the sampled Fisher (its error falls like 1/sqrt(draws))."
    )
    seed: int = hyperparameter(
        0, "Seeds the labels of the sampled Fisher (with each sample's index: the same draws on any split of the data)."
    )
    tied: str = hyperparameter(
        "exclude",
        "A weight tied between a token embedding and an LM head (GPT-2's wte and lm_head): 'exclude' leaves it "
        "out (zero factor entries, named in the warning); 'head' factors it through its LM-head use (A from the "
        "head's inputs, a diagonal vocabulary side G; the embedding use's gradient still counted in every "
        "gradient and in the corrected eigenvalues).",
    )
    memory_budget: int | None = hyperparameter(
        None,
        "Bytes the fit may hold (Kronecker factors, eigendecompositions, per-chunk blocks); None: half the "
        "machine's memory (80% of the GPU's for a CUDA model). A dense factor that does not fit is kept "
        "diagonal (with a warning); what still does not fit is refused before any pass.",
    )

    solve_time: ClassVar[frozenset[str]] = frozenset({"regularization"})
    renamed = MappingProxyType({"task": "output_curvature"})  # the objective is the solver's task

    def __post_init__(self) -> None:
        super().__post_init__()
        if not isinstance(self.update_diagonal, bool):
            raise TypeError(f"update_diagonal must be True or False; got {self.update_diagonal!r}.")
        if self.layers is not None:
            if isinstance(self.layers, str) or not all(isinstance(n, str) for n in self.layers):
                raise TypeError(f"layers must be a list of module names or None; got {self.layers!r}.")
            self._set("layers", tuple(self.layers))
        if self.output_curvature is not None and self.output_curvature not in OUTPUT_CURVATURES:
            raise ValueError(
                "output_curvature must be 'classification', 'regression', 'autograd' or None; "
                f"got {self.output_curvature!r}."
            )
        if self.tied not in TIED_CHOICES:
            raise ValueError(f"tied must be 'exclude' or 'head'; got {self.tied!r}.")
        if self.fisher not in FISHER_CHOICES:
            raise ValueError(f"fisher must be 'auto', 'exact' or 'sampled'; got {self.fisher!r}.")
        self._set("fisher_draws", check_positive_int("fisher_draws", self.fisher_draws))
        check_seed(self.seed)
        if self.memory_budget is not None:
            self._set("memory_budget", check_positive_int("memory_budget", self.memory_budget))
