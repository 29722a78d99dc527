"""Gradients of a user's model and task with ``torch.func``.

Notation: ``p`` is the number of trainable parameters (those with ``requires_grad``; frozen
parameters and buffers are held fixed), ``n`` the number of samples in a batch. A batch is
a pytree of tensors of shape ``(n, ...)`` (:mod:`.batches`): ``(x, y)`` for a pair loss, a
dict for a Hugging Face model.

The per-sample loss of one point ``z`` is the task's batch loss evaluated on a batch of one
(every leaf's row ``i``, with a sample dimension of 1), e.g. ``loss(model(x_i[None]),
y_i[None])`` for a pair loss. For a loss with mean reduction this makes the batch loss the
mean of the per-sample losses, and the training objective whose curvature the solvers use
is the mean of the per-sample losses over the whole training set.
"""

from __future__ import annotations

import contextlib
import threading
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, jacfwd, jacrev, vmap
from torch.utils._pytree import tree_flatten

from ..errors import NonFiniteError
from . import batches
from .batches import check_finite  # noqa: F401  (re-exported: its home until session 9)

if TYPE_CHECKING:
    from .task import Task

LossFn = Callable[[Tensor, Tensor], Tensor]

# functional_call swaps the module's parameters for the given tensors during the call, so two
# threads sharing one model (threads of a Dask worker) must not run forwards at the same time.
# The autograd graph keeps the tensors themselves, so only the forward needs the lock.
_FORWARD_LOCK = threading.RLock()

# Forward-mode AD (torch.func.jvp, jacfwd) is NOT thread-local: its dual levels live in one
# process-wide stack (torch/csrc/autograd/forward_grad.h), entered and exited by every thread.
# Two threads in jvp at once (two tasks of one threaded Dask worker, or a worker thread and the
# driver of an in-process cluster) exit each other's levels, which clears the other's tangents
# mid-computation: wrong curvature products without an error, or "Trying to access a forward
# AD level with an invalid index". Every forward-mode computation of this package runs inside
# second_order(), which holds this lock for its duration (so one thread at a time in a process;
# reverse mode, vmap and grad keep their levels per thread and run concurrently). The lock also
# makes second_order()'s process-wide attention switches safe: no other thread is inside.
# Lock order: _SECOND_ORDER_LOCK, then _FORWARD_LOCK (never the other way round).
_SECOND_ORDER_LOCK = threading.RLock()


