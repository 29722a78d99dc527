"""Projected per-sample gradients of a model and task: what a gradient index stores per block.

A :class:`Projector` is built once on the driver and shipped to each worker once (it holds the
model, the task and the seeded projection, never a ``(k, p)`` matrix). Its methods take a
block (a batch of numpy arrays or tensors) and return numpy arrays.
"""

from __future__ import annotations

import hashlib
import pickle
import warnings
from typing import Any, SupportsIndex, cast

import numpy as np
import torch
from torch import Tensor, nn

from ..core import batches, pickling
from ..core.data import pair_batch
from ..core.gradients import (
    _FORWARD_LOCK,
    ModelFunctions,
    ParamSpec,
    _is_data_dependent,
    _row,
    check_finite,
    flat_params,
    second_order,
)
from ..core.kronecker import Capture
from ..core.projection import (
    KINDS,
    GaussianProjection,
    KroneckerProjection,
    OrthogonalProjection,
    Projection,
    SparseProjection,
    from_record,
)
from ..core.task import Task, as_task

CHUNK_ENTRIES = 1 << 22
"""Per-sample-gradient numbers per vmapped call: ``CHUNK_ENTRIES // p`` samples (16 to 1,024)."""

CHUNK_MAX_ENTRIES = 1 << 28
"""Per-sample-gradient numbers per call that a model of many parameters may reach (1 GiB in float32)."""

CURVATURE_COLUMNS = 32
"""Projected directions per batched curvature product (memory: ``p * CURVATURE_COLUMNS``)."""


