"""Wanda's calibration as its reference implementation runs it (Sun et al. 2023, ``prune_wanda``): layer by layer, each
decoder layer fed the outputs of the already-pruned layers below it.

    1. The prunable layers before the decoder stack (OPT's ``project_in``) see the embeddings: their inputs are measured
       by a forward stopped at the first decoder layer, and they are pruned.
    2. One forward of each calibration batch records what the first decoder layer receives (its hidden states) and the
       rest of every decoder layer's arguments (masks, rotary embeddings: they do not change with pruning), and stops
       after the last layer.
    3. For each decoder layer in order: its prunable layers' input norms are measured by running it on the current
       hidden states, they are pruned, and the layer runs again, pruned, to give the next layer's hidden states. Only
       one layer's inputs are held (one hidden-state tensor per calibration batch), so calibration memory does not grow
       with depth.
    4. The prunable layers after the stack (the output head with ``prune.include_head``, OPT's ``project_out``) are
       measured by a forward of the pruned model, stopped at the head.

Norms are sums over the calibration tokens (padding excluded) of each input feature's square, in float32 (float64 for
a float64 model). Everything runs in evaluation mode without gradient.
"""

from __future__ import annotations

from typing import Callable

import torch

from lowmem.errors import UserError
from lowmem.ops.update import math_dtype
from lowmem.placement.units import decoder_layers, forward_stages


class _Stop(Exception):
    """Raised by a hook to end a calibration forward where nothing past it is needed."""


def _hidden_of(args: tuple, kwargs: dict) -> torch.Tensor:
    return args[0] if args else kwargs["hidden_states"]


def _with_hidden(args: tuple, kwargs: dict, hidden: torch.Tensor) -> tuple[tuple, dict]:
    if args:
        return (hidden, *args[1:]), kwargs
    return args, {**kwargs, "hidden_states": hidden}


class _Norms:
    """Forward pre-hooks on ``layers`` summing the squares of each input feature over the current batch's real
    tokens."""

    def __init__(self, layers: list[tuple[str, torch.nn.Module]]):
        self.sums: dict[str, torch.Tensor] = {}
        self.real: torch.Tensor | None = None  # the current batch's non-padding positions, flattened (0 or 1)
        self._handles = [layer.register_forward_pre_hook(self._hook(name)) for name, layer in layers]

    def _hook(self, name: str):
        def hook(module, args):
            x = args[0].detach().reshape(-1, args[0].shape[-1])
            squares = x.to(math_dtype(x.dtype)).square()
            if self.real is not None and self.real.numel() == x.shape[0]:
                # padding rows count 0: multiplied, not selected, so no shape depends on the data (no device sync)
                squares.mul_(self.real.unsqueeze(1))
            total = squares.sum(dim=0)
            self.sums[name] = total if name not in self.sums else self.sums[name].add_(total)

        return hook

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()


def _padding_mask(batch, device) -> torch.Tensor | None:
    """The batch's padding mask on ``device`` (None: a batch without one has no padding)."""
    mask = batch.get("attention_mask")
    return mask.to(device) if mask is not None else None


def _real(mask: torch.Tensor | None) -> torch.Tensor | None:
    """The non-padding positions of a padding mask, flattened, as :class:`_Norms` weighs its rows."""
    return mask.reshape(-1) if mask is not None else None


def _forward(model, batch, device, norms: _Norms | None) -> None:
    mask = _padding_mask(batch, device)
    if norms is not None:
        norms.real = _real(mask)
    try:
        # no KV cache: a cache captured in the recorded arguments would grow each time a layer is replayed
        model(input_ids=batch["input_ids"].to(device), attention_mask=mask, use_cache=False)
    except _Stop:
        pass


