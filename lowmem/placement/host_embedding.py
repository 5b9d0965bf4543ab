"""The input embedding in host memory (``memory.offload_embeddings``, fused strategy): only the batch's rows travel.

Llama-3-8B's input embedding is 128256 × 4096 (1 GiB in bf16) for the ~2K rows a step reads. With it in host memory,
and its rule state beside it:
    forward   the batch's rows are gathered on the host, from the host's own copy of the token ids (handed over
              by the trainer with :meth:`HostEmbedding.feed`, so nothing is read back from the device), straight into
              pinned memory, and copied to the device without blocking;
    backward  the rows' gradient is summed on the device (``lowmem.strategies.embedding_rows.row_gradient``; its
              norm for clipping taken there), copied to pinned host memory without blocking, and the row-sparse update
              (``lowmem.ops.update_rows``, the CPU kernels) runs in a worker thread once the copies are done; the
              next lookup (or a checkpoint, an evaluation) waits for it (:meth:`HostEmbedding.flush`). The
              embedding's backward is the last of a step's, so the next step's forward waits for that update: what
              overlaps it is the host's work between steps (the next batch), not the device's.
The update is the same as on the device: the CPU row-sparse kernels equal the dense ones bit for bit (and the CPU
and CUDA kernels agree to rounding). Lookups of ids that live on the device (evaluation) copy them to the host
first: a read, outside the training step.
"""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor

import torch
import torch.nn.functional as F
from torch._subclasses.fake_tensor import is_fake

from lowmem.strategies.embedding_rows import row_gradient


def to_host(tensor: torch.Tensor) -> torch.Tensor:
    """A host copy of a device tensor, into pinned memory without blocking (the host does not wait); a host tensor
    as it is."""
    if tensor.device.type == "cpu":
        return tensor
    host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
    return host.copy_(tensor, non_blocking=True)


def gather_rows(weight: torch.Tensor, host_ids: torch.Tensor, device: torch.device) -> torch.Tensor:
    """The rows of the host ``weight`` at ``host_ids`` (shaped like the ids, plus the width), on ``device``: on a GPU
    gathered straight into pinned memory and copied without blocking (the weight itself needs no pinning)."""
    shape = (*host_ids.shape, weight.shape[-1])
    if device.type == "cpu" or is_fake(weight):
        return F.embedding(host_ids, weight)
    pinned = torch.empty(shape, dtype=weight.dtype, pin_memory=True)
    torch.index_select(weight, 0, host_ids.reshape(-1), out=pinned.view(-1, weight.shape[-1]))
    return pinned.to(device, non_blocking=True)


class HostLookup(torch.autograd.Function):
    """The lookup of ``host_ids`` (host) in the host ``weight``, handed to the device; its backward gives the rows'
    gradient (from the device ``ids``) to ``owner.backward_rows`` instead of a weight gradient."""

    @staticmethod
    def forward(ctx, ids, host_ids, weight, owner):
        ctx.save_for_backward(ids)
        ctx.owner = owner
        return gather_rows(weight, host_ids, owner.device)

    @staticmethod
    def backward(ctx, grad_out):
        (ids,) = ctx.saved_tensors
        owner: HostEmbedding = ctx.owner
        owner.sink(*row_gradient(ids, grad_out, owner.embedding.weight.shape[0], owner.embedding.padding_idx))
        return None, None, None, None


class HostEmbedding:
    """Keeps ``embedding``'s weight in host memory and replaces its lookup (see the module docstring). ``sink(rows,
    values)`` is the strategy's: it measures the device rows and calls :meth:`update_on_host`."""

    def __init__(self, embedding: torch.nn.Embedding, device: torch.device, sink):
        self.embedding = embedding
        self.device = torch.device(device)
        self.sink = sink
        weight = embedding.weight
        weight.data = weight.data.to("cpu")  # pageable: rows are gathered from it into pinned buffers
        self._fed: torch.Tensor | None = None
        self._pending: Future | None = None
        # only the calling thread sets and takes _pending; the worker runs the update alone
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="lowmem-host-embedding")
        embedding.forward = self.lookup

    def feed(self, host_ids: torch.Tensor) -> None:
        """The host copy of the next lookup's token ids (the trainer's batch before it moved)."""
        self._fed = host_ids

    def lookup(self, ids: torch.Tensor) -> torch.Tensor:
        self.flush()
        fed, self._fed = self._fed, None
        if fed is not None and fed.shape == ids.shape:
            host_ids = fed
        else:
            host_ids = ids.to("cpu")  # ids only on the device (evaluation): a read, outside the training step
        return HostLookup.apply(ids, host_ids, self.embedding.weight, self)

    def update_on_host(self, rows: torch.Tensor, values: torch.Tensor, scale, update) -> None:
        """Copy the device ``rows``, ``values`` and ``scale`` (a device tensor or a number) to the host and run
        ``update(rows, values, scale)`` there once they have arrived, in the worker thread (inline on fake tensors:
        the planner's dispatch mode is the calling thread's)."""
        if is_fake(values):
            update(rows, values, scale)
            return
        self.flush()
        rows_h, values_h = to_host(rows), to_host(values)
        scale_h = to_host(scale) if isinstance(scale, torch.Tensor) else scale
        done = None
        if values.device.type == "cuda":
            done = torch.cuda.Event(blocking=True)  # the worker sleeps on it instead of spinning a core
            done.record()

        def work() -> None:
            if done is not None:
                done.synchronize()  # this thread waits for the copies; the host's main thread does not
            with torch.no_grad():
                update(rows_h, values_h, scale_h)

        self._pending = self._worker.submit(work)

    def flush(self) -> None:
        """Wait for the pending host update (its error, if any, is raised here)."""
        pending, self._pending = self._pending, None
        if pending is not None:
            pending.result()

    def close(self) -> None:
        """Finish the pending update, give the embedding its own lookup back and its weight back to the device (a
        model used after training, in the same process, is whole again)."""
        self.flush()
        self._worker.shutdown(wait=True)
        if vars(self.embedding).get("forward") == self.lookup:
            del self.embedding.forward
        self.embedding.weight.data = self.embedding.weight.data.to(self.device)