@dataclass(frozen=True)
class ParamSpec:
    """The layout of the trainable parameters inside one flat vector of length ``p``.

    Attributes:
        names: parameter names as in ``model.named_parameters()``, in flattening order.
        shapes: the shape of each parameter.
        dtype, device: those of the first trainable parameter (all must agree).
    """

    names: tuple[str, ...]
    shapes: tuple[torch.Size, ...]
    dtype: torch.dtype
    device: torch.device

    @classmethod
    def from_model(cls, model: nn.Module) -> ParamSpec:
        """The spec of ``model``'s trainable parameters (``requires_grad=True``), in order."""
        named = [(k, v) for k, v in model.named_parameters() if v.requires_grad]
        if not named:
            raise ValueError(
                "The model has no trainable parameters (none with requires_grad=True); "
                "influence is taken with respect to trainable parameters, so unfreeze at "
                "least one layer."
            )
        dtypes = {v.dtype for _, v in named}
        devices = {v.device for _, v in named}
        if len(dtypes) > 1 or len(devices) > 1:
            raise ValueError(
                f"All trainable parameters must share one dtype and device; got dtypes "
                f"{sorted(map(str, dtypes))} and devices {sorted(map(str, devices))}. "
                "Call model.to(dtype, device) first."
            )
        if not named[0][1].dtype.is_floating_point:
            raise TypeError(f"Trainable parameters must be floating point; got {named[0][1].dtype}.")
        return cls(
            names=tuple(k for k, _ in named),
            shapes=tuple(v.shape for _, v in named),
            dtype=named[0][1].dtype,
            device=named[0][1].device,
        )

    @property
    def numels(self) -> tuple[int, ...]:
        """Number of elements of each parameter tensor."""
        return tuple(int(torch.Size(s).numel()) for s in self.shapes)

    @property
    def num_params(self) -> int:
        """``p``, the length of the flat parameter vector."""
        return sum(self.numels)

    def offsets(self) -> list[tuple[str, int, int]]:
        """``(name, start, stop)`` of each parameter inside the flat vector."""
        out, start = [], 0
        for name, k in zip(self.names, self.numels):
            out.append((name, start, start + k))
            start += k
        return out

    def layer_slices(self) -> list[tuple[str, int, int]]:
        """``(module name, start, stop)`` of each layer's parameters in the flat vector.

        A layer is the module that owns a parameter (``"0.weight"`` and ``"0.bias"`` both
        belong to ``"0"``); its parameters are contiguous because ``named_parameters`` lists
        them together.
        """
        out: list[tuple[str, int, int]] = []
        for name, start, stop in self.offsets():
            module = name.rsplit(".", 1)[0] if "." in name else ""
            if out and out[-1][0] == module and out[-1][2] == start:
                out[-1] = (module, out[-1][1], stop)
            else:
                out.append((module, start, stop))
        return out

    def name_of_index(self, index: int) -> str:
        """The name of the parameter that holds flat position ``index``."""
        for name, start, stop in self.offsets():
            if start <= index < stop:
                return name
        raise IndexError(f"flat index {index} is outside 0..{self.num_params - 1}")

    def flatten(self, tensors: dict[str, Tensor], batch_dims: int = 0) -> Tensor:
        """Concatenate ``{name: (*batch, *shape)}`` into ``(*batch, p)``."""
        parts = []
        for name in self.names:
            t = tensors[name]
            parts.append(t.reshape(*t.shape[:batch_dims], -1))
        return torch.cat(parts, dim=-1)

    def unflatten(self, flat: Tensor) -> dict[str, Tensor]:
        """Split a flat ``(p,)`` vector into ``{name: shape}`` views."""
        out = {}
        for (name, start, stop), shape in zip(self.offsets(), self.shapes):
            out[name] = flat[start:stop].view(shape)
        return out


def flat_params(model: nn.Module, spec: ParamSpec) -> Tensor:
    """The trainable parameters of ``model`` as one detached vector ``(p,)``.

    Read under the forward lock: while another thread is inside a forward of the same model
    (two tasks of a threaded Dask worker share its copy), ``functional_call`` has replaced
    the model's parameters with that thread's functorch wrappers (GradTrackingTensors, dual
    tensors of its transform levels). Detached outside those levels they happen to give the
    weights' values, but nothing guarantees it; under the lock the model holds its own
    parameters (see :data:`_FORWARD_LOCK`).
    """
    with _FORWARD_LOCK:
        named = dict(model.named_parameters())
        return torch.cat([named[k].detach().reshape(-1) for k in spec.names])


