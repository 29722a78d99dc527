"""EkfacInfluence: K-FAC and eigenvalue-corrected K-FAC (EK-FAC) for Linear, Conv2d, Embedding
and Hugging Face Conv1D layers.

The curvature is the generalized Gauss-Newton matrix of the MEAN training loss (for
cross-entropy: the true Fisher of the model's predictive distribution, not the empirical
Fisher; taken exactly by back-propagating the roots of the loss's Hessian in the outputs, or,
where those are more than :data:`EXACT_ROOTS_BUDGET` per sample (a language model's
``(T - 1) V``), sampled with labels drawn from the model: ``fisher``), approximated
block-diagonally per layer by ``G (x) A``; see :mod:`dask_influence.core.kronecker` for the
conventions. ``fit`` makes one pass over the training data for ``A`` and ``G`` and, with
``update_diagonal=True``, a second pass for the corrected eigenvalues. Up-weighting
influences and self-influences are computed layer by layer from per-sample output gradients
``g`` and inputs ``a``: the flat ``(n, p)`` per-sample gradients of the training points are
never formed. Influence factors keep the
library's ``(n_test, p)`` layout, so every solver's factors are interchangeable.

Memory is estimated before any pass (``memory_budget``): at construction from the layers'
shapes (a side whose dense factor does not fit is kept diagonal, with a warning, or the fit is
refused in one line), and on the first training batch from one sample's forward (chunks sized
to the budget, or a one-line refusal).

Trainable parameters outside the supported layers (LayerNorm, ``nn.MultiheadAttention``'s
projections, bare ``nn.Parameter``s) or outside ``layers=`` are left out, with one warning
naming them (:func:`find_layers`): EK-FAC treats them as frozen, so their entries of the
influence factors (and their rows and columns of the curvature) are zero.
"""

from __future__ import annotations

import logging
import math
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, cast

import torch
from torch import Tensor, nn

from ... import progress as _progress
from ...errors import NonFiniteError, NotFittedError
from .. import batches
from ..blocks import BlockSums, Each, mean_in
from ..factor_columns import FactorColumns, held_groups, tensor_bytes
from ..gradients import _FORWARD_LOCK, LossFn, flat_params
from ..kronecker import (
    Capture,
    FactorSums,
    KroneckerLayer,
    LayerFactors,
    check_layer_positive,
    corrected_eigenvalue_sum,
    eigen_factor,
    layer_grads,
    rotated_square_sum,
    tied_layer_grads,
)
from ..kronecker_scores import column_parts, self_contract, up_scores
from ..operators import LinearOperator
from ..output_curvature import OUTPUT_CURVATURES, OutputCurvature, infer_output_curvature
from ..serialization import serializable
from ..task import Task
from .base import InfluenceModel
from .ekfac_config import EkfacConfig
from .ekfac_layers import find_layers, left_out_parameters
from .ekfac_memory import FitMemory, _bytes, default_memory_budget, plan_or_refuse
from .registry import register

__all__ = [  # with the names of the split-off modules that tests and the index import from here
    "EkfacInfluence",
    "EkfacState",
    "FitMemory",
    "OutputCurvature",
    "find_layers",
    "infer_output_curvature",
    "infer_task",
    "left_out_parameters",
]

infer_task = infer_output_curvature  # its former name, which the index imports

logger = logging.getLogger("dask_influence")

EXACT_ROOTS_BUDGET = 256
"""``fisher="auto"`` back-propagates the exact roots of the loss's Hessian in the outputs while
they are at most this many per sample (each is one backward pass per chunk: ``c`` for a
``c``-class classifier, ``(T - 1) V`` for a causal LM), and the sampled Fisher
(``fisher_draws`` backward passes per chunk) beyond."""

# Up to this many parameters EK-FAC scores by flat per-sample gradients (vmap + one product),
# which beat its per-layer contractions there (measured in docs/benchmarks.md).
FLAT_SCORING_MAX_PARAMS = 50_000


@serializable
@dataclass(frozen=True)
class EkfacState:
    """The fitted state: per-layer Kronecker eigenbases, ``O(sum_l d_in^2 + d_out^2)`` numbers.

    Attributes:
        layers: one :class:`~dask_influence.core.kronecker.LayerFactors` per layer, in the
            order of the flat parameter vector.
        n_train: the number of training samples the factors average over.
    """

    layers: tuple[LayerFactors, ...]
    n_train: int

    @property
    def nbytes(self) -> int:
        """Bytes held by the state's tensors."""
        tensors = [t for f in self.layers for t in (f.q_a, f.lambda_a, f.q_g, f.lambda_g, f.corrected) if t is not None]
        return sum(t.numel() * t.element_size() for t in tensors)


