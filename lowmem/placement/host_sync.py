"""Host reads of device values: the few places a training step makes one, and a guard that finds any other.

On a GPU, ``.item()``, ``float(t)``, ``int(t)``, ``bool(t)`` and ``if t:`` of a device tensor wait until the
device has run everything queued before them: the host stops feeding the device, which then idles. Inside
backward, under ``fused``, one such read per parameter is hundreds of stalls per step. So a step keeps its
coefficients (clipping, RMS, step counts, the loss) as device tensors and reads values on the host only

* where they are logged, at the log interval (loss, gradient norm), and
* for float16 weights with loss scaling, once per step, whether the gradients overflowed: that decides, before
  any weight changes, whether the step is skipped (torch's ``GradScaler`` reads it at the same point).

Each such read goes through :func:`read`, which names its reason. :class:`ForbidHostReads` raises on any other
read of a tensor's value (``aten._local_scalar_dense``, the op behind all of the above), on CPU as on GPU;
the tests run whole training steps under it. On a GPU, ``torch.cuda.set_sync_debug_mode("error")`` also finds
synchronizing copies; :func:`read` lifts it for its own read.

A copy between host memory and a device synchronizes too (the host waits for the copy, which waits its turn on the
stream), unless the host side is pinned and the copy ``non_blocking``. The guard raises on those as well: any
``copy_`` or ``to`` either way that is not both. A CPU test reaches them by running the step with its model on
the ``meta`` device (shapes only).
What a step really must upload, once (a constant's first use on a device), goes through :func:`upload`: from pinned
memory without blocking on a GPU, and named like a read.

transformers' mask creation (``masking_utils``) reads one value per forward whatever the inputs (whether the
padding mask is all ones, or whether the position ids are packed; transformers 5.x), unless it is handed a
prepared 4-D mask, which would bypass each model's own masking (sliding windows). The guard tolerates reads
from there and counts them, so a test can check that they stay at one per forward.
"""

from __future__ import annotations

import contextlib
import sys
import threading
from collections import Counter

import torch
from torch.utils._python_dispatch import TorchDispatchMode

_LOCAL_SCALAR = torch.ops.aten._local_scalar_dense.default
_COPIES = (torch.ops.aten._to_copy.default, torch.ops.aten.copy_.default)
_state = threading.local()

#: Where a read by a library lowmem calls is tolerated (and counted): transformers' mask creation.
TOLERATED = ("transformers/masking_utils.py",)


class HostReadError(RuntimeError):
    """A tensor's value was read on the host inside a training step, outside :func:`read`."""


def _reasons() -> list[str]:
    if not hasattr(_state, "reasons"):
        _state.reasons = []
    return _state.reasons


@contextlib.contextmanager
def _marked(reason: str):
    reasons = _reasons()
    reasons.append(reason)
    cuda_mode = torch.cuda.get_sync_debug_mode() if torch.cuda.is_available() else 0
    if cuda_mode:
        torch.cuda.set_sync_debug_mode(0)
    try:
        yield
    finally:
        if cuda_mode:
            torch.cuda.set_sync_debug_mode(cuda_mode)
        reasons.pop()


def read(tensor: torch.Tensor, reason: str) -> float | int | bool:
    """The value of a one-element tensor on the host: a deliberate, named synchronization point."""
    with _marked(reason):
        return tensor.item()


def upload(tensor: torch.Tensor, device: torch.device, reason: str) -> torch.Tensor:
    """``tensor`` (on the host) on ``device``: from pinned memory without blocking on a GPU; a deliberate, named copy
    (a constant's first use on a device), which :class:`ForbidHostReads` lets through."""
    device = torch.device(device)
    with _marked(reason):
        if device.type == "cuda" and tensor.device.type == "cpu":
            return tensor.pin_memory().to(device, non_blocking=True)
        return tensor.to(device)


def read_all(tensors: dict[str, torch.Tensor], reason: str) -> dict[str, float]:
    """Several one-element tensors read at one point (one wait for the device, then copies that find it done)."""
    with _marked(reason):
        return {key: float(t.item()) for key, t in tensors.items()}


def _caller(frame, skip: tuple[str, ...] = ("/torch/", "lowmem/placement/host_sync.py")) -> str:
    while frame is not None:
        name = frame.f_code.co_filename
        if not any(part in name for part in skip):
            return f"{name}:{frame.f_lineno} ({frame.f_code.co_name})"
        frame = frame.f_back
    return "?"


def _tolerated(frame) -> str | None:
    while frame is not None:
        name = frame.f_code.co_filename.replace("\\", "/")
        for suffix in TOLERATED:
            if name.endswith(suffix):
                return suffix
        frame = frame.f_back
    return None


def _synchronizing_copy(func, args, kwargs) -> bool:
    """Whether the op copies between host memory and a device in a way that makes the host wait: unless the host
    side is pinned and the copy ``non_blocking``, it does (host to device: from pageable memory; device to host:
    into a new, pageable tensor, as ``.cpu()`` does)."""
    kwargs = kwargs or {}
    if func is _COPIES[0]:  # _to_copy(self, *, device, pin_memory, non_blocking, ...)
        source = args[0]
        target = torch.device(kwargs["device"]) if kwargs.get("device") is not None else source.device
        if (source.device.type == "cpu") == (target.type == "cpu"):
            return False
        pinned = source.is_pinned() if source.device.type == "cpu" else bool(kwargs.get("pin_memory"))
        return not (pinned and kwargs.get("non_blocking", False))
    target, source = args[0], args[1]  # copy_(self, src, non_blocking)
    if not isinstance(source, torch.Tensor) or (source.device.type == "cpu") == (target.device.type == "cpu"):
        return False
    host = source if source.device.type == "cpu" else target
    non_blocking = args[2] if len(args) > 2 else kwargs.get("non_blocking", False)
    return not (host.is_pinned() and non_blocking)


class ForbidHostReads(TorchDispatchMode):
    """Raises :class:`HostReadError` on every host read of a tensor's value, and every copy from pageable host memory
    to a device, that is neither made through :func:`read` / :func:`upload` nor one of the :data:`TOLERATED` library
    reads.

    Attributes:
        marked: reads made through :func:`read`, by reason.
        tolerated: tolerated library reads, by where they were made.
    """

    def __init__(self):
        super().__init__()
        self.marked: Counter[str] = Counter()
        self.tolerated: Counter[str] = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in _COPIES and _synchronizing_copy(func, args, kwargs):
            reasons = _reasons()
            if reasons:
                self.marked[reasons[-1]] += 1
            else:
                raise HostReadError(f"synchronizing copy between host and device inside a training step at "
                                    f"{_caller(sys._getframe(1))}: make the tensor where it is used, or copy from "
                                    "pinned memory without blocking (lowmem.placement.host_sync.upload)")
        if func is _LOCAL_SCALAR:
            reasons = _reasons()
            frame = sys._getframe(1)
            if reasons:
                self.marked[reasons[-1]] += 1
            elif (where := _tolerated(frame)) is not None:
                self.tolerated[where] += 1
            else:
                raise HostReadError(f"host read of a tensor value inside a training step at {_caller(frame)}: "
                                    "keep the value on the device, or read it through lowmem.placement.host_sync.read")
        return func(*args, **(kwargs or {}))
