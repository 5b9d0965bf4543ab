"""The token-block ops (lowmem/ops/blocks.py): native kernels against the pure-PyTorch references, element for
element and dtype for dtype, over several shapes with odd sizes (tails, broadcast batches, one-byte rows); the
references against plain indexing; gradients; fake shapes; refusals."""

import pytest
import torch

from float_error import U32, assert_within
from lowmem.ops.blocks import (
    gather_blocks,
    gather_blocks_ref,
    kept_rows,
    pool_blocks,
    pool_blocks_ref,
    scatter_blocks,
    scatter_blocks_ref,
)
from lowmem.ops.native import ensure_loaded

DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.int64, torch.bool, torch.uint8]
# (batch, x batch, seq, trailing shape, block size, kept)
CASES = [(2, 2, 21, (3,), 4, 2), (3, 1, 70, (5, 2), 16, 3), (1, 1, 64, (), 8, 8), (2, 2, 7, (9,), 8, 0),
         (4, 4, 129, (33,), 64, 1), (2, 1, 11, (1, 1, 3), 3, 2)]


def _data(shape, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    if dtype == torch.bool:
        return torch.rand(shape, generator=g) > 0.5
    if not dtype.is_floating_point:
        return torch.randint(0, 200, shape, generator=g).to(dtype)
    return torch.randn(shape, generator=g).to(dtype)


def _blocks(batch, seq, block_size, kept, seed=0):
    g = torch.Generator().manual_seed(seed)
    n = seq // block_size
    return torch.stack([torch.randperm(n, generator=g)[:kept].sort().values for _ in range(batch)])


def test_native_block_ops_own_the_cpu_dispatch():
    status = ensure_loaded()
    assert status.loaded, status.reason
    for op in ("gather_blocks", "scatter_blocks", "pool_blocks"):
        table = torch._C._dispatch_dump(f"lowmem::{op}")
        cpu = [line for line in table.splitlines() if line.startswith("CPU:")]
        assert cpu and "csrc/cpu/blocks.cpp" in cpu[0], table


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"b{c[0]}x{c[1]}-s{c[2]}-bs{c[4]}-k{c[5]}")
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[1])
def test_native_gather_and_scatter_equal_the_references(dtype, case):
    batch, x_batch, seq, rest, block_size, kept = case
    x = _data((x_batch, seq, *rest), dtype)
    blocks = _blocks(batch, seq, block_size, kept)
    out = gather_blocks(x, blocks, block_size)
    ref = gather_blocks_ref(x, blocks, block_size)
    assert out.dtype == dtype and out.shape == (batch, kept * block_size + seq % block_size, *rest)
    assert torch.equal(out, ref)
    # the reference is plain indexing at the kept positions
    rows = kept_rows(blocks, block_size, seq)
    assert torch.equal(ref, torch.stack([x[0 if x_batch == 1 else b, rows[b]] for b in range(batch)]))
    base = _data((batch, seq, *rest), dtype, seed=1)
    src = _data(out.shape, dtype, seed=2)
    scattered = scatter_blocks(base, src, blocks, block_size)
    assert scattered.dtype == dtype and torch.equal(scattered, scatter_blocks_ref(base, src, blocks, block_size))
    assert torch.equal(gather_blocks(scattered, blocks, block_size), src)  # the kept rows are src's
    untouched = torch.ones(batch, seq, dtype=torch.bool)
    untouched[torch.arange(batch)[:, None], rows] = False
    assert torch.equal(scattered[untouched], base[untouched])  # the others are base's


