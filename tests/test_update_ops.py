"""Native update kernels (sgd_update_, factored_update_) against their PyTorch references, element-wise."""

import pytest
import torch

from lowmem.ops.native import ensure_loaded
from lowmem.ops.update import factored_shapes, factored_update_, factored_update_ref, sgd_update_, sgd_update_ref

# (dtype, rtol, atol) for the weights: both sides compute in float32 and round once to the dtype, so they
# differ by at most one rounding step where float32 sums differ in the last bit.
DTYPES = [
    pytest.param(torch.float32, 2e-5, 1e-6, id="float32"),
    pytest.param(torch.bfloat16, 1.6e-2, 1e-5, id="bfloat16"),
    pytest.param(torch.float16, 1e-3, 1e-5, id="float16"),
]
SHAPES = [(1,), (123,), (4097,), (1, 123), (123, 1), (37, 129), (3, 17, 33)]
shape_id = lambda s: "x".join(map(str, s))  # noqa: E731


def tensors(shape, dtype, seed=0, non_contiguous=False):
    g = torch.Generator().manual_seed(seed)
    param = torch.randn(shape, generator=g).to(dtype)
    grad = torch.randn(shape, generator=g).to(dtype)  # large enough that lr·g survives bf16 rounding
    if non_contiguous and len(shape) >= 2:
        param = param.transpose(-1, -2).contiguous().transpose(-1, -2)  # same values, column-major strides
        grad = grad.transpose(-1, -2).contiguous().transpose(-1, -2)
        assert not param.is_contiguous()
    return param, grad


def test_native_update_ops_own_the_cpu_dispatch():
    assert ensure_loaded().loaded
    for op in ("sgd_update_", "factored_update_"):
        table = torch._C._dispatch_dump(f"lowmem::{op}")
        assert any(line.startswith("CPU:") and "csrc/cpu/update.cpp" in line for line in table.splitlines()), table


@pytest.mark.parametrize("dtype,rtol,atol", DTYPES)
@pytest.mark.parametrize("shape", SHAPES, ids=shape_id)
@pytest.mark.parametrize("weight_decay,grad_scale", [(0.0, 1.0), (0.1, 0.37)], ids=["plain", "wd-scaled"])
def test_sgd_native_equals_reference(dtype, rtol, atol, shape, weight_decay, grad_scale):
    param, grad = tensors(shape, dtype)
    ours, ref = param.clone(), param.clone()
    sgd_update_(ours, grad, 0.05, weight_decay, grad_scale)
    sgd_update_ref(ref, grad, 0.05, weight_decay, grad_scale)
    assert ours.dtype == dtype
    torch.testing.assert_close(ours, ref, rtol=rtol, atol=atol)
    assert param.numel() == 1 or not torch.equal(ours, param)  # one bf16 value may legitimately round back


def test_sgd_non_contiguous_and_float32_grad_for_bf16_weights():
    param, grad = tensors((40, 33), torch.bfloat16, non_contiguous=True)
    ours, ref = param.clone(), param.clone()
    sgd_update_(ours, grad.float(), 0.05, 0.0, 1.0)
    sgd_update_ref(ref, grad.float(), 0.05, 0.0, 1.0)
    assert not ours.is_contiguous() or ours.stride() == param.stride()
    torch.testing.assert_close(ours, ref, rtol=1.6e-2, atol=1e-5)


def factored_state(param, momentum):
    row_shape, col_shape = factored_shapes(param.shape)
    g = torch.Generator().manual_seed(9)
    row = torch.rand(row_shape, generator=g) + 0.5
    col = torch.rand(col_shape, generator=g) + 0.5 if col_shape != (0,) else torch.zeros(0)
    exp_avg = torch.randn(param.shape, generator=g) * 0.01 if momentum else torch.zeros(0)
    return row, col, exp_avg


FACTORED_OPTIONS = [
    pytest.param(dict(grad_scale=1.0, scale_parameter=True, weight_decay=0.0, beta1=0.0), False, id="adalomo"),
    pytest.param(dict(grad_scale=0.5, scale_parameter=False, weight_decay=0.1, beta1=0.0), False, id="unscaled-wd"),
    pytest.param(dict(grad_scale=2.0, scale_parameter=True, weight_decay=0.01, beta1=0.9), True, id="momentum"),
]