class Projector:
    """Per-sample gradients of ``task`` at the model's parameters, projected to ``k`` dimensions.

    Args:
        model: the trained model (its trainable parameters are ``theta``, length ``p``).
        task: a :class:`~dask_influence.Task` or a pair loss ``loss(outputs, targets)``.
        projection: ``"sjlt"``, ``"gaussian"``, ``"orthogonal"``, ``"kronecker"``, or a
            recorded description (:meth:`Projection.describe`).
        dim: ``k`` (ignored with a recorded description).
        seed: the projection's seed (ignored with a recorded description).
        layers: with ``"kronecker"``, the names of the layers to project (default: every
            supported layer with trainable weights; other parameters are left out).
    """

    def __init__(
        self,
        model: nn.Module,
        task: Any,
        projection: str | dict = "sjlt",
        dim: int = 1024,
        seed: int = 0,
        *,
        layers: list[str] | None = None,
    ):
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module; got {type(model).__name__}.")
        self.model = model
        self.task: Task = as_task(task)
        self.spec = ParamSpec.from_model(model)
        self.functions = ModelFunctions(model, self.task, self.spec)
        self.theta = flat_params(model, self.spec).detach()
        self.layers: list = []
        p = self.spec.num_params
        kind = projection.get("kind") if isinstance(projection, dict) else projection
        if kind not in KINDS:
            raise ValueError(f"projection must be one of {', '.join(map(repr, KINDS))}; got {projection!r}.")
        if kind == "kronecker":
            from ..core.solvers.ekfac import find_layers, left_out_parameters

            chosen = projection.get("layer_names") if isinstance(projection, dict) else layers
            with warnings.catch_warnings():  # EK-FAC's wording; the index says it its own way below
                warnings.filterwarnings("ignore", message="EK-FAC leaves out", category=UserWarning)
                self.layers = find_layers(model, self.spec, chosen)
            left_out = left_out_parameters(self.spec, self.layers)
            if left_out and not isinstance(projection, dict):
                warnings.warn(
                    "projection='kronecker' projects Linear, Conv2d, Conv1D and Embedding layers; these "
                    f"trainable parameters are left out of the index (as if frozen): {', '.join(left_out)}. "
                    "Use projection='sjlt' to keep every parameter.",
                    UserWarning,
                    stacklevel=3,
                )
        self.projection: Projection
        if isinstance(projection, dict):
            if int(projection.get("num_params", -1)) != p:
                raise ValueError(
                    f"The index was built for a model with {projection.get('num_params')} trainable parameters; "
                    f"this model has {p}."
                )
            self.projection = from_record(projection)
        elif kind == "kronecker":
            shapes = [(layer.name, *layer.shape) for layer in self.layers]
            self.projection = KroneckerProjection(p, dim, seed, shapes)
        else:
            cls = {"sjlt": SparseProjection, "gaussian": GaussianProjection, "orthogonal": OrthogonalProjection}[kind]
            self.projection = cls(p, dim, seed)

    def __reduce__(self) -> tuple:
        """Pickle a snapshot taken under the process-wide forward lock.

        A Dask worker sends its projector to another worker from its event-loop thread while
        its task thread may be inside a forward, where ``functional_call`` has swapped the
        model's parameters for functorch wrappers that cannot be serialized (the transfer, and
        the job, would stall): as the solvers do, serialize only while no forward runs."""
        return self.__reduce_ex__(pickle.DEFAULT_PROTOCOL)

    def __reduce_ex__(self, protocol: SupportsIndex) -> tuple:
        """With pickle protocol 5 (Dask's), the same snapshot with the model's and the projection's
        large tensors as out-of-band buffers (:mod:`~dask_influence.core.pickling`: no copies)."""
        with _FORWARD_LOCK:
            return (_restore, pickling.dump_state(self.__dict__, buffered=int(protocol) >= 5))

    @property
    def chunk_size(self) -> int:
        """Samples per vmapped per-sample-gradient call (memory ``chunk_size * p`` numbers): ``CHUNK_ENTRIES // p``
        (16 to 1,024), and below 16 only where 16 samples would pass :data:`CHUNK_MAX_ENTRIES` (at 124M
        parameters 2 samples, 1 GB: 16 were 7.9 GB, and a query of 16 GPT-2-small sequences ended its worker)."""
        p = max(1, self.spec.num_params)
        return max(min(16, max(1, CHUNK_MAX_ENTRIES // p)), min(1024, CHUNK_ENTRIES // p))

    # -- identity ---------------------------------------------------------------------------
    @property
    def dim(self) -> int:
        """``k``, the projected dimension."""
        return self.projection.dim

    @property
    def dtype(self) -> torch.dtype:
        """The model's parameter dtype."""
        return self.theta.dtype

    @property
    def device(self) -> torch.device:
        """The model's device."""
        return self.theta.device

    def model_checksum(self) -> str:
        """sha256 of the trainable parameters (what an index is valid for)."""
        return hashlib.sha256(self.theta.cpu().contiguous().numpy().tobytes()).hexdigest()

    def describe_projection(self) -> dict[str, Any]:
        """The projection's description, with the chosen layer names for ``kronecker``."""
        record = self.projection.describe()
        if self.layers:
            record["layer_names"] = [layer.name for layer in self.layers]
        return record

    # -- batches ----------------------------------------------------------------------------
    def batch(self, block: Any, name: str = "the batch") -> Any:
        """A block (numpy arrays or tensors; ``(x, y)`` for a pair loss) as tensors on the model's device."""
        if self.task.pairs:
            block = tuple(block) if isinstance(block, list) else block
            if not (isinstance(block, tuple) and len(block) == 2):
                raise TypeError(f"With a pair loss, {name} must be a pair (x, y); got {batches.structure(block)}.")
            return pair_batch(block, self.dtype, self.device, ("x", "y"))
        batch = batches.to_tensors(block, name, dtype=self.dtype, device=self.device)
        batches.check(batch, name)
        return batch

    # -- projected gradients ------------------------------------------------------------------
    def project(self, block: Any, *, measurement: bool = False) -> np.ndarray:
        """Projected per-sample gradients of a block: ``(n, k)`` in the model's dtype.

        ``measurement``: of the task's measurement (test side) instead of its loss.
        """
        batch = self.batch(block)
        n = batches.size(batch)
        out = torch.empty(n, self.dim, dtype=self.dtype, device=self.device)
        step = self.chunk_size
        for start in range(0, n, step):
            chunk = batches.slice_rows(batch, start, min(start + step, n))
            if isinstance(self.projection, KroneckerProjection):
                out[start : start + step] = self._kronecker(chunk, measurement)
            else:
                grads = self.functions.per_sample_grads(self.theta, chunk, measurement=measurement)
                out[start : start + step] = self.projection.project(grads)
        check_finite("projected gradients", out, hint="Check the model and the loss for overflow.")
        return out.detach().cpu().numpy()

    def _kronecker(self, batch: Any, measurement: bool) -> Tensor:
        """Per layer, ``sum_t (P_out g_t)(P_in a_t)^T`` from one forward and one backward of the
        batch (the per-sample gradient is never formed): ``(n, k)``."""
        projection = self.projection
        assert isinstance(projection, KroneckerProjection)
        layers = self._kronecker_layers(batch, measurement)
        return torch.cat([projection.project_layer(i, g, a) for i, (g, a) in enumerate(layers)], dim=1)

    def project_factors(self, block: Any, rank: int) -> tuple[np.ndarray, np.ndarray, float, float]:
        """A block's projected loss gradients as per-layer factors (``projection="kronecker"``,
        :mod:`.factored`): ``factors_out`` ``(n, r, sum k_o)`` and ``factors_in`` ``(n, r, sum k_i)``
        in the model's dtype, per layer ``sum_r u_r v_r^T`` the ``(k_o, k_i)`` projected gradient
        (its positions' own pairs, or its best rank-``r`` part), and the squared Frobenius norms
        dropped and in total, summed over the block's samples and layers."""
        from .factored import factorize

        projection = self.projection
        assert isinstance(projection, KroneckerProjection)
        batch = self.batch(block)
        n = batches.size(batch)
        widths = (sum(d[0] for d in projection.layer_dims), sum(d[1] for d in projection.layer_dims))
        out = torch.empty(n, rank, widths[0], dtype=self.dtype, device=self.device)
        into = torch.empty(n, rank, widths[1], dtype=self.dtype, device=self.device)
        dropped = total = 0.0
        step = self.chunk_size
        for start in range(0, n, step):
            chunk = batches.slice_rows(batch, start, min(start + step, n))
            pieces = []
            for index, (g, a) in enumerate(self._kronecker_layers(chunk, False)):
                p_out, p_in = projection.factors(index, dtype=g.dtype, device=g.device)
                pieces.append((g @ p_out.T, a @ p_in.T))
            u, v, d, t = factorize(pieces, rank)
            out[start : start + step], into[start : start + step] = u, v
            dropped, total = dropped + float(d.sum()), total + float(t.sum())
        for name, values in (("factors_out", out), ("factors_in", into)):
            check_finite(f"projected gradient {name}", values, hint="Check the model and the loss for overflow.")
        return out.detach().cpu().numpy(), into.detach().cpu().numpy(), dropped, total

    def positions(self, block: Any) -> list[int]:
        """``T_l``, the positions per sample of each Kronecker layer (all its calls) on ``block``'s
        first sample."""
        batch = batches.slice_rows(self.batch(block), 0, 1)
        return [int(g.shape[1]) for g, _ in self._kronecker_layers(batch, False)]

    def _kronecker_layers(self, batch: Any, measurement: bool) -> list[tuple[Tensor, Tensor]]:
        """Per layer its output gradients ``g`` ``(n, T, o)`` and inputs ``a`` ``(n, T, i)`` over the
        positions of all its calls, from one forward and one backward of the batch.

        The batch's mean loss times ``n`` is the sum of the per-sample losses, and a sample's
        loss depends on its own outputs only, so the gradient in each layer output is that
        sample's gradient."""
        fn = self.task.measure() if measurement else self.task.loss
        n = batches.size(batch)
        with torch.enable_grad():
            with _FORWARD_LOCK, Capture(self.layers, n) as capture:
                value = self.functions.apply(self.theta, fn, batch)
            probes = [p for ps in capture.probes for p in ps]
            grads = torch.autograd.grad(value * n, probes, allow_unused=True)
        parts, at = [], 0
        for index, (layer, calls) in enumerate(zip(self.layers, capture.probes)):
            pieces = []
            for probe in calls:
                g = grads[at]
                pieces.append(layer.output_grads(torch.zeros_like(probe) if g is None else g))
                at += 1
            g_all = pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=1)
            a_all = torch.cat(capture.inputs[index], dim=1)
            parts.append((g_all.detach(), a_all))
        return parts

    def project_flat(self, vectors: Tensor) -> Tensor:
        """``P v`` for each row of ``vectors`` ``(m, p)``: ``(m, k)``."""
        projection = self.projection
        if not isinstance(projection, KroneckerProjection):
            return projection.project(vectors)
        parts = []
        for index, layer in enumerate(self.layers):
            p_out, p_in = projection.factors(index, dtype=vectors.dtype, device=vectors.device)
            m = layer.to_matrix(vectors)  # (m, o, i)
            parts.append((p_out @ m @ p_in.T).reshape(vectors.shape[0], -1))
        return torch.cat(parts, dim=1)

    def columns(self, start: int, stop: int) -> Tensor:
        """Rows ``start:stop`` of ``P`` as columns of the flat layout: ``(p, stop - start)``."""
        projection = self.projection
        if not isinstance(projection, KroneckerProjection):
            return projection.columns(start, stop, dtype=self.dtype, device=self.device)
        out = torch.zeros(stop - start, self.spec.num_params, dtype=self.dtype, device=self.device)
        offsets = projection.offsets()
        for index, layer in enumerate(self.layers):
            a, b = max(start, offsets[index]), min(stop, offsets[index + 1])
            if a >= b:
                continue
            m = projection.layer_columns(
                index, a - offsets[index], b - offsets[index], dtype=self.dtype, device=self.device
            )
            layer.write_matrix(m, out[a - start : b - start])
        return out.T

    def curvature(self, block: Any, curvature: str, sampled: dict | None = None, offset: int = 0) -> np.ndarray:
        """``P C_b P^T`` ``(k, k)`` float64 for a block: ``C_b`` the Hessian (``"hessian"``) or the
        generalized Gauss-Newton (``"ggn"``) of the block's mean loss.

        The GGN is ``(1/n) sum_i sum_r (P J_i^T s_ir)(P J_i^T s_ir)^T`` with ``S_i S_i^T`` the
        Hessian of sample ``i``'s loss in its ``c`` outputs: ``c`` projected per-sample
        backward passes (a classifier: its number of classes), used when ``c <= k``. Otherwise
        (and for the Hessian) ``k`` curvature-vector products, ``CURVATURE_COLUMNS`` at a time.

        ``sampled`` (``{"draws": d, "seed": s}``, GGN only): the true Fisher instead, with the
        ``s_ir`` the ``d`` sampled roots of :mod:`dask_influence.core.sampled_fisher` (labels
        drawn from the model's predictive distribution, seeded by ``s`` and each sample's index
        ``offset + i`` in the training data): ``d`` backward passes per sample, an unbiased
        estimate of the projected GGN (cross-entropy, causal LM, mean squared error)."""
        batch = self.batch(block)
        if curvature == "ggn":
            with torch.no_grad():
                outputs = self.functions.outputs(self.theta, batch)
            roots = self._roots(batch, outputs, sampled, offset)
            if roots is not None:
                return self._ggn_from_roots(batch, roots)[0]
        product = self.functions.hessian_matmat if curvature == "hessian" else self.functions.ggn_matmat
        out = torch.empty(self.dim, self.dim, dtype=torch.float64)
        with second_order():
            for start in range(0, self.dim, CURVATURE_COLUMNS):
                stop = min(start + CURVATURE_COLUMNS, self.dim)
                cv = product(self.theta, batch, self.columns(start, stop))  # (p, c)
                out[:, start:stop] = self.project_flat(cv.T).T.double().cpu()
        check_finite("the projected curvature", out, hint="Check the model and the loss for overflow.")
        return out.numpy()

    def _output_curvature(self) -> Any:
        from ..core.solvers.ekfac import OutputCurvature, infer_task

        loss = getattr(self.task.loss, "fn", None) if self.task.pairs else None
        kind = infer_task(loss, self.task.output_curvature)
        assert self.task.output_loss is not None  # ggn needs outputs (checked when building)
        return OutputCurvature(self.task.output_loss, kind)

    def sampling(self, block: Any) -> tuple[bool, int]:
        """Whether the sampled Fisher is known for the task's outputs on ``block`` (softmax
        cross-entropy, the causal-LM task, mean squared error), and the number ``c`` of exact
        output-curvature roots per sample (the exact projected GGN's backward passes)."""
        if not self.task.has_outputs:
            return False, 0
        batch = self.batch(block)
        with torch.no_grad():
            outputs = self.functions.outputs(self.theta, batch)
        output = self._output_curvature()
        can = output.can_sample(outputs)
        if can:
            output.check_sampled(outputs, batch)
        return can, int(outputs[0].numel())

    def _roots(self, batch: Any, outputs: Tensor, sampled: dict | None, offset: int) -> Tensor | None:
        """The output-curvature roots ``(r, n, *outputs.shape[1:])`` the projected GGN sums over: the sampled
        Fisher's draws (``sampled``), the leading exact roots (``sampled["kind"] == "leading"``) or all ``c``
        exact ones; ``None`` where the exact GGN has more roots than ``k`` (it is formed by ``k`` products)."""
        trace = float(sampled["trace"]) if sampled is not None and sampled.get("kind") == "leading" else None
        if sampled is not None and trace is None:
            output = self._output_curvature()
            return output.sampled(outputs, batch, int(sampled["draws"]), int(sampled["seed"]), offset)
        if outputs[0].numel() > self.dim:
            return None
        curvature = self._output_curvature()
        curvature.check(outputs, batch)
        roots = curvature.roots(outputs, batch)  # (c, n, *outputs.shape[1:])
        return roots if trace is None else leading_roots(roots, trace)

    def gradients_and_ggn(self, block: Any, sampled: dict | None, offset: int = 0) -> tuple[np.ndarray, np.ndarray]:
        """Both passes of a GGN index's build in one: the block's projected loss gradients ``(n, k)`` (as
        :meth:`project`) and its projected GGN ``(k, k)`` float64 (as :meth:`curvature` with ``"ggn"``).

        The loss gradient in the outputs is one more vector back-propagated beside the output-curvature
        roots, from the same forward per sample: one forward and ``r + 1`` backward passes where the two
        passes took two forwards (and, with the Kronecker projection, one forward per root). Where the exact
        GGN is formed by products (more outputs than ``k``) the two are computed one after the other."""
        batch = self.batch(block)
        with torch.no_grad():
            outputs = self.functions.outputs(self.theta, batch)
        roots = self._roots(batch, outputs, sampled, offset)
        if roots is None:
            return self.project(block), self.curvature(block, "ggn", sampled, offset)
        total, grads = self._ggn_from_roots(batch, roots, loss=self._loss_vectors(batch, outputs))
        assert grads is not None
        check_finite("projected gradients", grads, hint="Check the model and the loss for overflow.")
        return grads.detach().cpu().numpy(), total

    def _loss_vectors(self, batch: Any, outputs: Tensor) -> Tensor:
        """Each sample's loss gradient in its own outputs: ``(n, *outputs.shape[1:])`` (the loss of a batch
        of one, as :meth:`project`'s per-sample gradients take it)."""
        output_loss = self.task.output_loss
        assert output_loss is not None  # ggn needs outputs (checked when building)

        def one(o: Tensor, sample: Any) -> Tensor:
            return output_loss(o.unsqueeze(0), batches.unsqueeze(sample))

        outputs = outputs.detach()
        if self.functions._vmap_samples:
            try:  # every sample's gradient in one vectorized call (a loop over 64 sequences: 20% of a small build)
                return cast(Tensor, torch.func.vmap(torch.func.grad(one))(outputs, batch))
            except RuntimeError as err:  # data-dependent control flow in the loss: one sample at a time
                if not _is_data_dependent(err):
                    raise
        out = outputs.requires_grad_(True)
        with torch.enable_grad():
            n = batches.size(batch)
            losses = [output_loss(out[j : j + 1], batches.slice_rows(batch, j, j + 1)) for j in range(n)]
            (grads,) = torch.autograd.grad(cast(Tensor, sum(losses)), out)
        return grads

    def _ggn_from_roots(
        self, batch: Any, roots: Tensor, loss: Tensor | None = None
    ) -> tuple[np.ndarray, Tensor | None]:
        """The projected GGN of a batch's mean loss from the output-curvature roots ``roots`` ``(r, n, ...)``:
        ``(k, k)`` float64; with ``loss`` ``(n, ...)`` (:meth:`_loss_vectors`) also the projected loss
        gradients ``(n, k)``, back-propagated from the same forwards as the roots (else ``None``)."""
        if loss is not None:
            roots = torch.cat([loss.unsqueeze(0).to(roots.dtype), roots])
        first = 0 if loss is None else 1  # the vectors from here on are roots
        n, r = batches.size(batch), roots.shape[0]
        total = torch.zeros(self.dim, self.dim, dtype=torch.float64)
        grads = None if loss is None else torch.empty(n, self.dim, dtype=self.dtype, device=self.device)
        step = max(1, self.chunk_size // r)  # a chunk's samples x vectors in one vectorized call
        for start in range(0, n, step):
            stop = min(start + step, n)
            rows = batches.slice_rows(batch, start, stop)
            phi = self._vjps(rows, roots[:, start:stop].to(self.dtype))  # (m, r, k)
            if grads is not None:
                grads[start:stop] = phi[:, 0]
            part = phi[:, first:].reshape(-1, self.dim)
            total += (part.T @ part).double().cpu()  # in phi's dtype (see tasks.gram_block), summed in float64
        total /= n
        check_finite("the projected curvature", total, hint="Check the model and the loss for overflow.")
        return total.numpy(), grads

    def _vjps(self, batch: Any, vectors: Tensor) -> Tensor:
        """``P J_i^T v_ri`` for each sample ``i`` and vector ``r`` of ``vectors`` ``(r, m, ...)``: ``(m, r, k)``.

        One forward per sample where it can be shared (the Kronecker projection: one captured forward and a
        backward per vector; other projections: ``torch.func.vjp`` vmapped over the vectors); else the samples
        are repeated, one vector each (a model ``vmap`` cannot batch)."""
        r, m = vectors.shape[0], vectors.shape[1]
        if isinstance(self.projection, KroneckerProjection):
            return self._kronecker_vjps(batch, vectors)
        phi = self._shared_forward_vjps(batch, vectors) if r > 1 else None
        if phi is not None:
            return phi.reshape(m, r, -1)
        copies = batches.concat([batch] * r) if r > 1 else batch  # root-major copies
        phi = self._projected_vjps(copies, vectors.reshape(r * m, *vectors.shape[2:]))
        return phi.reshape(r, m, -1).transpose(0, 1)

    def _kronecker_vjps(self, batch: Any, vectors: Tensor) -> Tensor:
        """:meth:`_vjps` with the Kronecker projection: per layer ``sum_t (P_out g_rt)(P_in a_t)^T`` of each
        vector's output gradients ``g_r`` from one captured forward: ``(m, r, k)``."""
        outputs_fn = self.task.outputs
        assert outputs_fn is not None
        projection = self.projection
        assert isinstance(projection, KroneckerProjection)
        m, r = vectors.shape[1], vectors.shape[0]
        with torch.enable_grad():
            with _FORWARD_LOCK, Capture(self.layers, m) as capture:
                outputs = self.functions.apply(self.theta, outputs_fn, batch)
            pieces = capture.collect(outputs, vectors)  # per layer g (m, r, P, o), a (m, P, i)
        parts = []
        for index, (g, a) in enumerate(pieces):
            p_out, p_in = projection.factors(index, dtype=g.dtype, device=g.device)
            parts.append(torch.einsum("nrto,nti->nroi", g @ p_out.T, a @ p_in.T).reshape(m, r, -1))
        return torch.cat(parts, dim=2)

    def _shared_forward_vjps(self, batch: Any, roots: Tensor) -> Tensor | None:
        """``P J_i^T v_ri`` for every sample ``i`` and root ``r`` of ``roots`` ``(r, m, ...)`` from ONE
        forward per sample (``torch.func.vjp``, its pullback vmapped over the roots): ``(m * r, k)``,
        sample-major (row ``i * r + r'``: :meth:`_vjps` reads it as ``(m, r, k)``). ``None`` where a model
        vmap cannot batch: the caller repeats the samples instead. Not for the Kronecker projection
        (:meth:`_kronecker_vjps`)."""
        if not self.functions._vmap_samples:
            return None
        outputs_fn = self.task.outputs
        assert outputs_fn is not None
        params = self.spec.unflatten(self.theta)

        def pullbacks(sample: Any, vectors: Tensor) -> dict[str, Tensor]:
            def outputs(p: dict[str, Tensor]) -> Tensor:
                return self.functions.apply(p, outputs_fn, batches.unsqueeze(sample))[0]

            pullback = torch.func.vjp(outputs, params)[1]
            return cast(dict[str, Tensor], torch.func.vmap(lambda v: pullback(v)[0])(vectors))

        try:
            grads = torch.func.vmap(pullbacks, in_dims=(0, 1))(batch, roots)  # {name: (m, r, *shape)}
        except RuntimeError as err:  # data-dependent control flow: the caller's path falls back
            if not _is_data_dependent(err):
                raise
            return None
        m, r = roots.shape[1], roots.shape[0]
        flat = torch.cat([grads[k].reshape(m * r, -1) for k in self.spec.names], dim=1)
        return self.projection.project(flat)

    def _projected_vjps(self, batch: Any, vectors: Tensor) -> Tensor:
        """``P J_i^T v_i`` for each sample ``i`` (``J_i`` its outputs' Jacobian): ``(n, k)``."""
        outputs_fn = self.task.outputs
        assert outputs_fn is not None and not isinstance(self.projection, KroneckerProjection)  # see _vjps
        params = self.spec.unflatten(self.theta)

        def dotted(p: dict[str, Tensor], sample: Any, v: Tensor) -> Tensor:
            return (self.functions.apply(p, outputs_fn, batches.unsqueeze(sample))[0] * v).sum()

        n = vectors.shape[0]
        grads: dict[str, Tensor] | None = None
        if self.functions._vmap_samples:
            try:
                grads = torch.func.vmap(torch.func.grad(dotted), in_dims=(None, 0, 0))(params, batch, vectors)
            except RuntimeError as err:  # data-dependent control flow (e.g. a Hugging Face padding-mask check)
                if not _is_data_dependent(err):
                    raise
                self.functions._vmap_samples = False  # as per_sample_grads does: one sample at a time from now on
        if grads is None:
            one = torch.func.grad(dotted)
            rows = [one(params, _row(batch, i), vectors[i]) for i in range(n)]
            grads = {k: torch.stack([r[k] for r in rows]) for k in self.spec.names}
        flat = torch.cat([grads[k].reshape(n, -1) for k in self.spec.names], dim=1)
        return self.projection.project(flat)


LEADING_ROOTS_MAX_OUTPUTS = 64
"""Outputs per sample up to which :func:`leading_roots` eigendecomposes each sample's ``c x c``
output Hessian (beyond, the roots are kept whole)."""


def leading_roots(roots: Tensor, trace: float) -> Tensor:
    """The fewest leading eigen-roots of each sample's output Hessian that hold ``trace`` of the
    block's total: ``(m, n, *shape)`` from ``roots`` ``(r, n, *shape)``, ``m <= r`` the same for
    every sample of the block.

    ``H_i = sum_r s_ir s_ir^T`` ``(c, c)`` is eigendecomposed per sample (float64) and
    ``sqrt(lambda_ij) u_ij`` kept for its ``m`` largest eigenvalues, ``m`` the smallest count with
    ``sum_i sum_{j < m} lambda_ij >= trace * sum_i tr(H_i)``: the projected GGN then leaves out
    at most ``1 - trace`` of the curvature's trace, in the directions each sample curves least.
    A softmax classifier that predicts confidently holds most of its curvature in one or two
    directions (the digits MLP: 79% in the first, 97% in three, 99% in four of its ten), so the
    GGN costs ``m`` projected backward passes per sample instead of ``c``.
    """
    r, n = roots.shape[0], roots.shape[1]
    c = int(roots[0, 0].numel())
    if c > LEADING_ROOTS_MAX_OUTPUTS or r <= 1 or n == 0:
        return roots
    s = roots.reshape(r, n, c).permute(1, 2, 0).double()  # (n, c, r)
    values, vectors = torch.linalg.eigh(s @ s.transpose(1, 2))  # ascending
    values, vectors = values.flip(-1).clamp_min(0), vectors.flip(-1)
    held = values.sum(0).cumsum(0)  # the block's trace held by the first m directions
    total = float(held[-1])
    if total <= 0:
        return roots[:1]
    m = int(torch.searchsorted(held, torch.tensor(trace * total, dtype=held.dtype)).item()) + 1
    m = min(max(m, 1), values.shape[1])
    kept = vectors[:, :, :m] * values[:, None, :m].sqrt()  # (n, c, m)
    return kept.permute(2, 0, 1).reshape(m, *roots.shape[1:]).to(roots.dtype)


def _restore(*state: Any) -> Projector:
    """A projector from :meth:`Projector.__reduce_ex__`'s snapshot (:func:`~..core.pickling.dump_state`'s
    arguments)."""
    projector = Projector.__new__(Projector)
    projector.__dict__.update(pickling.load_state(*state))
    return projector
