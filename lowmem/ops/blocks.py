"""Token-block ops of LeMo's token elimination (``lowmem/activations/tokens.py``): their schemas, pure-PyTorch
references (the specification and the fallback), fake implementations (shapes without data, for the memory planner)
and autograd.
Native kernels in ``csrc/cpu/blocks.cpp`` and ``csrc/cuda/blocks.cu`` override the references.

A sequence of ``seq`` tokens is ``seq // block_size`` whole blocks and a tail shorter than a block. ``blocks`` is a
[batch, kept] int64 tensor of block indices per sequence, ascending; the kept rows of a sequence are those blocks'
tokens in that order, then the tail (always kept): ``kept · block_size + tail`` rows.

``gather_blocks(x, blocks, block_size)``         x [batch or 1, seq, ...] → its kept rows [batch, rows, ...]
``scatter_blocks(base, src, blocks, block_size)`` base [batch, seq, ...] with its kept rows replaced by src
``pool_blocks(scores, block_size)``               [batch, seq] → [batch, seq // block_size] float32 sums over each
                                                  whole block, accumulated in float64

Gather and scatter are copies of whole blocks (one contiguous segment of ``block_size`` rows each, any dtype), never
a per-token index; their gradients are each other.
"""

from __future__ import annotations

import torch

from lowmem.ops.quant import _lib  # the one "lowmem" library

_lib.define("gather_blocks(Tensor x, Tensor blocks, int block_size) -> Tensor")
_lib.define("scatter_blocks(Tensor base, Tensor src, Tensor blocks, int block_size) -> Tensor")
_lib.define("pool_blocks(Tensor scores, int block_size) -> Tensor")


