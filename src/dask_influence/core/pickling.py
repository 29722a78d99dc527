"""Snapshots of solvers and projectors for Dask, with their tensors as out-of-band buffers.

A solver or an index projector is pickled as a snapshot taken under the process-wide forward
lock (:meth:`~.solvers.engine.SolverEngine.__reduce_ex__`). Pickled by torch's own reduction,
each tensor is first written to a ``BytesIO`` by ``torch.save``, copied out of it, copied into
the pickle stream and copied again by Dask into its frames; the receiving worker holds the
frames, the stream's bytes, torch's ``BytesIO`` and the tensors. Receiving a broadcast EK-FAC
fit of 0.62 GB (a 53M-parameter GPT-2) peaked 3.4 GB above an idle worker; GPT-2-small's 2.2 GB
fit would need about 12 GB.

Here (pickle protocol 5) every dense CPU tensor of :data:`MIN_BYTES` or more is pickled as a
``PickleBuffer`` over its own memory: the snapshot's stream stays small and its buffers are
handed to the outer pickler, which Dask runs with a ``buffer_callback``, so they become frames
without a copy, and the receiving side builds the tensors over those frames
(:func:`_tensor`; a read-only frame is copied once). With an outer pickler without buffers
(``pickle.dumps(solver)``) they are written into its stream in-band: still one copy fewer.
Lower protocols (``copy.deepcopy``) keep torch's reduction.
"""

from __future__ import annotations

import io
import pickle
from typing import Any, cast

import cloudpickle
import numpy as np
import torch
from torch import nn

MIN_BYTES = 1 << 16
"""Tensors smaller than this keep torch's own reduction (their copies cost nothing)."""

_NUMPY: dict[torch.dtype, Any] = {
    torch.float64: np.float64,
    torch.float32: np.float32,
    torch.float16: np.float16,
    torch.int64: np.int64,
    torch.int32: np.int32,
    torch.int16: np.int16,
    torch.int8: np.int8,
    torch.uint8: np.uint8,
    torch.bool: np.bool_,
}


def _plain(t: Any) -> bool:
    """Whether ``t`` is a dense, contiguous CPU tensor (or parameter) this module may send as a buffer."""
    return (
        type(t) in (torch.Tensor, nn.Parameter)
        and t.device.type == "cpu"
        and t.layout == torch.strided
        and t.dtype in _NUMPY
        and t.is_contiguous()
        and not t.is_conj()
        and not t.is_neg()
        and t.grad_fn is None
        and t.numel() * t.element_size() >= MIN_BYTES
    )


class _BufferPickler(cloudpickle.Pickler):
    """cloudpickle with large tensors reduced to ``PickleBuffer`` views of their memory."""

    def reducer_override(self, obj: Any) -> Any:
        if isinstance(obj, torch.Tensor) and _plain(obj):
            array = obj.detach().numpy()  # shares the tensor's memory
            parameter = isinstance(obj, nn.Parameter)
            return _tensor, (
                pickle.PickleBuffer(cast(Any, array)),
                str(obj.dtype),
                tuple(obj.shape),
                parameter,
                obj.requires_grad,
            )
        return super().reducer_override(obj)


def dumps(value: Any) -> tuple[bytes, list[pickle.PickleBuffer]]:
    """``value`` as a pickle stream and the buffers of its large tensors (views, not copies)."""
    buffers: list[pickle.PickleBuffer] = []
    out = io.BytesIO()
    _BufferPickler(out, protocol=5, buffer_callback=buffers.append).dump(value)
    return out.getvalue(), buffers


def loads(stream: bytes, buffers: list[Any]) -> Any:
    """The value of :func:`dumps`' ``stream`` over its ``buffers`` (bytes, bytearrays or memoryviews)."""
    return pickle.loads(stream, buffers=buffers)


def dump_state(state: dict, *, buffered: bool) -> tuple:
    """An object's ``state`` as the arguments of :func:`load_state`: ``(stream, buffers)`` with
    ``buffered`` (pickle protocol 5: the large tensors out-of-band, :func:`dumps`), else
    ``(payload,)``, one cloudpickle of the whole state (lower protocols)."""
    if buffered:
        return dumps(state)
    return (cloudpickle.dumps(state, protocol=pickle.HIGHEST_PROTOCOL),)


def load_state(*args: Any) -> dict:
    """The state of :func:`dump_state`'s arguments."""
    if len(args) == 1:
        return pickle.loads(args[0])
    return loads(*args)


def _tensor(buffer: Any, dtype: str, shape: tuple[int, ...], parameter: bool, requires_grad: bool) -> torch.Tensor:
    """A tensor over ``buffer`` (copied once if the buffer is read-only)."""
    array = np.frombuffer(buffer, dtype=_NUMPY[getattr(torch, dtype.removeprefix("torch."))]).reshape(shape)
    if not array.flags.writeable:
        array = array.copy()
    t = torch.from_numpy(array)
    if parameter:
        return nn.Parameter(t, requires_grad=requires_grad)
    return t.requires_grad_(requires_grad) if requires_grad else t
