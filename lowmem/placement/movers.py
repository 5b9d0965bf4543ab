"""The device operations the residency scheduler's moves are made of, behind one small interface, so that the order
rules of DESIGN §4a can be tested on a machine without a GPU (``tests/test_residency.py`` injects a mover that
records every allocation, copy, wait and event with its stream, and copies host tensors for real).

:class:`CudaMover` is the one lowmem runs. Its rules, as the scheduler uses them:

* a destination that outlives its copy is allocated on the **default stream** (:meth:`empty_like` runs there), so its
  block comes back to the pool the next allocation on the default stream draws from: one pool, not one per stream
  (on the H200 the side stream's pool held a second copy of every group: 71 GiB reserved for 36 GiB allocated);
* a side stream waits for the default stream after those allocations, before it copies into them (the block's last
  users on the default stream, and the copies that wrote the host buffers, have run);
* the default stream waits on an **event** recorded after the copies it needs, not on the whole side stream, before
  it uses a destination or drops it unused; so a destination lives and dies on the default stream and needs no
  ``record_stream`` (which would keep a freed block from reuse until the side stream's later copies ran);
* states and weights have a stream each, so a forward never waits behind a state prefetch;
* host memory is pinned, and every host-to-device copy is non-blocking.
"""

from __future__ import annotations

import torch


class CudaMover:
    """Streams, events, allocations and copies on one CUDA device."""

    def __init__(self, device: torch.device):
        self.device = device

    def stream(self):
        return torch.cuda.Stream(self.device)

    def current(self):
        return torch.cuda.current_stream(self.device)

    def empty_like(self, host: torch.Tensor) -> torch.Tensor:
        """A device tensor of ``host``'s shape and dtype, allocated on the current stream."""
        return torch.empty(host.shape, dtype=host.dtype, device=self.device)

    def copy(self, dst: torch.Tensor, src: torch.Tensor, stream) -> None:
        """``dst ← src`` queued on ``stream``, without blocking the host."""
        with torch.cuda.stream(stream):
            dst.copy_(src, non_blocking=True)

    def event(self, stream):
        """An event recorded on ``stream`` now."""
        event = torch.cuda.Event()
        event.record(stream)
        return event

    def wait_stream(self, waiter, stream) -> None:
        waiter.wait_stream(stream)

    def wait_event(self, waiter, event) -> None:
        waiter.wait_event(event)

    def pin(self, tensor: torch.Tensor) -> torch.Tensor:
        """``tensor`` in pinned host memory (itself if it already is)."""
        if tensor.device.type == "cpu" and tensor.is_pinned():
            return tensor
        return tensor.detach().to("cpu").pin_memory()

    def pinned_empty(self, like: torch.Tensor) -> torch.Tensor:
        return torch.empty(like.shape, dtype=like.dtype, pin_memory=True)

    def synchronize(self) -> None:
        torch.cuda.synchronize(self.device)