def kept_rows(blocks: torch.Tensor, block_size: int, length: int) -> torch.Tensor:
    """[batch, rows] token positions of the kept rows: each kept block's tokens, then the tail."""
    offsets = torch.arange(block_size, device=blocks.device)
    positions = (blocks[:, :, None] * block_size + offsets).reshape(blocks.shape[0], -1)
    tail = torch.arange(length // block_size * block_size, length, device=blocks.device)
    return torch.cat([positions, tail.expand(blocks.shape[0], -1)], dim=1)


def _check(x: torch.Tensor, blocks: torch.Tensor, block_size: int, op: str) -> None:
    if block_size < 1:
        raise ValueError(f"{op}: block_size must be positive, got {block_size}")
    if blocks.dtype != torch.int64 or blocks.dim() != 2:
        raise ValueError(f"{op}: blocks must be a [batch, kept] int64 tensor, got {tuple(blocks.shape)} {blocks.dtype}")
    if x.dim() < 2:
        raise ValueError(f"{op}: expected a [batch, seq, ...] tensor, got {tuple(x.shape)}")


def gather_blocks_ref(x: torch.Tensor, blocks: torch.Tensor, block_size: int) -> torch.Tensor:
    _check(x, blocks, block_size, "gather_blocks")
    rows = kept_rows(blocks, block_size, x.shape[1])
    x = x.expand(blocks.shape[0], *x.shape[1:])
    return x[torch.arange(blocks.shape[0], device=x.device)[:, None], rows]


def scatter_blocks_ref(base: torch.Tensor, src: torch.Tensor, blocks: torch.Tensor, block_size: int) -> torch.Tensor:
    _check(base, blocks, block_size, "scatter_blocks")
    rows = kept_rows(blocks, block_size, base.shape[1])
    out = base.clone()
    if src.dtype != base.dtype or src.shape != (base.shape[0], rows.shape[1], *base.shape[2:]):
        raise ValueError(f"scatter_blocks: src must be {base.dtype} of shape {(base.shape[0], rows.shape[1], *base.shape[2:])}"
                         f", got {src.dtype} of shape {tuple(src.shape)}")
    out[torch.arange(base.shape[0], device=base.device)[:, None], rows] = src
    return out


def pool_blocks_ref(scores: torch.Tensor, block_size: int) -> torch.Tensor:
    if block_size < 1 or scores.dim() != 2:
        raise ValueError(f"pool_blocks: expected [batch, seq] scores and a positive block_size, got "
                         f"{tuple(scores.shape)} and {block_size}")
    n_blocks = scores.shape[1] // block_size
    whole = scores[:, :n_blocks * block_size].reshape(scores.shape[0], n_blocks, block_size)
    return whole.double().sum(-1).float()


_lib.impl("gather_blocks", gather_blocks_ref, "CompositeExplicitAutograd")
_lib.impl("scatter_blocks", scatter_blocks_ref, "CompositeExplicitAutograd")
_lib.impl("pool_blocks", pool_blocks_ref, "CompositeExplicitAutograd")


def _rows(length: int, blocks: torch.Tensor, block_size: int) -> int:
    return blocks.shape[1] * block_size + length % block_size


@torch.library.register_fake("lowmem::gather_blocks")
def _gather_fake(x, blocks, block_size):
    return x.new_empty(blocks.shape[0], _rows(x.shape[1], blocks, block_size), *x.shape[2:])


@torch.library.register_fake("lowmem::scatter_blocks")
def _scatter_fake(base, src, blocks, block_size):
    return base.new_empty(base.shape)


@torch.library.register_fake("lowmem::pool_blocks")
def _pool_fake(scores, block_size):
    return scores.new_empty(scores.shape[0], scores.shape[1] // block_size, dtype=torch.float32)


def _gather_setup(ctx, inputs, output):
    x, blocks, block_size = inputs
    ctx.save_for_backward(blocks)
    ctx.block_size, ctx.x_shape = block_size, x.shape


def _gather_backward(ctx, grad):
    (blocks,) = ctx.saved_tensors
    zeros = grad.new_zeros(blocks.shape[0], *ctx.x_shape[1:])
    grad_x = torch.ops.lowmem.scatter_blocks(zeros, grad.contiguous(), blocks, ctx.block_size)
    if ctx.x_shape[0] != blocks.shape[0]:  # x was broadcast over the batch
        grad_x = grad_x.sum(dim=0, keepdim=True)
    return grad_x, None, None


def _scatter_setup(ctx, inputs, output):
    base, src, blocks, block_size = inputs
    ctx.save_for_backward(blocks)
    ctx.block_size, ctx.src_shape = block_size, src.shape


def _scatter_backward(ctx, grad):
    (blocks,) = ctx.saved_tensors
    grad = grad.contiguous()
    grad_base = torch.ops.lowmem.scatter_blocks(grad, grad.new_zeros(ctx.src_shape), blocks, ctx.block_size)
    grad_src = torch.ops.lowmem.gather_blocks(grad, blocks, ctx.block_size)
    return grad_base, grad_src, None, None


torch.library.register_autograd("lowmem::gather_blocks", _gather_backward, setup_context=_gather_setup)
torch.library.register_autograd("lowmem::scatter_blocks", _scatter_backward, setup_context=_scatter_setup)


def gather_blocks(x: torch.Tensor, blocks: torch.Tensor, block_size: int) -> torch.Tensor:
    """The kept rows of ``x`` ([batch or 1, seq, ...]): [batch, kept · block_size + tail, ...]."""
    from lowmem.ops.native import ensure_loaded

    ensure_loaded()
    return torch.ops.lowmem.gather_blocks(x.contiguous(), blocks.contiguous(), block_size)


def scatter_blocks(base: torch.Tensor, src: torch.Tensor, blocks: torch.Tensor, block_size: int) -> torch.Tensor:
    """A copy of ``base`` ([batch, seq, ...]) whose kept rows are ``src`` (as :func:`gather_blocks` returns them)."""
    from lowmem.ops.native import ensure_loaded

    ensure_loaded()
    return torch.ops.lowmem.scatter_blocks(base.contiguous(), src.contiguous(), blocks.contiguous(), block_size)


def pool_blocks(scores: torch.Tensor, block_size: int) -> torch.Tensor:
    """[batch, seq // block_size] float32 sums of [batch, seq] ``scores`` over each whole block."""
    from lowmem.ops.native import ensure_loaded

    ensure_loaded()
    return torch.ops.lowmem.pool_blocks(scores.contiguous(), block_size)