class _Bound(nn.Module):
    """The user's model as a submodule, so that ``functional_call`` can swap its parameters
    for the duration of ANY function of the model (a task's loss, outputs or measurement)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, fn: Callable[[nn.Module, Any], Tensor], batch: Any) -> Tensor:
        return fn(self.model, batch)


HIDDEN_RANDOMNESS = (
    "The model draws random numbers in its forward even in eval() (torch.func refused a random "
    "operation, e.g. F.dropout(x, training=True) or torch.randn inside forward): its gradients, and "
    "so its influences, would change from call to call. Make forward deterministic in eval(), e.g. "
    "F.dropout(x, p, training=self.training) or an nn.Dropout module, and call model.eval()."
)
"""The refusal of a model whose forward is random in ``eval()`` (dropout modules in training
mode are refused before, by the solver's model check)."""


def _is_data_dependent(err: Exception) -> bool:
    """Whether ``err`` is vmap refusing data-dependent control flow (``.item()``, ``if t.any()``)."""
    text = str(err)
    return "data-dependent control flow" in text or "calling .item()" in text or "vmap" in text and ".item" in text


class ModelFunctions:
    """Pure functions of the flat trainable parameters, built once per (model, task).

    All functions take the flat parameter vector ``theta`` of shape ``(p,)`` first and a
    batch (a pytree of tensors, see :mod:`.batches`), so ``torch.func`` transforms compose
    over them.

    Args:
        model: the trained model.
        task: the :class:`~.task.Task` (a pair loss ``loss(outputs, targets)`` is
            :func:`~.task.pair_task` of it).
    """

    def __init__(self, model: nn.Module, task: Task, spec: ParamSpec | None = None):
        self.model = model
        self.task = task
        self.spec = spec or ParamSpec.from_model(model)
        self._bound = _Bound(model)
        # per-sample gradients are vmapped until a model refuses vmap (data-dependent control
        # flow, e.g. Hugging Face's SDPA mask check); then one sample at a time
        self._vmap_samples = True

    # -- forward pieces ------------------------------------------------------------
    def apply(
        self, theta_or_params: Tensor | dict[str, Tensor], fn: Callable[[nn.Module, Any], Tensor], batch: Any
    ) -> Tensor:
        """``fn(model, batch)`` with the model's trainable parameters replaced by ``theta``
        (a flat vector or ``{name: tensor}``), under the forward lock."""
        params = theta_or_params if isinstance(theta_or_params, dict) else self.spec.unflatten(theta_or_params)
        with _FORWARD_LOCK:
            try:
                return functional_call(self._bound, {"model." + k: v for k, v in params.items()}, (fn, batch))
            except RuntimeError as err:
                if "randomness" in str(err) and "vmap" in str(err):  # torch.func's refusal of a random op
                    raise ValueError(HIDDEN_RANDOMNESS) from None
                raise

    def outputs(self, theta: Tensor, batch: Any) -> Tensor:
        """Model outputs for a batch (the task's ``outputs``): ``(n, ...)``, one tensor (a model
        returning a tuple is refused: the GGN, EK-FAC and the gradient index need one)."""
        if self.task.outputs is None:
            raise ValueError(
                f"The task {self.task.name!r} does not give the model outputs; pass "
                "Task(outputs=..., output_loss=...) to use curvature='ggn' or EK-FAC."
            )
        out = self.apply(theta, self.task.outputs, batch)
        if not isinstance(out, Tensor):
            raise TypeError(
                f"The model returned a {type(out).__name__}, not one tensor of outputs: curvature='ggn', "
                "EK-FAC and the gradient index's curvature preconditioners need the outputs the loss reads as "
                "one tensor. Use curvature='hessian' (Direct, CG, LiSSA, Arnoldi, Nystroem) or an index with "
                "preconditioner='none', or pass a dask_influence.Task whose outputs(model, batch) returns that "
                "tensor and whose output_loss(outputs, batch) takes it."
            )
        return out

    def batch_loss(self, theta: Tensor, batch: Any) -> Tensor:
        """The task's loss on a batch (mean over the batch): a scalar."""
        return self.apply(theta, self.task.loss, batch)

    def activation_bytes(self, theta: Tensor, batch: Any) -> int:
        """Bytes of the largest tensor any module of the model returns for ONE sample: the first
        sample of ``batch``, one forward without gradients. A batched curvature product keeps
        about this much per layer for every sample and vector it carries. ``0`` when that
        forward fails (the product itself will then say why)."""
        largest = 0

        def hook(module: nn.Module, inputs: Any, output: Any) -> None:
            nonlocal largest
            for leaf in tree_flatten(output)[0]:
                if isinstance(leaf, Tensor):
                    largest = max(largest, leaf.numel() * leaf.element_size())

        # under the forward lock: another thread's forward must not reach the hooks
        with _FORWARD_LOCK:
            handles = [m.register_forward_hook(hook) for m in self.model.modules()]
            try:
                with torch.no_grad():
                    self.batch_loss(theta, batches.slice_rows(batch, 0, 1))
            except Exception:  # a sizing pass only: the real product raises the real error
                return 0
            finally:
                for handle in handles:
                    handle.remove()
        return largest

    def sample_loss(self, theta: Tensor, sample: Any) -> Tensor:
        """The loss of one sample (leaves without their batch dimension): a scalar."""
        return self.apply(theta, self.task.loss, batches.unsqueeze(sample))

    def sample_grad(self, theta: Tensor, sample: Any) -> Tensor:
        """Gradient of one sample's loss in the parameters: ``(p,)``."""
        return grad(self.sample_loss)(theta, sample)

    # -- batched first and mixed derivatives ----------------------------------------
    def per_sample_grads(
        self, theta: Tensor, batch: Any, *, out: Tensor | None = None, measurement: bool = False
    ) -> Tensor:
        """Per-sample gradients of a batch: ``(n, p)``.

        Differentiates in the per-parameter tensors (views of ``theta``) and writes them side
        by side into the flat layout once. Differentiating in the flat vector itself would
        make autograd scatter every parameter's gradient into a zero-filled ``(n, p)`` block
        and add those up, several times the memory traffic of the gradients themselves.
        A model that vmap cannot batch (data-dependent control flow in its forward) is
        differentiated one sample at a time, with the same results.

        Args:
            out: optional contiguous ``(n, p)`` tensor to write into (saves one copy).
            measurement: differentiate the task's measurement instead of its loss.
        """
        blocks = self._vmapped_grad_blocks(theta, batch, measurement)
        if blocks is not None:
            return torch.cat(blocks, dim=1, out=out)
        return self._looped_grads(theta, batch, out, measurement)

    def per_sample_grad_blocks(self, theta: Tensor, batch: Any) -> list[Tensor]:
        """Per-sample gradients of a batch as one ``(n, numel_k)`` block per trainable tensor, in
        the flat layout's order (their concatenation is :meth:`per_sample_grads`), without
        copying them side by side; one ``(n, p)`` block for a model vmap cannot batch."""
        blocks = self._vmapped_grad_blocks(theta, batch, False)
        return blocks if blocks is not None else [self._looped_grads(theta, batch, None, False)]

    def _sample_loss_fn(self, measurement: bool) -> Callable[[dict[str, Tensor], Any], Tensor]:
        fn = self.task.measure() if measurement else self.task.loss

        def sample_loss(p: dict[str, Tensor], sample: Any) -> Tensor:
            return self.apply(p, fn, batches.unsqueeze(sample))

        return sample_loss

    def _vmapped_grad_blocks(self, theta: Tensor, batch: Any, measurement: bool) -> list[Tensor] | None:
        """``[(n, numel_k), ...]`` by vmap, or ``None`` once vmap has refused the model (then
        :meth:`_looped_grads`; the refusal is warned about once)."""
        if not self._vmap_samples:
            return None
        params = self.spec.unflatten(theta)
        n = batches.size(batch)
        try:
            grads = vmap(grad(self._sample_loss_fn(measurement)), in_dims=(None, 0))(params, batch)
        except RuntimeError as err:
            if not _is_data_dependent(err):
                raise
            self._vmap_samples = False
            warnings.warn(
                "torch.func.vmap cannot batch this model's forward (data-dependent control flow, "
                "e.g. Hugging Face's SDPA attention, or a 2-D padding mask checked in Python); "
                "per-sample gradients are taken one sample at a time (the same numbers, about 4-10x slower). "
                "For a Hugging Face model, put attn_implementation='eager' in its config "
                "(GPT2Config(..., attn_implementation='eager'), from_pretrained(..., attn_implementation='eager') "
                "or model.set_attn_implementation('eager'); not Model(config, attn_implementation=...)); with a "
                "padding mask (BERT), pass it as a 4-D additive float mask, "
                "(1.0 - mask[:, None, None, :].float()) * torch.finfo(torch.float32).min. See docs/tasks.md.",
                UserWarning,
                stacklevel=3,
            )
            return None
        return [grads[k].reshape(n, -1) for k in self.spec.names]

    def _looped_grads(self, theta: Tensor, batch: Any, out: Tensor | None, measurement: bool) -> Tensor:
        """``(n, p)`` one sample at a time, into ``out`` when given."""
        params = self.spec.unflatten(theta)
        n = batches.size(batch)
        result = (
            out if out is not None else torch.empty(n, self.spec.num_params, dtype=theta.dtype, device=theta.device)
        )
        one = grad(self._sample_loss_fn(measurement))
        for i in range(n):
            g = one(params, _row(batch, i))
            torch.cat([g[k].reshape(-1) for k in self.spec.names], out=result[i])
        return result

    def mixed_grads(self, theta: Tensor, batch: Any, path: str | int) -> Tensor:
        """Mixed derivatives ``d/dx grad_theta L(z_i)`` in the input leaf ``path`` of a batch:
        ``(n, p, *x.shape[1:])``.

        Materializes ``n * p * d`` numbers; the solvers use :meth:`contracted_mixed_grads`
        instead, which never does.
        """
        return _jacobian_in_leaf(lambda sample: self.sample_grad(theta, sample), batch, path, self.spec.num_params)

    def contracted_mixed_grads(self, theta: Tensor, factors: Tensor, batch: Any, path: str | int) -> Tensor:
        """``factors @ d/dx grad_theta L(z_j)`` for every sample ``j`` of a batch, ``x`` the
        input leaf at ``path``.

        Args:
            factors: ``(t, p)``, e.g. influence factors of ``t`` test points.
            batch: a batch of ``n`` samples.

        Returns:
            ``(t, n, *x.shape[1:])``: entry ``[i, j, ...]`` is the derivative of
            ``factors[i] . grad_theta L(z_j)`` in ``x_j``. Costs ``min(t, d)``
            second-order passes per sample (``d`` input features).
        """

        def projected(sample: Any) -> Tensor:
            return factors @ self.sample_grad(theta, sample)  # (t,)

        return _jacobian_in_leaf(projected, batch, path, factors.shape[0]).movedim(0, 1)

    # -- curvature-vector products ----------------------------------------------------
    def hessian_matmat(self, theta: Tensor, batch: Any, v: Tensor) -> Tensor:
        """Hessian of the batch loss times a block of vectors ``v`` ``(p, k)``: ``(p, k)``.

        Reverse over reverse: one forward and backward pass that keeps its graph, then ``k``
        double-backward passes batched with ``vmap`` (one without ``vmap`` when ``k = 1``).
        Measured against forward over reverse (``jvp`` of ``grad``) with torch 2.13 on one
        core: 1.8x faster on a 1e4-parameter MLP, 1.5x on a tiny GPT-2 and 1.1x on a small CNN
        for one vector (Lanczos, power iterations), 0.9-1.2x for 16. Attention runs on the
        math backend of ``scaled_dot_product_attention`` here (see :func:`second_order`).
        """
        loss_grad = grad(lambda t: self.batch_loss(t, batch))
        with second_order():
            _, hvp = _vjp(loss_grad, theta)
            if v.shape[1] == 1:
                return hvp(v[:, 0])[0][:, None]
            return vmap(lambda col: hvp(col)[0], in_dims=1, out_dims=1)(v)

    def ggn_matmat(self, theta: Tensor, batch: Any, v: Tensor) -> Tensor:
        """Generalized Gauss-Newton ``J^T H_out J`` of the batch loss times ``v`` ``(p, k)``.

        ``J`` is the Jacobian of the model outputs in the parameters and ``H_out`` the
        Hessian of the loss in the outputs; the product is positive semi-definite whenever
        the loss is convex in the outputs. Returns ``(p, k)``.

        ``H_out u`` is taken in closed form where the loss has one
        (:func:`~.sampled_fisher.hessian_form`: softmax cross-entropy per position
        ``p * u - p (p . u)``, the causal-LM task's, mean squared error), otherwise by
        differentiating the loss's gradient in the outputs (one more backward per vector).
        """
        from .sampled_fisher import hessian_form

        output_loss = self.task.output_loss
        if output_loss is None:
            self.outputs(theta, batch)  # raises, naming what the task lacks
            raise AssertionError  # unreachable
        with second_order():
            out, jt = _vjp(lambda t: self.outputs(t, batch), theta)
            logits = out.detach()
            h_out = hessian_form(output_loss, logits, batch)
            if h_out is None:  # no closed form: differentiate the loss's gradient in the outputs
                _, h_vjp = _vjp(grad(lambda o: output_loss(o, batch)), logits)

                def by_autograd(u: Tensor) -> Tensor:
                    return h_vjp(u)[0]

                h_out = by_autograd

            def gvp(col: Tensor) -> Tensor:
                jv = torch.func.jvp(lambda t: self.outputs(t, batch), (theta,), (col,))[1]
                return jt(h_out(jv))[0]

            return vmap(gvp, in_dims=1, out_dims=1)(v)

    def ggn_dense_sum(
        self,
        theta: Tensor,
        batch: Any,
        ranges: Sequence[tuple[int, int]],
        *,
        max_entries: int = 2**25,
        max_outputs: int | None = None,
    ) -> list[Tensor] | None:
        """``sum_i J_i^T H_i J_i`` over the samples of a batch, restricted to each range ``(a, b)``
        of the parameters: ``[(b - a, b - a), ...]`` (a SUM over samples: the GGN of the batch's
        mean loss is it divided by ``n``). ``None`` when the task gives no outputs, or outputs
        that are not one tensor or have more than ``max_outputs`` entries per sample.

        ``J_i`` ``(c, p)`` is the Jacobian of sample ``i``'s outputs (``c`` entries) in the
        parameters, by vmapped reverse mode (``c`` backward passes per sample), and ``H_i``
        ``(c, c)`` the Hessian of its loss in its outputs. Exact for the GGN, and for small
        ``c`` far cheaper than ``p`` GGN-vector products. With ``H_i = R_i R_i^T`` (a convex
        loss: :func:`psd_roots`) the sum is the Gram matrix of the rows ``R_i^T J_i``, formed
        by :func:`add_gram_` (the upper blocks only). Samples are taken in sub-chunks
        holding at most ``max_entries`` numbers of ``J`` (the memory bound: ``8 * max_entries``
        bytes in float64).
        """
        task = self.task
        output_loss = task.output_loss
        if task.outputs is None or output_loss is None:
            return None
        params = self.spec.unflatten(theta)
        names = self.spec.names
        outputs_fn = task.outputs

        def sample_outputs(p: dict[str, Tensor], sample: Any) -> Tensor:
            return self.apply(p, outputs_fn, batches.unsqueeze(sample)).reshape(-1)

        def sample_output_loss(o: Tensor, sample: Any, shape: tuple[int, ...]) -> Tensor:
            return output_loss(o.reshape(shape).unsqueeze(0), batches.unsqueeze(sample))

        n = batches.size(batch)
        with torch.no_grad():
            first = self.apply(params, outputs_fn, batches.slice_rows(batch, 0, 1))
        if not isinstance(first, Tensor) or (max_outputs is not None and int(first[0].numel()) > max_outputs):
            return None
        shape, c = tuple(first.shape[1:]), int(first[0].numel())
        step = max(1, int(max_entries // max(1, c * self.spec.num_params)))
        totals = [theta.new_zeros(b - a, b - a) for a, b in ranges]
        for s0 in range(0, n, step):
            chunk = batches.slice_rows(batch, s0, s0 + step)
            jac = vmap(jacrev(sample_outputs), in_dims=(None, 0))(params, chunk)
            m = batches.size(chunk)
            j = torch.cat([jac[k].reshape(m, c, -1) for k in names], dim=2)  # (m, c, p)
            outs = vmap(sample_outputs, in_dims=(None, 0))(params, chunk).detach()
            h = vmap(jacrev(jacrev(sample_output_loss)), in_dims=(0, 0, None))(outs, chunk, shape)  # (m, c, c)
            roots = psd_roots(h)
            if roots is None:  # a loss not convex in the outputs: sum_i J_i^T (H_i J_i), one GEMM
                j2, hj2 = j.reshape(m * c, -1), (h @ j).reshape(m * c, -1)
                for total, (a, b) in zip(totals, ranges):
                    total.addmm_(j2[:, a:b].T, hj2[:, a:b])
                continue
            rows = (roots.transpose(1, 2) @ j).reshape(-1, j.shape[2])  # (m r, p): the R_i^T J_i
            for total, (a, b) in zip(totals, ranges):
                add_gram_(total, rows[:, a:b])  # sum_i (R_i^T J_i)^T (R_i^T J_i)
        return totals


def psd_roots(h: Tensor) -> Tensor | None:
    """``R`` ``(m, c, r)`` with ``R_i R_i^T = h_i`` for symmetric positive semi-definite ``h``
    ``(m, c, c)``, in ``h``'s dtype; ``None`` when some ``h_i`` has an eigenvalue below minus the
    rounding level ``c * eps * max|eigenvalue|``. Eigendirections whose eigenvalue is within that
    level of zero in every sample are left out (cross-entropy's along the ones vector), so
    ``r <= c``."""
    wide = h.double()
    values, vectors = torch.linalg.eigh(0.5 * (wide + wide.transpose(1, 2)))  # ascending per sample
    tol = h.shape[1] * torch.finfo(h.dtype).eps * float(values.abs().max())
    if bool((values < -tol).any()):
        return None
    keep = (values > tol).any(dim=0)
    return (vectors[:, :, keep] * values[:, keep].clamp_min(0).sqrt()[:, None, :]).to(h.dtype)


GRAM_BLOCK = 256
"""Columns per block of :func:`add_gram_`. Measured with torch 2.13 (MKL) on one core of the
2-core machine: ``A^T A`` for ``A`` ``(7,210, 4,650)`` float32 in blocks of 256-768 columns took
0.40-0.44x the time of one full GEMM (half the multiply-adds, and blocks that stay in cache),
``(20,000, 1,066)`` 0.44x at 256 and 0.52-0.58x at 512-1,024."""


def add_gram_(total: Tensor, a: Tensor) -> None:
    """``total += a^T a`` for ``a`` ``(m, q)`` and ``total`` ``(q, q)``: the blocks on and above
    the diagonal, :data:`GRAM_BLOCK` columns each, each off-diagonal one added twice (itself and
    its transpose)."""
    q = a.shape[1]
    edges = [*range(0, q, GRAM_BLOCK), q]
    for i in range(len(edges) - 1):
        lo, hi = edges[i], edges[i + 1]
        for k in range(i, len(edges) - 1):
            product = a[:, lo:hi].T @ a[:, edges[k] : edges[k + 1]]
            total[lo:hi, edges[k] : edges[k + 1]] += product
            if k > i:
                total[edges[k] : edges[k + 1], lo:hi] += product.T


def _row(batch: Any, i: int) -> Any:
    """Sample ``i`` of a batch, without the sample dimension."""
    return batches.map_leaves(lambda t: t[i], batch)


@contextlib.contextmanager
def second_order() -> Iterator[None]:
    """Run ``scaled_dot_product_attention`` on its math backend inside the block.

    The fused attention kernels (flash, memory-efficient; the CPU's flash kernel included)
    have no derivatives of their backward and no forward-mode derivatives, so curvature
    products through attention (``nn.MultiheadAttention``, ``nn.TransformerEncoderLayer``,
    Hugging Face SDPA attention) fail there. The math backend is attention written in
    differentiable operations: exact, twice differentiable, and slower (it forms the
    ``(T, T)`` attention matrix). Plain gradients keep the fused kernels.

    The block holds a process-wide lock (:data:`_SECOND_ORDER_LOCK`): forward-mode AD, which
    the curvature products and mixed derivatives use, has process-wide levels and is not
    safe in two threads at once, and the switches above are process-wide too. Threads of one
    process (a threaded Dask worker, an in-process cluster) run these blocks one at a time;
    the backward passes of their per-sample gradients still run concurrently.
    """
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with _SECOND_ORDER_LOCK:
        mha = torch.backends.mha
        fastpath = mha.get_fastpath_enabled()
        # nn.TransformerEncoderLayer / nn.MultiheadAttention in eval mode take a fused "fast
        # path" kernel when they see no parameter requiring grad (as under torch.func); it has
        # no forward-mode derivative. Off inside the block, as the process had it afterwards.
        mha.set_fastpath_enabled(False)
        try:
            with sdpa_kernel(SDPBackend.MATH):
                yield
        finally:
            mha.set_fastpath_enabled(fastpath)


def _vjp(fn: Callable[[Tensor], Tensor], primal: Tensor) -> tuple[Tensor, Callable[[Tensor], tuple[Tensor, ...]]]:
    """``torch.func.vjp`` without ``has_aux``: its output and pull-back function.

    The annotation of ``torch.func.vjp`` also admits the ``has_aux=True`` triple, which a
    two-name unpacking cannot type-check against.
    """
    result = torch.func.vjp(fn, primal)
    return result[0], result[1]


def _jacobian_in_leaf(fn: Callable[[Any], Tensor], batch: Any, path: str | int, n_out: int) -> Tensor:
    """Per-sample Jacobian of ``fn(sample)`` (a vector of ``n_out``) in the leaf at ``path``, batched.

    Returns ``(n, n_out, *x.shape[1:])`` for that leaf ``x``. Forward mode when the input has
    fewer features than outputs (cheaper), falling back to reverse mode for operations
    without forward-mode support; reverse mode otherwise. Attention runs on its math
    backend (second derivatives, see :func:`second_order`).
    """
    x = batches.get_leaf(batch, path)

    def of_leaf(xi: Tensor, sample: Any) -> Tensor:
        return fn(batches.replace_leaf(sample, path, xi))

    n_features = int(x[0].numel())
    with second_order():
        if n_features < n_out:
            try:
                return vmap(jacfwd(of_leaf, argnums=0))(x, batch)
            except (RuntimeError, NotImplementedError):
                pass
        return vmap(jacrev(of_leaf, argnums=0))(x, batch)


def check_finite_grads(grads: Tensor, spec: ParamSpec, sample_offset: int = 0) -> None:
    """Raise :class:`NonFiniteError` naming the sample and layer of a NaN/Inf gradient.

    Args:
        grads: ``(n, p)`` per-sample gradients.
        sample_offset: index of the first row within the caller's data.
    """
    bad = ~torch.isfinite(grads)
    if bool(bad.any()):
        row, col = (int(i) for i in torch.nonzero(bad)[0].tolist())
        raise NonFiniteError(
            f"The gradient of the loss of sample {row + sample_offset} is NaN/Inf in "
            f"parameter '{spec.name_of_index(col)}'. Check the model's outputs and the loss "
            "for overflow (e.g. log of 0), or use a numerically stable loss such as "
            "cross_entropy on logits."
        )