@pytest.mark.parametrize("shape,block_size", [((2, 21), 4), ((3, 64), 64), ((1, 5), 8), ((4, 1000), 7)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=lambda d: str(d).split(".")[1])
def test_native_pool_equals_the_reference(dtype, shape, block_size):
    scores = (torch.rand(shape, generator=torch.Generator().manual_seed(3)) * torch.logspace(-3, 3, shape[1])).to(dtype)
    out = pool_blocks(scores, block_size)
    ref = pool_blocks_ref(scores, block_size)
    assert out.dtype == torch.float32 and out.shape == (shape[0], shape[1] // block_size)
    # each side sums in float64 (in another order: off by ~10⁻¹⁶) and rounds once to float32, so the two may land on
    # neighbouring float32 values: one ulp, 2u relative (tests/float_error.py)
    assert_within(out, ref, 2 * U32 * ref.double().abs(), "pooled")
    n = shape[1] // block_size
    expected = scores[:, :n * block_size].double().view(shape[0], n, block_size).sum(-1)
    assert_within(ref, expected, U32 * expected.abs(), "pooled against float64")  # one rounding


def test_gradients_of_gather_and_scatter():
    x = torch.randn(1, 21, 4, dtype=torch.float64, requires_grad=True)  # broadcast over a batch of 2
    blocks = torch.tensor([[0, 3], [2, 4]])
    base = torch.randn(2, 21, 4, dtype=torch.float64, requires_grad=True)
    src = torch.randn(2, 9, 4, dtype=torch.float64, requires_grad=True)
    torch.autograd.gradcheck(lambda t: gather_blocks(t, blocks, 4), (x,))
    torch.autograd.gradcheck(lambda a, b: scatter_blocks(a, b, blocks, 4), (base, src))


def test_opcheck_and_fake_shapes():
    from torch._subclasses.fake_tensor import FakeTensorMode

    x, blocks = torch.randn(2, 21, 3), torch.tensor([[0, 3], [1, 4]])
    torch.library.opcheck(torch.ops.lowmem.gather_blocks.default, (x, blocks, 4))
    torch.library.opcheck(torch.ops.lowmem.scatter_blocks.default, (x, torch.randn(2, 9, 3), blocks, 4))
    torch.library.opcheck(torch.ops.lowmem.pool_blocks.default, (torch.rand(2, 21), 4))
    with FakeTensorMode() as mode:
        fx = mode.from_tensor(torch.empty(1, 4099, 8, dtype=torch.bfloat16))
        fb = mode.from_tensor(torch.zeros(3, 20, dtype=torch.int64))
        gathered = torch.ops.lowmem.gather_blocks(fx, fb, 64)
        assert gathered.shape == (3, 20 * 64 + 3, 8) and gathered.dtype == torch.bfloat16
        assert torch.ops.lowmem.pool_blocks(fx[:, :, 0], 64).shape == (1, 64)


def test_bad_arguments_are_refused_in_one_line():
    x = torch.randn(2, 21, 3)
    with pytest.raises(RuntimeError, match=r"block index 5 is outside \[0, 5\)"):
        gather_blocks(x, torch.tensor([[0, 5], [1, 2]]), 4)
    with pytest.raises(RuntimeError, match="blocks must be a contiguous \\[batch, kept\\] int64 tensor"):
        gather_blocks(x, torch.tensor([[0, 1]], dtype=torch.int32), 4)
    with pytest.raises(RuntimeError, match="data has batch 2, blocks 3"):
        gather_blocks(x, torch.zeros(3, 1, dtype=torch.int64), 4)
    with pytest.raises(RuntimeError, match="src must be contiguous Float of shape \\[2, 9, 3\\]"):
        scatter_blocks(x, torch.randn(2, 8, 3), torch.tensor([[0, 1], [1, 2]]), 4)


@pytest.mark.cuda
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"b{c[0]}x{c[1]}-s{c[2]}-bs{c[4]}-k{c[5]}")
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[1])
def test_cuda_block_ops_equal_the_references(dtype, case):
    assert ensure_loaded().with_cuda, "lowmem._C was built without CUDA kernels"
    batch, x_batch, seq, rest, block_size, kept = case
    x = _data((x_batch, seq, *rest), dtype)
    blocks = _blocks(batch, seq, block_size, kept)
    out = gather_blocks(x.cuda(), blocks.cuda(), block_size)
    assert out.is_cuda and torch.equal(out.cpu(), gather_blocks_ref(x, blocks, block_size))
    base, src = _data((batch, seq, *rest), dtype, seed=1), _data(out.shape, dtype, seed=2)
    scattered = scatter_blocks(base.cuda(), src.cuda(), blocks.cuda(), block_size)
    assert torch.equal(scattered.cpu(), scatter_blocks_ref(base, src, blocks, block_size))
    if dtype.is_floating_point:
        scores = _data((batch, seq), dtype, seed=3).abs()
        ref = pool_blocks_ref(scores, block_size)
        assert_within(pool_blocks(scores.cuda(), block_size).cpu(), ref, 2 * U32 * ref.double().abs(), "pooled")
