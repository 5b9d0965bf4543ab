"""Blockwise int8 quantization with a signed dynamic code map.

One op, three places, one name: the schema is declared here with ``torch.library``, the pure-PyTorch
reference below is both the specification and the fallback, and ``csrc/`` holds the native CPU and
CUDA kernels that override it for their device once the extension is loaded.

A tensor is split into blocks of ``blocksize`` values (the last block is padded with zeros); each block
stores one float32 absmax and each value the uint8 index of the nearest entry of a sorted 256-entry code
map after dividing by the absmax. The map is the signed dynamic map of Dettmers et al. (2021): dense near
zero, with a power-of-ten exponent and a linear fraction per entry.
"""

from __future__ import annotations

import torch

from lowmem.placement.tensor_cache import tensor_cache

BLOCKSIZE = 256

_lib = torch.library.Library("lowmem", "DEF")
_lib.define("quantize_blockwise(Tensor x, Tensor code, int blocksize, bool preserve_sign) -> (Tensor, Tensor)")
_lib.define("dequantize_blockwise(Tensor codes, Tensor absmax, Tensor code, int blocksize, ScalarType dtype) -> Tensor")


@tensor_cache()
def _dynamic_map_cpu(max_exponent_bits: int = 7) -> torch.Tensor:
    # 8 bits = 1 sign bit + 7 bits shared by the exponent (how many leading zeros) and the fraction.
    # Exponent i spans [0.1, 1] * 10**(i - max_exponent_bits + 1) with 2**i evenly spaced fractions,
    # so small magnitudes get fine steps; then zero and +1.0 complete the map to 256 entries.
    parts: list[torch.Tensor] = []
    for i in range(max_exponent_bits):
        n_fractions = 2**i
        bounds = torch.linspace(0.1, 1.0, n_fractions + 1, dtype=torch.float32)
        means = (bounds[:-1] + bounds[1:]) / 2
        scale = 10.0 ** (-(max_exponent_bits - 1) + i)
        parts += [scale * means, -scale * means]
    parts.append(torch.tensor([0.0, 1.0]))
    code = torch.cat(parts)
    if code.numel() != 256:
        raise AssertionError(f"dynamic map has {code.numel()} entries, expected 256")
    return code.sort().values


@tensor_cache()
def _dynamic_map_on(device: str) -> torch.Tensor:
    from lowmem.placement.host_sync import upload

    return upload(_dynamic_map_cpu(), torch.device(device), "dynamic code map")


def dynamic_map(device: torch.device | str = "cpu") -> torch.Tensor:
    """The sorted signed dynamic code map: 256 float32 values in [-1, 1], including 0 and 1.

    One copy per device, made on first use: uploading it per call would be a synchronous copy from pageable
    memory inside every lion8bit update. The cached tensor is shared: never write to it."""
    return _dynamic_map_on(str(torch.device(device)))


def _blocks(x: torch.Tensor, blocksize: int) -> torch.Tensor:
    flat = x.reshape(-1).float()
    n_blocks = -(-flat.numel() // blocksize)
    padded = flat.new_zeros(n_blocks * blocksize)
    padded[: flat.numel()] = flat
    return padded.view(n_blocks, blocksize)


def quantize_blockwise_ref(
    x: torch.Tensor, code: torch.Tensor, blocksize: int, preserve_sign: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference: quantize ``x`` to uint8 codes (shape of ``x``) and float32 absmax per block.

    Ties between two codes go to the lower one. With ``preserve_sign`` a nonzero value whose nearest
    code is zero or of the other sign takes the neighbouring code on its own side, so a sign-based
    update (Lion) never sees a momentum flip or vanish through quantization.
    """
    _check_quantize_args(x, code, blocksize)
    blocks = _blocks(x, blocksize)
    absmax = blocks.abs().amax(dim=1)
    scale = torch.where(absmax > 0, absmax, torch.ones_like(absmax))
    normed = blocks / scale[:, None]
    code = code.float()
    mids = (code[1:] + code[:-1]) / 2
    idx = torch.searchsorted(mids, normed.contiguous(), right=False)
    if preserve_sign:
        chosen = code[idx]
        idx = idx + ((normed > 0) & (chosen <= 0)).long() - ((normed < 0) & (chosen >= 0)).long()
        idx = idx.clamp(0, code.numel() - 1)
    codes = idx.to(torch.uint8).view(-1)[: x.numel()].view(x.shape)
    return codes, absmax


def dequantize_blockwise_ref(
    codes: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor, blocksize: int, dtype: torch.dtype
) -> torch.Tensor:
    """Reference: the values ``code[codes] * absmax[block]`` in ``dtype``, shaped like ``codes``."""
    n = codes.numel()
    flat = code.float()[codes.reshape(-1).long()]
    block_of = torch.arange(n, device=codes.device) // blocksize
    return (flat * absmax[block_of]).to(dtype).view(codes.shape)


def _check_quantize_args(x: torch.Tensor, code: torch.Tensor, blocksize: int) -> None:
    if not x.is_floating_point():
        raise TypeError(f"quantize_blockwise: x must be a floating tensor, got {x.dtype}")
    if code.numel() != 256 or code.dtype != torch.float32:
        raise ValueError("quantize_blockwise: code must be a float32 tensor of 256 sorted values")
    if blocksize <= 0:
        raise ValueError(f"quantize_blockwise: blocksize must be positive, got {blocksize}")


_lib.impl("quantize_blockwise", quantize_blockwise_ref, "CompositeExplicitAutograd")
_lib.impl("dequantize_blockwise", dequantize_blockwise_ref, "CompositeExplicitAutograd")


@torch.library.register_fake("lowmem::quantize_blockwise")
def _quantize_fake(x, code, blocksize, preserve_sign):
    n_blocks = -(-x.numel() // blocksize)
    return x.new_empty(x.shape, dtype=torch.uint8), x.new_empty((n_blocks,), dtype=torch.float32)


@torch.library.register_fake("lowmem::dequantize_blockwise")
def _dequantize_fake(codes, absmax, code, blocksize, dtype):
    return codes.new_empty(codes.shape, dtype=dtype)


def quantize_blockwise(
    x: torch.Tensor, code: torch.Tensor | None = None, blocksize: int = BLOCKSIZE, preserve_sign: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize ``x`` blockwise; runs the native kernel when the extension is loaded.

    Returns:
        (codes, absmax): uint8 codes shaped like ``x`` (1 byte per value) and float32 absmax per block
        (4 bytes per ``blocksize`` values).
    """
    from lowmem.ops.native import ensure_loaded

    ensure_loaded()
    code = dynamic_map(x.device) if code is None else code
    return torch.ops.lowmem.quantize_blockwise(x.contiguous(), code, blocksize, preserve_sign)


def dequantize_blockwise(
    codes: torch.Tensor,
    absmax: torch.Tensor,
    code: torch.Tensor | None = None,
    blocksize: int = BLOCKSIZE,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Inverse of :func:`quantize_blockwise` up to the rounding to the nearest code."""
    from lowmem.ops.native import ensure_loaded

    ensure_loaded()
    code = dynamic_map(codes.device) if code is None else code
    return torch.ops.lowmem.dequantize_blockwise(codes.contiguous(), absmax, code, blocksize, dtype)
