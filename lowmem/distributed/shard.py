"""The model on FSDP2: each decoder layer and the root ``fully_shard``ed (parameters split along dim 0 over the
ranks, in the recipe's dtype), gradients summed (not averaged) by the reduce-scatter, since lowmem's loss is already
divided by the global batch's label tokens. The rules step on each rank's local shard of a parameter and of its
reduced gradient; what they keep per element is sharded the same way."""

from __future__ import annotations

import functools

import torch

from lowmem.activations.loss import ROOT_CALL
from lowmem.errors import UserError
from lowmem.placement.units import decoder_layers, trace_forward_stages


def is_sharded(tensor) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(tensor, DTensor)


def local(tensor: torch.Tensor) -> torch.Tensor:
    """A DTensor's local shard (the storage the rule updates in place), or the tensor itself."""
    return tensor.to_local() if is_sharded(tensor) else tensor


def device_mesh(device: torch.device):
    """The 1-D mesh of every rank on ``device``'s type."""
    from torch.distributed.device_mesh import init_device_mesh

    return init_device_mesh(device.type, (torch.distributed.get_world_size(),))


def shard_model(model: torch.nn.Module, device: torch.device, mesh=None, head_in_root: bool = False) -> torch.nn.Module:
    """``fully_shard`` each decoder layer, the input embedding and the head (untied), then the root (the rest: the
    final norm; a tied embedding), onto ``device`` (``mesh``: made here unless given); gradients are reduced by a
    plain sum.

    ``head_in_root``: the head is left in the root's unit, for the chunked loss (``memory.loss_chunk_tokens``). It
    uses the head once per chunk, and the head's own unit would reduce-scatter (and run a fused update on) each
    chunk's part of its gradient; in the root, the chunks' gradients are summed in one buffer and reduced once, after
    backward. The cost: the head stays gathered through the whole step, as the root's parameters do."""
    from torch.distributed.fsdp import FSDPModule, fully_shard, register_fsdp_forward_method

    layers = decoder_layers(model)
    if layers is None:
        raise UserError(f"distributed: {type(model).__name__} has no list of decoder layers to shard")
    mesh = mesh if mesh is not None else device_mesh(device)
    # HiFT finds its units by a fake forward, which a sharded model cannot run (its hooks would gather fake shards)
    trace_forward_stages(model)
    for layer in layers:
        fully_shard(layer, mesh=mesh)
    embedding, head = model.get_input_embeddings(), model.get_output_embeddings()
    if head is not None and head.weight is not embedding.weight:
        # untied: each its own unit, so neither vocabulary-sized matrix stays gathered through the whole step (the
        # root's would); the head is used last in forward and first in backward, so it stays gathered in between
        fully_shard(embedding, mesh=mesh)
        if not head_in_root:
            fully_shard(head, mesh=mesh, reshard_after_forward=False)
    fully_shard(model, mesh=mesh)
    # the chunked loss runs the body and the head itself: inside the root's forward hooks, as a forward of the model
    setattr(model, ROOT_CALL, functools.partial(_call_with, model))
    register_fsdp_forward_method(model, ROOT_CALL)
    for module in model.modules():
        if isinstance(module, FSDPModule):
            # a sum: lowmem divides the loss by the global batch's label tokens itself. Sum-only collectives (gloo has
            # no pre-multiplied sum), and no division after them (the factor 1 is skipped)
            module.set_gradient_divide_factor(1.0)
            module.set_force_sum_reduction_for_comms(True)
    return model


def materialize(model: torch.nn.Module, device: torch.device) -> None:
    """A sharded model whose parameters are on the meta device (``lowmem.model.load_model(shards_later=True)``): each
    rank's shards allocated on ``device`` (uninitialized: they are read next), and the buffers kept as they were
    computed (``to_empty`` would leave them uninitialized too)."""
    buffers = {name: buffer.detach().clone() for name, buffer in model.named_buffers()}
    model.to_empty(device=device)
    with torch.no_grad():
        for name, buffer in model.named_buffers():
            buffer.copy_(buffers[name])


def _call_with(model: torch.nn.Module, fn, *args):
    return fn(model, *args)


def state_layout(update) -> tuple[dict[str, torch.Tensor], tuple[str, ...]]:
    """What an :class:`lowmem.Update`'s flat state follows: its parameters by name, and the state keys its rule keeps
    the same on every rank (the rest is sharded as the parameter)."""
    return update.strategy.params, getattr(update.rule, "replicated_state", ())


def sharded_entry(key: str, ndim: int, params: dict[str, torch.Tensor], replicated) -> torch.Tensor | None:
    """The sharded parameter whose rows ``key``'s state follows (sharded along dim 0 as it is), or None when the entry
    is the same on every rank (a step count; the rule's ``replicated_state``, such as Adafactor's column statistic)."""
    from lowmem.strategies.state import STATE_SEPARATOR

    name, what = key.rsplit(STATE_SEPARATOR, 1)
    param = params.get(name)
    if param is None or not is_sharded(param) or ndim == 0 or what in replicated:
        return None
    return param


def reshard(model: torch.nn.Module) -> None:
    """Free every gathered parameter. A forward without backward (validation) leaves the root and the head gathered:
    that holds their memory, and a gathered parameter keeps the ``requires_grad`` it was gathered with (HiFT changes
    it between steps; FSDP2 copies it from the shard only when it gathers)."""
    from torch.distributed.fsdp import FSDPModule

    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()


def whole(tensor: torch.Tensor, param):
    """A rank's rows of a state entry (``tensor``) as the DTensor of the whole entry, split over the ranks as the
    sharded ``param`` is: the entry has the parameter's rows, then its own columns (the parameter's shape, its rows'
    for a row statistic, lion8bit's absmax per block of a row)."""
    from torch.distributed.tensor import DTensor

    shape = torch.Size((param.shape[0], *tensor.shape[1:]))
    return DTensor.from_local(tensor.to(local(param).device), param.device_mesh, param.placements, shape=shape,
                              stride=torch.empty(shape, device="meta").stride())


def load_state_shards(path, params: dict[str, torch.Tensor], replicated=()) -> dict[str, torch.Tensor]:
    """A one-process checkpoint's rule state (whole entries in one file) read by a rank: each entry of a sharded
    parameter read only in this rank's rows, as FSDP2 cuts the parameter (``torch.chunk`` along dim 0: chunks of
    ⌈rows / ranks⌉, a rank past the last one holds none), so no rank holds the whole state in memory."""
    from safetensors import safe_open

    rank, size = torch.distributed.get_rank(), torch.distributed.get_world_size()
    out = {}
    if not path.exists():
        return out
    with safe_open(str(path), "pt") as f:
        for key in f.keys():
            entry = f.get_slice(key)
            shape = entry.get_shape()
            param = sharded_entry(key, len(shape), params, replicated)
            if param is None:
                out[key] = f.get_tensor(key)
                continue
            rows = shape[0]
            chunk = -(-rows // size)
            start = min(rank * chunk, rows)
            tensor = entry[start:min(start + chunk, rows)]
            if tuple(tensor.shape) != tuple(local(param).shape[: len(shape)]):
                raise UserError(f"resume: the state {key} has shape {tuple(tensor.shape)} on rank {rank}, the shard "
                                f"is {tuple(local(param).shape)} (was it written for this model?)")
            out[key] = tensor
    return out