@torch.no_grad()
def prune_layer_by_layer(model: torch.nn.Module, layers: list[tuple[str, torch.nn.Module]], batches,
                         prune: Callable[[str, torch.nn.Module, torch.Tensor], None]) -> None:
    """Call ``prune(name, layer, input_sq_sums)`` for every prunable layer of ``layers``, in forward order, each with
    the norms of the inputs it gets once everything below it is pruned (see the module docstring)."""
    batches = list(batches)
    stack = decoder_layers(model)
    if stack is None:
        raise UserError(f"prune.criterion=wanda: {type(model).__name__} has no stack of decoder layers to calibrate "
                        "layer by layer (use prune.criterion=magnitude)")
    paths = {id(m): n for n, m in model.named_modules()}
    stack_paths = [paths[id(layer)] for layer in stack]
    inside: list[list[tuple[str, torch.nn.Module]]] = [[] for _ in stack]
    outside = []
    for name, layer in layers:
        index = next((i for i, p in enumerate(stack_paths) if name.startswith(p + ".")), None)
        (inside[index] if index is not None else outside).append((name, layer))
    stages = forward_stages(model, stack) if outside else {}
    before = [(n, m) for n, m in outside if stages.get(n, (0.0, 0))[0] < 0]
    after = [(n, m) for n, m in outside if stages.get(n, (0.0, 0))[0] >= 0]
    device = model.get_input_embeddings().weight.device
    was_training = model.training
    model.eval()
    try:
        if before:
            _calibrate_outside(model, before, batches, device, stop_at=stack[0], prune=prune)
        inputs = _record_inputs(model, stack, batches, device)
        hidden = [_hidden_of(*call) for call in inputs[0]]
        inputs[0] = [_with_hidden(*call, None) for call in inputs[0]]  # held once, in ``hidden``
        reals = [_real(_padding_mask(batch, device)) for batch in batches]  # moved once, not once a layer
        for i, layer in enumerate(stack):
            if inside[i]:
                norms = _Norms(inside[i])
                try:
                    for b, real in enumerate(reals):
                        norms.real = real
                        args, kwargs = _with_hidden(*inputs[i][b], hidden[b])
                        layer(*args, **kwargs)
                finally:
                    norms.remove()
                for name, sublayer in inside[i]:
                    prune(name, sublayer, _norms_of(norms, name))
            for b in range(len(batches)):  # the pruned layer's outputs: the next layer's inputs
                args, kwargs = _with_hidden(*inputs[i][b], hidden[b])
                out = layer(*args, **kwargs)
                hidden[b] = out if isinstance(out, torch.Tensor) else out[0]  # a tuple or a ModelOutput
        del hidden, inputs, reals
        if after:
            _calibrate_outside(model, after, batches, device, stop_at=model.get_output_embeddings(), prune=prune)
    finally:
        model.train(was_training)


def _record_inputs(model, stack, batches, device) -> list[list[tuple[tuple, dict]]]:
    """Per decoder layer and batch, (args, kwargs) as the model calls it; the hidden states only for the first layer
    (later layers get theirs from the layer below, run pruned)."""
    calls: list[list[tuple[tuple, dict]]] = [[] for _ in stack]

    def recorder(i: int):
        def hook(module, args, kwargs):
            if i > 0:  # keep no hidden states above the first layer: one layer's inputs in memory at a time
                args, kwargs = _with_hidden(args, kwargs, None)
            calls[i].append((args, kwargs))

        return hook

    def stop(module, args, output):
        raise _Stop

    handles = [layer.register_forward_pre_hook(recorder(i), with_kwargs=True) for i, layer in enumerate(stack)]
    handles.append(stack[-1].register_forward_hook(stop))
    try:
        for batch in batches:
            _forward(model, batch, device, None)
    finally:
        for handle in handles:
            handle.remove()
    return calls


def _calibrate_outside(model, layers, batches, device, stop_at: torch.nn.Module | None, prune) -> None:
    """Norms of prunable layers outside the decoder stack from forwards of the model stopped at ``stop_at`` (the first
    decoder layer, or the head once its own norms are taken), then their pruning."""
    norms = _Norms(layers)

    def stop(module, args):
        raise _Stop

    handle = stop_at.register_forward_pre_hook(stop) if stop_at is not None else None  # after the norms' hooks
    try:
        for batch in batches:
            _forward(model, batch, device, norms)
    finally:
        norms.remove()
        if handle is not None:
            handle.remove()
    for name, layer in layers:
        prune(name, layer, _norms_of(norms, name))


def _norms_of(norms: _Norms, name: str) -> torch.Tensor:
    if name not in norms.sums:
        raise UserError(f"prune.criterion=wanda: {name} saw no calibration input (is it used by the forward?)")
    return norms.sums[name]
