"""Sparsity masks (PERP): which entries of a pruned weight may be non-zero, kept with the layer that owns it.

A mask is stored as packed bits (1 bit per entry, 1/8 of a byte: a 7B model's matrices need 0.8 GiB, not 6.5) in a
non-persistent buffer ``weight_mask`` of the layer (``nn.Linear``, transformers' ``Conv1D``, :class:`Int8Linear` or
an adapted layer), in the weight's stored layout. Being a buffer it moves with ``model.to()``; being non-persistent
it stays out of the HF weights, and checkpoints write it to ``masks.safetensors`` beside them.

How the mask holds during retraining (``update.trainable=all``): the strategies multiply each masked gradient by
its mask before anything reads it (norms, clipping, the rule's state), as a weight parametrized by ``W ⊙ M`` would
get it, and :func:`lowmem.strategies.state.apply_rule` multiplies the weight by the mask after the rule's step, so
pruned entries stay exactly zero whatever the rule's arithmetic (int8 weights: before requantizing).
"""

from __future__ import annotations

import math

import torch

MASK_BUFFER = "weight_mask"
MASKS_FILE = "masks.safetensors"
_BIT_VALUES = (1, 2, 4, 8, 16, 32, 64, 128)
PACK_BLOCK = 2**23  # entries packed at a time (a multiple of 8)


def pack_bits(mask: torch.Tensor) -> torch.Tensor:
    """A bool tensor as uint8 bytes, 8 entries each (flattened row-major; entry i is bit i % 8 of byte i // 8), packed
    a block of ``PACK_BLOCK`` entries at a time, so its byte-per-entry temporaries are one block's."""
    flat = mask.reshape(-1)
    packed = torch.empty(-(-flat.numel() // 8), dtype=torch.uint8, device=mask.device)
    weights = torch.tensor(_BIT_VALUES, dtype=torch.uint8, device=mask.device)
    for start in range(0, flat.numel(), PACK_BLOCK):
        block = flat[start:start + PACK_BLOCK].to(torch.uint8)
        pad = -block.numel() % 8
        if pad:
            block = torch.cat([block, block.new_zeros(pad)])
        first = start // 8
        packed[first: first + block.numel() // 8] = (block.view(-1, 8) * weights).sum(dim=1, dtype=torch.uint8)
    return packed


def unpack_bits(bits: torch.Tensor, shape: torch.Size | tuple[int, ...]) -> torch.Tensor:
    """Inverse of :func:`pack_bits`: the bool tensor of ``shape``."""
    return unpack_bits_range(bits, 0, math.prod(shape)).view(shape)


def unpack_bits_range(bits: torch.Tensor, start: int, stop: int, device: torch.device | None = None) -> torch.Tensor:
    """Entries ``start`` to ``stop`` (flat, row-major) of a mask packed by :func:`pack_bits`, as bools on ``device``
    (default the mask's): only the bytes that hold them are moved and unpacked."""
    first, last = start // 8, -(-stop // 8)
    packed = bits[first:last] if device is None else bits[first:last].to(device)
    shifts = torch.arange(8, dtype=torch.uint8, device=packed.device)
    flat = packed.unsqueeze(1).bitwise_right_shift(shifts).bitwise_and_(1).view(-1)
    return flat[start - 8 * first: stop - 8 * first].bool()


def attach_masks(model: torch.nn.Module, masks: dict[str, torch.Tensor]) -> None:
    """Give each layer named by ``masks`` (weight name ``...q_proj.weight`` → bool mask of the weight's stored shape)
    its packed mask, on the layer's device."""
    for name, mask in masks.items():
        layer = model.get_submodule(name.rsplit(".", 1)[0])
        weight = layer.weight
        if tuple(mask.shape) != tuple(weight.shape):
            raise ValueError(f"mask of {name} has shape {tuple(mask.shape)}, the weight {tuple(weight.shape)}")
        layer.register_buffer(MASK_BUFFER, pack_bits(mask.to(weight.device)), persistent=False)


def masked_layers(model: torch.nn.Module) -> dict[str, torch.nn.Module]:
    """Weight name (``...q_proj.weight``) → the layer holding its mask."""
    return {f"{name}.weight": m for name, m in model.named_modules() if getattr(m, MASK_BUFFER, None) is not None}


def mask_of(layer: torch.nn.Module, device: torch.device | None = None) -> torch.Tensor:
    """The layer's mask as a bool tensor of its weight's stored shape (on ``device``, default the mask's)."""
    bits = getattr(layer, MASK_BUFFER)
    if device is not None and bits.device != device:
        bits = bits.to(device)
    return unpack_bits(bits, layer.weight.shape)


def mask_rows(layer: torch.nn.Module, start: int, stop: int, device: torch.device | None = None) -> torch.Tensor:
    """Rows ``start`` to ``stop`` of the layer's mask, in its weight's stored layout (a 2-D weight)."""
    cols = layer.weight.shape[-1]
    return unpack_bits_range(getattr(layer, MASK_BUFFER), start * cols, stop * cols, device).view(stop - start, cols)


def masks_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Weight name → packed mask (CPU, safetensors-ready)."""
    return {name: getattr(layer, MASK_BUFFER).detach().cpu() for name, layer in masked_layers(model).items()}


def load_masks(model: torch.nn.Module, packed: dict[str, torch.Tensor]) -> None:
    """Inverse of :func:`masks_state_dict`; a name the model lacks or a size that does not match raises ValueError."""
    modules = dict(model.named_modules())
    for name, bits in packed.items():
        layer = modules.get(name.rsplit(".", 1)[0])
        if layer is None or not hasattr(layer, "weight"):
            raise ValueError(f"it has a mask for {name}, which the model does not have")
        need = -(-layer.weight.numel() // 8)
        if bits.dtype != torch.uint8 or bits.numel() != need:
            raise ValueError(f"the mask of {name} has {bits.numel()} bytes of {bits.dtype}, the weight needs {need} "
                             "of uint8")
        layer.register_buffer(MASK_BUFFER, bits.to(layer.weight.device), persistent=False)


class GradientMasks:
    """What a strategy needs: each masked weight's layer by the name the strategy knows the weight by."""

    def __init__(self, model: torch.nn.Module, names):
        layers = masked_layers(model)
        self.layers = {n: layers[n] for n in names if n in layers}

    def __bool__(self) -> bool:
        return bool(self.layers)

    def get(self, name: str, like: torch.Tensor) -> torch.Tensor | None:
        """The bool mask of weight ``name`` on ``like``'s device, or None when it has none."""
        layer = self.layers.get(name)
        return mask_of(layer, like.device) if layer is not None else None

    def mask_grad_(self, name: str, grad: torch.Tensor) -> torch.Tensor | None:
        """Zero the pruned entries of ``grad`` in place; returns the mask used (None: unmasked weight)."""
        mask = self.get(name, grad)
        if mask is not None:
            grad.mul_(mask)
        return mask
