"""The blockwise quantization op: native kernels against the pure-PyTorch reference, and the reference
against bitsandbytes (an independent implementation of the same map and scheme)."""

import subprocess
from pathlib import Path

import pytest
import torch

from float_error import U32, assert_within
from lowmem.ops import build
from lowmem.ops.native import ensure_loaded
from lowmem.ops.quant import (
    dequantize_blockwise,
    dequantize_blockwise_ref,
    dynamic_map,
    quantize_blockwise,
    quantize_blockwise_ref,
)

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
SHAPES = [(1,), (123,), (4097,), (3, 1000), (256,), (64, 65)]


def _input(shape, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g) * torch.logspace(-3, 1, shape[-1])  # magnitudes over 4 decades
    x.view(-1)[0] = 0.0
    return x.to(dtype)


def test_native_extension_is_loaded_and_owns_the_cpu_dispatch():
    # The README's install builds lowmem._C; without it the suite would silently test the reference twice.
    status = ensure_loaded()
    assert status.loaded, status.reason
    for op in ("quantize_blockwise", "dequantize_blockwise"):
        table = torch._C._dispatch_dump(f"lowmem::{op}")
        cpu = [line for line in table.splitlines() if line.startswith("CPU:")]
        assert cpu and "csrc/cpu/quant_blockwise.cpp" in cpu[0], table