@pytest.mark.parametrize("dtype,rtol,atol", DTYPES)
@pytest.mark.parametrize("shape", SHAPES, ids=shape_id)
@pytest.mark.parametrize("options,momentum", FACTORED_OPTIONS)
def test_factored_native_equals_reference(dtype, rtol, atol, shape, options, momentum):
    param, grad = tensors(shape, dtype, seed=1)
    states = factored_state(param, momentum)
    ours, ref = param.clone(), param.clone()
    ours_state = [s.clone() for s in states]
    ref_state = [s.clone() for s in states]
    common = dict(beta2t=0.3, eps1=1e-30, clip_threshold=1.0, rho=0.02, eps2=1e-3, **options)
    factored_update_(ours, grad, *ours_state, **common)
    factored_update_ref(ref, grad, *ref_state, **common)
    assert ours.dtype == dtype
    torch.testing.assert_close(ours, ref, rtol=rtol, atol=atol)
    for mine, theirs in zip(ours_state, ref_state):
        torch.testing.assert_close(mine, theirs, rtol=1e-5, atol=1e-7)
    assert param.numel() == 1 or not torch.equal(ours, param)


@pytest.mark.parametrize("dtype,rtol,atol", DTYPES)
def test_factored_non_contiguous(dtype, rtol, atol):
    param, grad = tensors((45, 31), dtype, seed=2, non_contiguous=True)
    states = factored_state(param, False)
    ours, ref = param.clone(), param.clone()
    ours_state, ref_state = [s.clone() for s in states], [s.clone() for s in states]
    common = dict(grad_scale=1.0, beta2t=0.5, eps1=1e-30, clip_threshold=1.0, rho=0.01, eps2=1e-3,
                  scale_parameter=True, weight_decay=0.0, beta1=0.0)
    factored_update_(ours, grad, *ours_state, **common)
    factored_update_ref(ref, grad.contiguous(), *ref_state, **common)
    torch.testing.assert_close(ours, ref, rtol=rtol, atol=atol)


def test_clipping_engages():
    # a gradient with a huge outlier: the update's RMS exceeds d and must be scaled down to it
    param = torch.zeros(16, 16)
    grad = torch.full((16, 16), 1e-3)
    grad[0, 0] = 10.0
    row, col, exp_avg = torch.zeros(16), torch.zeros(16), torch.zeros(0)
    factored_update_(param, grad, row, col, exp_avg, beta2t=0.0, eps1=1e-30, clip_threshold=1.0, rho=1.0, eps2=1e-3,
                     scale_parameter=False, weight_decay=0.0)
    assert float(param.pow(2).mean().sqrt()) == pytest.approx(1.0, rel=1e-5)


def test_opcheck_update_ops():
    param, grad = tensors((8, 12), torch.float32)
    torch.library.opcheck(torch.ops.lowmem.sgd_update_.default, (param.clone(), grad, 0.1, 0.01, 1.0))
    row, col, exp_avg = factored_state(param, True)
    torch.library.opcheck(torch.ops.lowmem.factored_update_.default,
                          (param.clone(), grad, row, col, exp_avg, 1.0, 0.5, 1e-30, 1.0, 0.01, 1e-3, True, 0.0, 0.9))


@pytest.mark.cuda
@pytest.mark.parametrize("dtype,rtol,atol", DTYPES)
@pytest.mark.parametrize("shape", SHAPES, ids=shape_id)
@pytest.mark.parametrize("options,momentum", FACTORED_OPTIONS)
def test_cuda_update_kernels_equal_reference(dtype, rtol, atol, shape, options, momentum):
    assert ensure_loaded().with_cuda, "lowmem._C was built without CUDA kernels"
    param, grad = tensors(shape, dtype, seed=3)
    states = factored_state(param, momentum)
    ours, ref = param.clone().cuda(), param.clone()
    ours_state, ref_state = [s.clone().cuda() for s in states], [s.clone() for s in states]
    common = dict(beta2t=0.3, eps1=1e-30, clip_threshold=1.0, rho=0.02, eps2=1e-3, **options)
    factored_update_(ours, grad.cuda(), *ours_state, **common)
    factored_update_ref(ref, grad, *ref_state, **common)
    torch.testing.assert_close(ours.cpu(), ref, rtol=rtol, atol=atol)
    for mine, theirs in zip(ours_state, ref_state):
        torch.testing.assert_close(mine.cpu(), theirs, rtol=1e-5, atol=1e-7)
    sgd_ours, sgd_ref = param.clone().cuda(), param.clone()
    sgd_update_(sgd_ours, grad.cuda(), 0.05, 0.1, 0.5)
    sgd_update_ref(sgd_ref, grad, 0.05, 0.1, 0.5)
    torch.testing.assert_close(sgd_ours.cpu(), sgd_ref, rtol=rtol, atol=atol)