# -- the per-block function of both fitting passes -----------------------------------------------
def ekfac_block(
    solver: EkfacInfluence,
    batch: Any,
    start: int,
    weight: float,
    payload: tuple[str, Sequence[LayerFactors] | None],
    out: list[Tensor] | None = None,
) -> list[Tensor]:
    """One block's float64 sums of a fitting pass (:meth:`EkfacInfluence.block_sums`);
    ``payload`` is ``(kind, factors)``. The parameters are read without the finite check of
    :meth:`~.engine.SolverEngine.trained_parameters` (the fit checked them before its first pass;
    the check scanned the ``p`` weights once per block: 4% of a GPT-2 fit)."""
    kind, factors = payload
    theta = flat_params(solver.model, solver._functions.spec)
    return solver.block_sums(kind, theta, batch, offset=start, factors=factors, out=out)


# -- the solver -----------------------------------------------------------------------------------
@register("ekfac")
class EkfacInfluence(InfluenceModel):
    """Influences from a block-diagonal Kronecker-factored curvature (K-FAC or EK-FAC).

    Args:
        model: a trained model; its trainable ``nn.Linear``, ``nn.Conv2d`` (``groups=1``),
            ``nn.Embedding`` and Hugging Face ``Conv1D`` layers are factored, any other
            trainable parameter is left out (treated as frozen: zero factor entries) with one
            warning naming it.
        task: the objective (positional): a :class:`~..task.Task` with ``outputs`` and
            ``output_loss``, or a loss ``loss(outputs, targets)`` with mean reduction; ``None``
            picks ``nn.CrossEntropyLoss()`` or ``nn.MSELoss()`` from ``output_curvature``.
        regularization: ``lambda >= 0`` added to every eigenvalue: ``(C + lambda I)^-1``.
        update_diagonal: ``True`` for EK-FAC (a second pass refits the eigenvalues), ``False``
            for K-FAC.
        layers: names of the modules to include (``None``: all supported trainable ones).
            Trainable parameters outside them are left out in the same way.
        tied: a weight ``(V, d)`` shared by an ``nn.Embedding`` and an ``nn.Linear`` LM head
            (GPT-2's ``wte`` and ``lm_head``): ``"exclude"`` (default) leaves it out, the warning
            naming it; ``"head"`` factors it as the head's layer (``A`` ``(d, d)`` from the
            head's inputs, ``G`` diagonal ``(V,)``) and adds the embedding use's gradient to
            every gradient and to the corrected eigenvalues, with one warning naming it.
        output_curvature: the loss's curvature in the outputs (``solver.config.output_curvature``;
            formerly the keyword ``task=``, which still works with a ``RenamedWarning``):
            ``"classification"`` (cross-entropy on logits), ``"regression"`` (mean squared error),
            ``"autograd"`` (the loss's own Hessian in the outputs) or ``None``: a Task's
            ``output_curvature``, else inferred from ``nn.CrossEntropyLoss``/``nn.MSELoss``, and for
            any other loss its own Hessian in the outputs is taken by autograd. A closed form
            is checked against autograd on the first batch.
        chunk_size: samples per batched forward/backward pass (memory knob).

    Attributes:
        state_: the fitted :class:`EkfacState`.

    Raises:
        ValueError: at construction, for a parameter shared by several modules, a grouped
            Conv2d, an embedding with ``max_norm``, or ``layers`` naming an unknown or
            unsupported module (the message names the layer and how to freeze it).
        NotPositiveDefiniteError: when an eigenvalue plus ``regularization`` is not positive.
    """

    state_: EkfacState | None = None

    config_class = EkfacConfig
    config: EkfacConfig

    def __init__(
        self,
        model: nn.Module,
        task: LossFn | Task | None = None,
        config: EkfacConfig | None = None,
        /,
        **hyperparameters: Any,
    ):
        config = cast(EkfacConfig, self._make_config(config, hyperparameters))  # an instance of config_class
        # ``task``: the objective; ``kind``: the output curvature (config.output_curvature)
        if isinstance(task, Task):
            if not task.has_outputs:
                raise ValueError(
                    f"EK-FAC needs the loss as a function of the model outputs, which the task "
                    f"{task.name!r} does not give: pass Task(..., outputs=fn(model, batch) -> outputs, "
                    "output_loss=fn(outputs, batch) -> loss) (the ready-made tasks of di.tasks carry "
                    "them), or use another solver (e.g. CgInfluence)."
                )
            kind = config.output_curvature or task.output_curvature
            if kind is not None and kind not in OUTPUT_CURVATURES:
                raise ValueError(
                    f"output_curvature must be 'classification', 'regression', 'autograd' or None; got {kind!r}."
                )
        else:
            kind = infer_output_curvature(task, config.output_curvature)
            if task is None:
                if kind is None:
                    raise ValueError(
                        "Pass a loss, or output_curvature='classification' or 'regression' to use the default one."
                    )
                task = nn.CrossEntropyLoss() if kind == "classification" else nn.MSELoss()
        # Reading the model's trainable parameters races with another thread's forward
        # (functional_call swaps them for plain tensors), so construction holds the lock too.
        with _FORWARD_LOCK:
            super().__init__(model, task, config.replace(output_curvature=kind))
            self._layers = find_layers(model, self._functions.spec, self.config.layers, self.config.tied)
        # what the hooks watch: the layers, then the embedding uses of tied heads (tied="head")
        self._tied_uses = [layer.tied_use for layer in self._layers if layer.tied_use is not None]
        self._captured = self._layers + self._tied_uses  # the uses' inputs captured as token ids
        assert self.objective.output_loss is not None  # a pair task or a task with outputs (checked above)
        self._output = OutputCurvature(self.objective.output_loss, kind)
        self._plan_factors()

    # -- memory ---------------------------------------------------------------------------------
    @property
    def memory_budget(self) -> int:
        """The fit's budget in bytes: ``memory_budget``, or the machine's default (:func:`default_memory_budget`)."""
        return self.config.memory_budget or default_memory_budget(self.device)

    def _plan_factors(self) -> None:
        """Before any pass: the factor-sized memory from the layers' shapes; sides kept diagonal
        where the dense factors would not fit the budget (one warning), or a one-line refusal
        (:func:`~.ekfac_memory.plan_or_refuse`)."""
        itemsize = torch.empty((), dtype=self.dtype).element_size()
        self._diagonal, self.memory_ = plan_or_refuse(self._layers, itemsize, self.memory_budget, self.update_diagonal)
        self._fit_chunks: dict[tuple, int] = {}

    def _fit_chunk(self, theta: Tensor, batch: Any) -> int:
        """Samples per chunk of a fitting pass on batches shaped as ``batch``: ``chunk_size``, halved
        until the per-chunk blocks (the model outputs and the vectors back-propagated, each layer's
        inputs and output gradients, a layer's per-sample gradients in the second pass) fit beside the
        factors; a one-line refusal when one sample's do not. From one sample's forward."""
        return self._chunk(theta, batch, scoring=False)

    def chunk_pieces(self, theta: Tensor, batch: Any, *, scoring: bool = False) -> list[tuple[str, int]]:
        """One sample's per-chunk blocks ``(what, bytes)`` for batches shaped as ``batch``, from one
        sample's forward (no backward): what a chunk of ``m`` samples holds is ``m`` times their sum,
        beside the factors (:attr:`memory_`; the fitted state when ``scoring``).

        - the model outputs (``c`` numbers: a causal LM's ``T x V`` logits) and the vectors
          back-propagated (``r`` of ``c``: every exact root, ``fisher_draws`` sampled ones, or the
          loss gradient when ``scoring``);
        - per layer its inputs ``(P, i)`` and output gradients ``(r, P, o)`` at its ``P`` positions;
          a tied LM head's embedding use holds its output gradients ``(r, Q, d)`` and its token ids
          ``(Q,)`` int64 (no one-hot inputs, :class:`~..kronecker.Capture`), and adds nothing to the
          head's positions (its share is an ``index_add_`` into the head's per-sample gradients);
        - the largest layer's per-sample gradients ``(o, i)`` where they are formed (several
          positions, or a tied head, in the second pass and in scoring): twice (rotated), once for
          a tied head in the second pass (its diagonal ``G`` rotates nothing);
        - when ``scoring``: the flat per-sample gradients and their solve (``3 x p``).
        """
        one = batches.slice_rows(batch, 0, 1)
        with torch.no_grad(), _FORWARD_LOCK, Capture(self._captured, 1, ids=self._tied_uses) as capture:
            outputs = self._functions.outputs(theta, one)
        itemsize = torch.empty((), dtype=self.dtype).element_size()
        c = int(outputs[0].numel())
        r = 1 if scoring else self.config.fisher_draws if self._sampled(outputs) else c
        pieces = [("the model outputs", c * itemsize), ("the vectors back-propagated", r * c * itemsize)]
        if scoring:
            pieces.append(("the flat per-sample gradients and their solve (3 x p)", 3 * self.num_params * itemsize))
        grads: list[tuple[str, int]] = []  # a layer's per-sample gradients (o, i): one layer at a time
        for layer, inputs in zip(self._captured, capture.inputs):
            o, i = layer.shape
            positions = sum(int(a.shape[1]) for a in inputs)
            if any(layer is use for use in self._tied_uses):
                blocks = (r * o * itemsize + 8) * positions
                pieces.append((f"the output gradients and token ids of the tied use '{layer.name}'", blocks))
                continue
            blocks = (r * o + i) * positions * itemsize
            pieces.append((f"the output gradients and inputs of layer '{layer.name}'", blocks))
            formed = positions > 1 or layer.tied_use is not None
            if formed and (scoring or self.update_diagonal):
                copies = 1 if layer.tied_use is not None and not scoring else 2
                grads.append((f"the per-sample gradients of layer '{layer.name}'", copies * o * i * itemsize))
        if grads:
            pieces.append(max(grads, key=lambda piece: piece[1]))
        del capture, outputs
        return pieces

    def _chunk(self, theta: Tensor, batch: Any, *, scoring: bool) -> int:
        """Samples per chunk (see :meth:`_fit_chunk`); ``scoring``: for the gradients of influences,
        self-influences and factors (one vector per sample; the flat ``(m, p)`` gradients and their
        solve), beside the fitted state. ``chunk_size`` halved until ``chunk x`` one sample's
        :meth:`chunk_pieces` fit the room the factors leave in ``memory_budget``, said in one line (an
        INFO log record for the default ``chunk_size``, a ``UserWarning`` for another one: the user's)."""
        key = (scoring, *(tuple(leaf.shape[1:]) for leaf in batches.leaves(batch) if isinstance(leaf, Tensor)))
        if key in self._fit_chunks:
            return self._fit_chunks[key]
        pieces = self.chunk_pieces(theta, batch, scoring=scoring)
        per_sample = sum(size for _, size in pieces)
        held = self.state_.nbytes if scoring and self.state_ is not None else self.memory_.fixed
        room = self.memory_budget - held
        task = "scoring" if scoring else "fit"
        beside = "state" if scoring else "factors"
        what, size = max(pieces, key=lambda piece: piece[1])
        if per_sample > room:
            fix = "smaller test or training batches" if scoring else "fisher='sampled' (fewer vectors per sample)"
            raise ValueError(
                f"EK-FAC's {task} cannot hold one sample's blocks ({_bytes(per_sample)}; the largest, {what}, "
                f"{_bytes(size)}) beside its {beside} ({_bytes(held)}) within "
                f"memory_budget={_bytes(self.memory_budget)}. Pass a larger memory_budget, {fix}, shorter "
                "sequences, or leave the layer out with layers=[...]."
            )
        chunk = self.chunk_size
        while chunk > 1 and chunk * per_sample > room:
            chunk = max(1, chunk // 2)
        if chunk < self.chunk_size:
            given = self.chunk_size != EkfacConfig.__dataclass_fields__["chunk_size"].default  # the user's choice
            message = (
                f"EK-FAC's {task} runs in chunks of {chunk} samples: {self.chunk_size} "
                f"({'chunk_size' if given else 'the default chunk_size'}) would hold "
                f"{_bytes(self.chunk_size * per_sample)} of per-chunk blocks (the largest, {what}, "
                f"{_bytes(size)} per sample) beside its {beside} ({_bytes(held)}), beyond "
                f"memory_budget={_bytes(self.memory_budget)}; pass chunk_size={chunk} or a larger memory_budget "
                "to choose."
            )
            if given:
                warnings.warn(message, UserWarning, stacklevel=2)
            else:
                logger.info(message)
        self._fit_chunks[key] = chunk
        return chunk

    def check_loss(self, batch: Any) -> None:
        """Engine hook. The checks of every solver on the first training batch, then EK-FAC's memory for batches
        of its shapes (a one-line refusal before any pass where one sample's blocks do not fit)."""
        super().check_loss(batch)
        self._fit_chunk(self.trained_parameters(), batch)

    # -- the output curvature: exact roots or the sampled Fisher ---------------------------------
    def _sampled(self, outputs: Tensor) -> bool:
        """Whether the fit back-propagates the sampled Fisher (else the exact roots) for these outputs."""
        choice = self.config.fisher
        if choice == "exact":
            return False
        can = self._output.can_sample(outputs)
        if choice == "sampled" and not can:
            raise ValueError(
                "fisher='sampled' draws labels from the model's predictive distribution, which is known for "
                "softmax cross-entropy over (n, c) logits, mean squared error and the causal-LM task; this "
                f"loss ({type(self._output.output_loss).__name__}, "
                f"output_curvature={self.config.output_curvature!r}) has none. Use fisher='exact'."
            )
        return can and (choice == "sampled" or int(outputs[0].numel()) > EXACT_ROOTS_BUDGET)

    def _fisher_vectors(self, outputs: Tensor, batch: Any, offset: int, check: bool) -> Tensor:
        """The vectors to back-propagate for ``G``: ``(r, n, *outputs.shape[1:])``."""
        if self._sampled(outputs):
            if check:
                self._output.check_sampled(outputs, batch)
            return self._output.sampled(outputs, batch, self.config.fisher_draws, self.config.seed, offset)
        if check:
            self._output.check(outputs, batch)
        return self._output.roots(outputs, batch)

    # -- fitting --------------------------------------------------------------------------------
    def _progress_title(self) -> str:
        return "EK-FAC" if self.update_diagonal else "K-FAC"

    def _fit_passes(self) -> int | None:
        return 2 if self.update_diagonal else 1

    def _pass_name(self, fn: Any, payload: Any) -> str:
        if getattr(fn, "__name__", "") == "ekfac_block":
            return {"covariance": "Kronecker factors", "corrected": "eigenvalue correction"}.get(payload[0], payload[0])
        return super()._pass_name(fn, payload)

    def _fit(self, operator: LinearOperator, blocks: BlockSums) -> None:
        def sweep(kind: str, factors: Sequence[LayerFactors] | None, each: Each | None = None) -> list[Any]:
            return list(blocks.sum(ekfac_block, (kind, None if factors is None else tuple(factors)), each))

        self.fit_from_sums(blocks.n, sweep)

    def fit_from_sums(self, n: int, sweep: Callable[..., list[Any]]) -> None:
        """Engine hook. Fit from sums over the training blocks of :meth:`block_sums`.

        ``sweep(kind, factors, each)`` must return the elementwise sum, over every block of the
        training data, of ``block_sums(kind, theta, batch_b, offset=start_b, factors=factors)``
        (:meth:`_fit` sums :func:`ekfac_block` over the fit's blocks), or with ``each``
        (:class:`~..blocks.Each`) the list of ``each.function(element, each.argument)`` over
        that sum's elements. ``A`` and ``G`` are eigendecomposed so, in float64, where the sums
        are (on a cluster: on its workers, :func:`~..kronecker.eigen_factor`); with
        ``update_diagonal`` a second sweep sums the corrected eigenvalues.

        Args:
            n: the number of training samples the sums cover.
        """
        costs = []
        for layer in self._layers:  # eigh of an (m, m) matrix costs about m^3; a diagonal factor m
            diagonal_a, diagonal_g = self._diagonal_sides(layer)
            o, i = layer.shape
            costs += [float(i if diagonal_a else i**3), float(o if diagonal_g else o**3)]
        eigen = sweep("covariance", None, Each(eigen_factor, (n, self.dtype), tuple(costs)))
        title = f"{self._progress_title()} fit: eigendecompositions"  # done with the pass, where its sums are
        meter = _progress.current().meter(title, len(self._layers), "layers")
        factors = [LayerFactors(layer.name, *eigen[2 * i], *eigen[2 * i + 1]) for i, layer in enumerate(self._layers)]
        del eigen
        meter.advance(len(self._layers))
        meter.finish()
        if self.update_diagonal:  # the means in float32 where the sums are (on a cluster: its workers)
            sizes = tuple(float(layer.shape[0] * layer.shape[1]) for layer in self._layers)
            corrected = sweep("corrected", tuple(factors), Each(mean_in, (n, self.dtype), sizes))
            factors = [
                LayerFactors(f.name, f.q_a, f.lambda_a, f.q_g, f.lambda_g, c.to(self.device))
                for f, c in zip(factors, corrected)
            ]
        self.state_ = EkfacState(layers=tuple(factors), n_train=n)
        self._check_positive()

    def _diagonal_sides(self, layer: KroneckerLayer) -> tuple[bool, bool]:
        """Whether ``layer``'s ``A`` and its ``G`` are kept diagonal (one-hot inputs; the memory plan's fallback)."""
        return layer.diagonal_a or (layer.name, "A") in self._diagonal, (layer.name, "G") in self._diagonal

    def block_sums(
        self,
        kind: str,
        theta: Tensor,
        batch: Any,
        *,
        offset: int = 0,
        factors: Sequence[LayerFactors] | None = None,
        out: list[Tensor] | None = None,
    ) -> list[Tensor]:
        """Engine hook. One block's float64 contribution to a fitting pass, in chunks of ``chunk_size``.

        Args:
            kind: ``"covariance"``: per layer the sums of ``A`` ``(i, i)`` and ``G`` ``(o, o)``
                over the block's samples, as ``[A_0, G_0, A_1, G_1, ...]``; ``"corrected"``:
                per layer the sum ``(o, i)`` of the squared per-sample gradients rotated into
                the eigenbases of ``factors`` (from the first pass).
            theta: the trained parameters ``(p,)``.
            batch: the block's samples (validated tensors on the model's device).
            offset: the index of the block's first sample in the training data (for
                messages; the loss's output curvature is checked on sample 0).
            out: sums of earlier blocks to add this block's into, in place (one set of sums
                for a whole in-process pass); ``None``: new sums.

        Returns:
            the per-block sums; added over all blocks they are the unnormalized totals.
        """
        step = self._fit_chunk(theta, batch)
        if kind == "covariance":
            if out is None:
                sums = [
                    FactorSums(layer.name, layer.shape, self.device, *self._diagonal_sides(layer))
                    for layer in self._layers
                ]
            else:
                sums = [
                    FactorSums.from_totals(layer.name, out[2 * i], out[2 * i + 1])
                    for i, layer in enumerate(self._layers)
                ]
            for s in range(0, batches.size(batch), step):
                pieces = self._capture(
                    theta,
                    batches.slice_rows(batch, s, s + step),
                    fisher=True,
                    offset=offset + s,
                    check=offset + s == 0,
                    finite_check=False,
                )
                for acc, (g, a) in zip(sums, pieces):
                    acc.add(g, a)
                self._check_sums([t for acc in sums for t in (acc.a, acc.g)], pieces, offset + s)
            return [t for acc in sums for t in (acc.a, acc.g)]
        if kind == "corrected":
            if factors is None or len(factors) != len(self._layers):
                raise ValueError("block_sums('corrected', ...) needs the layer factors of the first pass.")
            totals = (
                out
                if out is not None
                else [torch.zeros(f.shape, dtype=torch.float64, device=self.device) for f in factors]
            )
            for s in range(0, batches.size(batch), step):
                pieces = self._capture(
                    theta,
                    batches.slice_rows(batch, s, s + step),
                    fisher=True,
                    offset=offset + s,
                    finite_check=False,
                )
                for layer, total, f, (g, a) in zip(self._layers, totals, factors, pieces):
                    if layer.tied_use is None:
                        corrected_eigenvalue_sum(f, g, a, out=total)
                        continue
                    use = pieces[len(self._layers) + self._tied_index(layer)]
                    for r in range(g.shape[1]):  # both uses' gradient per vector
                        rotated_square_sum(f, tied_layer_grads((g, a), use, r, inputs_basis=f.q_a), out=total)
                self._check_sums(totals, pieces, offset + s)
            return totals
        raise ValueError(f"kind must be 'covariance' or 'corrected'; got {kind!r}.")

    def _capture(
        self,
        theta: Tensor,
        batch: Any,
        *,
        fisher: bool,
        offset: int = 0,
        check: bool = False,
        finite_check: bool = True,
    ) -> list[tuple[Tensor, Tensor]]:
        """Per layer ``(g, a)``: ``g`` ``(n, r, P, o)``, ``a`` ``(n, P, i)``.

        ``finite_check``: raise :class:`NonFiniteError` naming a sample whose ``g`` is NaN/Inf
        (the fitting passes check their sums instead, see :meth:`_check_sums`).

        ``fisher=False``: ``r = 1``, the gradient of each sample's loss at its target.
        ``fisher=True``: ``r = c``, back-propagating the columns of ``S``, ``S S^T = H_out``.
        """
        with torch.enable_grad():
            # The hooks live on the (shared) modules and functional_call swaps their
            # parameters, so hook registration, the forward and hook removal all run under the
            # process-wide forward lock of core.gradients: threads sharing one model (a Dask
            # worker's threads) then never see each other's hooks or parameters. The backward
            # below only uses this call's own probes and graph, so it runs outside the lock.
            with _FORWARD_LOCK, Capture(self._captured, batches.size(batch), ids=self._tied_uses) as capture:
                outputs = self._functions.outputs(theta, batch)
            o = outputs.detach()
            vectors = self._fisher_vectors(o, batch, offset, check) if fisher else self._output.gradients(o, batch)
            result = capture.collect(outputs, vectors)
        if finite_check:
            self._check_finite(result, offset)
        return result

    def _check_finite(self, pieces: list[tuple[Tensor, Tensor]], offset: int) -> None:
        """Raise :class:`NonFiniteError` naming the first sample whose captured output gradient is NaN/Inf."""
        for layer, (g, _) in zip(self._layers, pieces):
            bad = ~torch.isfinite(g)
            if bool(bad.any()):
                row = int(torch.nonzero(bad)[0, 0])
                raise NonFiniteError(
                    f"The gradient in the output of layer '{layer.name}' is NaN/Inf for sample "
                    f"{offset + row}. Check the model and the loss for overflow (e.g. log of 0)."
                )

    def _check_sums(self, sums: Sequence[Tensor], pieces: list[tuple[Tensor, Tensor]], offset: int) -> None:
        """After a chunk is added into the float64 ``sums``: a NaN/Inf there names its sample (the
        captured tensors are scanned only then; a pass over them per chunk cost 13% of a fit)."""
        if all(math.isfinite(float(t.sum())) for t in sums):  # one reduction; a NaN/Inf anywhere makes it one
            return
        self._check_finite(pieces, offset)
        n = pieces[0][1].shape[0] if pieces else 0
        raise NonFiniteError(
            f"EK-FAC's curvature sums became NaN/Inf with samples {offset} to {offset + n - 1} (their output "
            "gradients are finite: a layer input is NaN/Inf, or the products overflowed). Check the model and "
            "the data for overflow, or fit in float64."
        )

    # -- curvature ------------------------------------------------------------------------------
    def _factors(self) -> tuple[LayerFactors, ...]:
        if self.state_ is None:
            raise NotFittedError(f"This {type(self).__name__} is not fitted yet; call .fit(train_loader) first.")
        return self.state_.layers

    def _check_positive(self) -> None:
        for f in self._factors():
            check_layer_positive(f, self.regularization, self.update_diagonal, type(self).__name__)

    def _apply(self, rhs: Tensor, *, power: float, regularization: float, out: Tensor | None = None) -> Tensor:
        """``(C + regularization I)^power`` on each row of ``rhs`` ``(k, p)``, layer by layer, into ``out``
        ``(k, p)`` (a new tensor if ``None``; ``rhs`` itself to solve in place: each layer's block is read
        whole before its solution is written back); parameters outside the layers get zero."""
        if out is rhs:
            for start, stop in self._outside_layers():
                out[:, start:stop] = 0
        else:
            out = torch.zeros_like(rhs) if out is None else out.zero_()
        for layer, f in zip(self._layers, self._factors()):
            m = layer.to_matrix(rhs)
            layer.write_matrix(
                f.apply_power(m, power=power, regularization=regularization, corrected=self.update_diagonal), out
            )
        return out

    def _outside_layers(self) -> list[tuple[int, int]]:
        """The ranges ``[start, stop)`` of the flat parameters that no layer's block covers."""
        covered = sorted(r for layer in self._layers for r in (layer.weight, layer.bias) if r)
        gaps, at = [], 0
        for start, stop in covered:
            if start > at:
                gaps.append((at, start))
            at = max(at, stop)
        if at < self.num_params:
            gaps.append((at, self.num_params))
        return gaps

    def _solve(self, rhs: Tensor) -> Tensor:
        """``(C + lambda I)^-1`` applied to each row of ``rhs`` ``(k, p)``, layer by layer: ``(k, p)``."""
        self._check_positive()
        return self._apply(rhs, power=-1.0, regularization=self.regularization)

    solves_in_place = True

    def _solve_into(self, rhs: Tensor, out: Tensor) -> None:
        """The engine's hook: :meth:`_solve` written into ``out`` ``(m, p)`` (each layer's solution lands in
        its slice; no ``(m, p)`` solution beside the output); no report."""
        self._check_positive()
        self._apply(rhs, power=-1.0, regularization=self.regularization, out=out)

    def curvature_matrix(self) -> Tensor:
        """The dense, unregularized block-diagonal approximation ``(p, p)`` (small models only)."""
        self._require_fitted()
        eye = torch.eye(self.num_params, dtype=self.dtype, device=self.device)
        return self._apply(eye, power=1.0, regularization=0.0)

    # -- influences: the base class's scoring hooks, layer by layer --------------------------------
    def _pieces(self, theta: Tensor, batch: Any) -> Iterator[list[tuple[Tensor, Tensor] | Tensor]]:
        """Per chunk of a prepared batch, per layer ``(g (m, P, o), a (m, P, i))`` at the true targets;
        for a tied LM head its per-sample gradients through both uses ``(m, V, i)``
        (:func:`~..kronecker.tied_layer_grads`: the embedding's share added to token rows)."""
        step = self._chunk(theta, batch, scoring=True)  # chunk_size, or fewer to fit memory_budget
        for s in range(0, batches.size(batch), step):
            chunk = batches.slice_rows(batch, s, s + step)
            pieces = self._capture(theta, chunk, fisher=False, offset=s)
            yield [
                (g[:, 0], a)
                if layer.tied_use is None
                else tied_layer_grads((g, a), pieces[len(self._layers) + self._tied_index(layer)], 0)
                for layer, (g, a) in zip(self._layers, pieces)
            ]

    def _tied_index(self, layer: KroneckerLayer) -> int:
        """The place of ``layer``'s tied embedding use among the captured uses (after the layers)."""
        return [lay.name for lay in self._layers if lay.tied_use is not None].index(layer.name)

    def _flat_grads(self, theta: Tensor, batch: Any) -> Iterator[Tensor]:
        """Per chunk, flat per-sample gradients ``(m, p)`` assembled from ``sum_t g_t a_t^T``."""
        for pieces in self._pieces(theta, batch):
            first = pieces[0]
            m = (first if isinstance(first, Tensor) else first[0]).shape[0]
            flat = torch.zeros(m, self.num_params, dtype=self.dtype, device=self.device)
            for layer, piece in zip(self._layers, pieces):
                layer.write_matrix(piece if isinstance(piece, Tensor) else layer_grads(*piece), flat)
            yield flat

    def per_sample_grads_from_factors(self, *points: Any) -> Tensor:
        """Per-sample gradients ``(n, p)`` assembled from the layers' ``sum_t g_t a_t^T``.

        Equal to :meth:`per_sample_grads` (by ``torch.func``) on the layers' parameters;
        meant for checks and debugging.
        """
        theta = self._require_fitted()
        return torch.cat(list(self._flat_grads(theta, self._batch(points, ("x", "y")))))

    def _test_gradients(self, theta: Tensor, batch: Any) -> Iterator[Tensor]:
        """The test gradients per chunk, assembled from the layers (the base class's hook); a task's
        own measurement (not the layers' loss gradients) by the base class's route."""
        if self.objective.measurement is not None:
            yield from super()._test_gradients(theta, batch)
            return
        meter = _progress.current().meter(f"{self._progress_title()} influence factors", batches.size(batch), "points")
        for flat in self._flat_grads(theta, batch):
            yield flat
            meter.advance(flat.shape[0])
        meter.finish()

    def _up_influences(self, theta: Tensor, factors: Tensor, batch: Any) -> Tensor:
        """Up-weighting influences ``(n_test, n)`` (the base class's hook).

        On a model with more than :data:`FLAT_SCORING_MAX_PARAMS` parameters, layer by layer
        from the layers' inputs and output gradients, without flat ``(n, p)`` training
        gradients; on smaller models, where the hooks and the per-layer contractions cost more
        than the gradients, by the flat route of the other solvers (vmapped per-sample
        gradients and one product). Both give the same numbers.
        """
        if self.num_params <= FLAT_SCORING_MAX_PARAMS:
            return super()._up_influences(theta, factors, batch)
        parts = []
        for pieces in self._pieces(theta, batch):  # the factors' layer blocks are read in place (no copies)
            parts.append(
                cast(Tensor, sum(up_scores(layer, factors, piece) for layer, piece in zip(self._layers, pieces)))
            )
        return torch.cat(parts, dim=1)

    def _up_influences_by_columns(self, theta: Tensor, factors: FactorColumns, batch: Any) -> Tensor:
        """Up-weighting influences ``(n_test, n)`` against factors read by columns (the base class's hook).

        On a model with more than :data:`FLAT_SCORING_MAX_PARAMS` parameters, the layers' inputs and output
        gradients of consecutive chunks are held within :meth:`held_gradient_bytes`, then each layer's columns
        are read in slabs (:func:`~..kronecker_scores.column_parts`) and contracted with every held chunk;
        on smaller models by the flat route. The same numbers as :meth:`_up_influences`."""
        if self.num_params <= FLAT_SCORING_MAX_PARAMS:
            return super()._up_influences_by_columns(theta, factors, batch)
        rows = factors.shape[0]
        out = torch.zeros(rows, batches.size(batch), dtype=self.dtype, device=self.device)

        def chunks() -> Iterator[tuple[int, list[Any]]]:
            start = 0
            for pieces in self._pieces(theta, batch):
                yield start, pieces
                first = pieces[0]
                start += (first if isinstance(first, Tensor) else first[0]).shape[0]

        for group in held_groups(chunks(), tensor_bytes, self.held_gradient_bytes()):
            for position, layer in enumerate(self._layers):
                for part, (a, b), narrow in column_parts(layer, rows, self.dtype.itemsize):
                    slab = factors.columns(a, b).to(device=self.device, dtype=self.dtype)
                    for start, pieces in group:
                        scores = up_scores(part, slab, narrow(pieces[position]))
                        out[:, start : start + scores.shape[1]] += scores
        return out

    def _self_influences(self, theta: Tensor, batch: Any) -> tuple[Tensor, Any]:
        """``grad L(z)^T (C + lambda I)^-1 grad L(z)`` per point ``(n,)``, layer by layer (the base
        class's hook); no report."""
        self._check_positive()
        inverse = [1.0 / (f.eigenvalues(self.update_diagonal) + self.regularization) for f in self._factors()]
        parts = []
        meter = _progress.current().meter(f"{self._progress_title()} self-influences", batches.size(batch), "points")
        for pieces in self._pieces(theta, batch):
            terms = (self_contract(f, d, piece) for f, d, piece in zip(self._factors(), inverse, pieces))
            parts.append(cast(Tensor, sum(terms)))
            meter.advance(parts[-1].shape[0])
        meter.finish()
        return torch.cat(parts), None