@pytest.mark.parametrize("preserve_sign", [True, False], ids=["keep-sign", "nearest"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[1])
def test_native_quantize_equals_reference(dtype, shape, preserve_sign):
    x = _input(shape, dtype)
    codes, absmax = quantize_blockwise(x, preserve_sign=preserve_sign)
    ref_codes, ref_absmax = quantize_blockwise_ref(x, dynamic_map(), 256, preserve_sign)
    assert codes.dtype == torch.uint8 and codes.shape == x.shape
    assert absmax.dtype == torch.float32 and absmax.shape == (-(-x.numel() // 256),)
    torch.testing.assert_close(codes, ref_codes, rtol=0, atol=0)
    torch.testing.assert_close(absmax, ref_absmax, rtol=0, atol=0)


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[1])
def test_native_dequantize_equals_reference(dtype, shape):
    codes, absmax = quantize_blockwise_ref(_input(shape, torch.float32), dynamic_map(), 256, True)
    out = dequantize_blockwise(codes, absmax, dtype=dtype)
    ref = dequantize_blockwise_ref(codes, absmax, dynamic_map(), 256, dtype)
    assert out.dtype == dtype and out.shape == codes.shape
    torch.testing.assert_close(out, ref, rtol=0, atol=0)


def test_non_contiguous_input_quantizes_like_its_contiguous_copy():
    x = _input((64, 130), torch.float32).t()  # a transposed view
    assert not x.is_contiguous()
    codes, absmax = quantize_blockwise(x)
    ref_codes, ref_absmax = quantize_blockwise_ref(x.contiguous(), dynamic_map(), 256, True)
    assert torch.equal(codes, ref_codes) and torch.equal(absmax, ref_absmax)


@pytest.mark.parametrize("blocksize", [64, 256, 4096])
def test_other_block_sizes(blocksize):
    x = _input((5000,), torch.float32)
    codes, absmax = quantize_blockwise(x, blocksize=blocksize)
    ref = quantize_blockwise_ref(x, dynamic_map(), blocksize, True)
    assert torch.equal(codes, ref[0]) and torch.equal(absmax, ref[1])
    back = dequantize_blockwise(codes, absmax, blocksize=blocksize)
    assert torch.equal(back, dequantize_blockwise_ref(*ref, dynamic_map(), blocksize, torch.float32))


def test_roundtrip_error_is_within_half_a_code_step():
    x = _input((10_000,), torch.float32)
    codes, absmax = quantize_blockwise_ref(x, dynamic_map(), 256, False)
    back = dequantize_blockwise_ref(codes, absmax, dynamic_map(), 256, torch.float32)
    code = dynamic_map()
    normed = (x.view(-1)[:9984].view(-1, 256) / absmax[:39, None]).flatten()
    nearest = (normed[:, None] - code[None]).abs().min(dim=1).values
    err = ((back.view(-1)[:9984] - x.view(-1)[:9984]).view(-1, 256) / absmax[:39, None]).flatten().abs()
    # both are distances of at most 1 computed in float32: x/absmax, its difference to the code, the code times
    # absmax, the difference to x and the quotient each round once, relative to values ≤ 1 (tests/float_error.py)
    assert_within(err, nearest, 6 * U32, "round trip")
    assert torch.all(back[absmax.repeat_interleave(256)[:10_000] > 0].abs() <= x.abs().max())


def test_preserve_sign_never_flips_or_zeroes_a_value():
    x = torch.tensor([1.0] + [1e-9, -1e-9, 3e-8, -2e-7] * 10)
    codes, absmax = quantize_blockwise(x, preserve_sign=True)
    back = dequantize_blockwise(codes, absmax)
    assert torch.equal(torch.sign(back), torch.sign(x))
    plain = dequantize_blockwise(*quantize_blockwise(x, preserve_sign=False))
    assert (plain == 0).sum() > 0  # without it, tiny values do vanish


def test_opcheck():
    x = _input((300,), torch.float32)
    torch.library.opcheck(torch.ops.lowmem.quantize_blockwise.default, (x, dynamic_map(), 256, True))
    codes, absmax = quantize_blockwise(x)
    torch.library.opcheck(torch.ops.lowmem.dequantize_blockwise.default,
                          (codes, absmax, dynamic_map(), 256, torch.bfloat16))


def test_dynamic_map_equals_bitsandbytes():
    bnb_functional = pytest.importorskip("bitsandbytes.functional")
    assert torch.equal(dynamic_map(), bnb_functional.create_dynamic_map(signed=True))


def test_as_accurate_as_bitsandbytes_and_mostly_the_same_codes():
    # bitsandbytes' CPU quantizer searches the map approximately; ours takes the exact nearest code, so it
    # must never be worse per element, and agree on nearly all codes.
    bnb_functional = pytest.importorskip("bitsandbytes.functional")
    x = _input((8192,), torch.float32, seed=3)
    codes, absmax = quantize_blockwise(x, preserve_sign=False)
    ours = dequantize_blockwise(codes, absmax)
    bnb_codes, state = bnb_functional.quantize_blockwise(x, blocksize=256)
    theirs = bnb_functional.dequantize_blockwise(bnb_codes, state)
    assert torch.equal(absmax, state.absmax)
    # never worse: the same code gives the same value; another one is farther in exact arithmetic, and each side's
    # product and difference round once (2u of |x| each, tests/float_error.py)
    assert torch.all((ours - x).abs() <= (theirs - x).abs() + 4 * U32 * x.abs())
    assert (codes == bnb_codes).float().mean() > 0.99  # a stated property of bitsandbytes' search, not a rounding bound


NVCC = build.find_nvcc()


@pytest.mark.skipif(NVCC is None, reason="nvcc not installed")
@pytest.mark.parametrize("source", build.cu_files(build.csrc_dir()), ids=lambda p: p.name)
def test_cuda_source_compiles(source: Path, tmp_path):
    result = subprocess.run(
        [NVCC, "-c", "-std=c++17", *build.NVCC_FLAGS, str(source), "-o", str(tmp_path / "kernel.o")],
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-4000:]


@pytest.mark.cuda
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[1])
def test_cuda_kernels_equal_reference(dtype, shape):
    assert ensure_loaded().with_cuda, "lowmem._C was built without CUDA kernels"
    x = _input(shape, dtype)
    codes, absmax = quantize_blockwise(x.cuda())
    ref_codes, ref_absmax = quantize_blockwise_ref(x, dynamic_map(), 256, True)
    assert torch.equal(codes.cpu(), ref_codes) and torch.equal(absmax.cpu(), ref_absmax)
    back = dequantize_blockwise(codes, absmax, dtype=dtype)
    assert torch.equal(back.cpu(), dequantize_blockwise_ref(ref_codes, ref_absmax, dynamic_map(), 256, dtype))
