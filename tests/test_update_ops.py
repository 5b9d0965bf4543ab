"""Native update kernels (sgd_update_, factored_update_) against their PyTorch references, element-wise."""

import pytest
import torch

from float_error import U32, assert_within, dtype_step
from lowmem.ops.native import ensure_loaded
from lowmem.ops.update import factored_shapes, factored_update_, factored_update_ref, sgd_update_, sgd_update_ref

DTYPES = [pytest.param(torch.float32, id="float32"), pytest.param(torch.bfloat16, id="bfloat16"),
          pytest.param(torch.float16, id="float16")]
U = U32
SHAPES = [(1,), (123,), (4097,), (1, 123), (123, 1), (37, 129), (3, 17, 33)]
shape_id = lambda s: "x".join(map(str, s))  # noqa: E731


def sgd_pair_bound(param, grad, ref, lr, weight_decay, grad_scale):
    """Native and reference SGD from the same inputs, each within its float32 error of the exact step (the decay
    factor and its product: 2u·|θ|; s·g and lr·(s·g): 3u·lr·|s·g|; the sum: u·|θ'|), then each rounded once to the
    weight's dtype (tests/float_error.py)."""
    one = 2 * U * param.double().abs() + 3 * U * lr * (grad.double() * grad_scale).abs() + U * ref.double().abs()
    return 2 * one + (dtype_step(param.dtype, ref) if param.dtype != torch.float32 else 0)


def factored_pair_bounds(param, ref, states_before, *, step, lr, relative_step=False, scale_parameter,
                         weight_decay, beta1=0.0, eps2, **_):
    """Native and reference factored steps from the same inputs, each within its float32 error of the exact step,
    then each rounded once to the weight's dtype: bounds on the weight and on each state tensor.

    One side's relative error on the update α·u (u = 2⁻²⁴; as tests/test_factored_rules.py's ``factored_bound`` for
    one step from a given state): the row and column statistics are means of C and R positive terms, blended
    ((C + 8)u, (R + 8)u); r = rsqrt(row / mean of R rows) and c = rsqrt(col) halve them; the unit update g·r·c,
    divided by its RMS (a mean of N squares), doubles its error; α's RMS(θ) is a mean of N squares. The size of α·u
    comes from the reference (to first order the exact one): |θ' − θ(1 − α·wd)| is |α·u|, or with a momentum
    |m'| = |β₁m + (1 − β₁)α·u|, whose error is bounded by its envelope β₁|m| + (1 − β₁)|α·u|. The decay term adds
    its own; the weight two roundings."""
    theta = param.double()
    shape = param.shape
    n = theta.numel()
    rows, cols = (shape[-2], shape[-1]) if len(shape) >= 2 else (1, 1)
    rel_row, rel_col = (cols + 8) * U, (rows + 8) * U
    rel_scale = rel_row + (rows + 2) * U / 2 + U + rel_col / 2 + U if len(shape) >= 2 else 3 * U + U
    rel_unit = 2 * (U + rel_scale + 2 * U) + (n + 3) * U / 2 + U
    rel_alpha = (n + 3) * U / 2 + 2 * U
    rho = min(lr, step**-0.5) if relative_step else lr
    alpha = rho * max(eps2, float(theta.pow(2).mean().sqrt())) if scale_parameter else rho
    applied = (ref.double() - theta * (1 - alpha * weight_decay)).abs()
    row, col, exp_avg = states_before
    bounds = {}
    if exp_avg.numel():
        m = exp_avg.double().abs()
        update = (applied + beta1 * m) / (1 - beta1)
        e_applied = (1 - beta1) * (rel_unit + rel_alpha + U) * update + 3 * U * (beta1 * m + (1 - beta1) * update)
        bounds["exp_avg"] = 2 * e_applied
    else:
        e_applied = (rel_unit + rel_alpha + U) * applied
    one = e_applied + (rel_alpha + 2 * U) * alpha * weight_decay * theta.abs() + 2 * U * ref.double().abs()
    bounds["weight"] = 2 * one + (dtype_step(param.dtype, ref) if param.dtype != torch.float32 else 0)
    bounds["row"] = 2 * rel_row if len(shape) >= 2 else 2 * 6 * U  # relative
    bounds["col"] = 2 * rel_col
    return bounds


def assert_factored_pair(ours, ref, ours_state, ref_state, param, states_before, options):
    bounds = factored_pair_bounds(param, ref, states_before, **options)
    assert_within(ours.cpu(), ref, bounds["weight"], "weight")
    assert_within(ours_state[0].cpu(), ref_state[0], bounds["row"] * ref_state[0].double().abs(), "row statistic")
    assert_within(ours_state[1].cpu(), ref_state[1], bounds["col"] * ref_state[1].double().abs(), "column statistic")
    if "exp_avg" in bounds:
        assert_within(ours_state[2].cpu(), ref_state[2], bounds["exp_avg"], "momentum")


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


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES, ids=shape_id)
@pytest.mark.parametrize("weight_decay,grad_scale", [(0.0, 1.0), (0.1, 0.37)], ids=["plain", "wd-scaled"])
def test_sgd_native_equals_reference(dtype, shape, weight_decay, grad_scale):
    param, grad = tensors(shape, dtype)
    ours, ref = param.clone(), param.clone()
    sgd_update_(ours, grad, 0.05, weight_decay, grad_scale)
    sgd_update_ref(ref, grad, 0.05, weight_decay, grad_scale)
    assert ours.dtype == dtype
    assert_within(ours, ref, sgd_pair_bound(param, grad, ref, 0.05, weight_decay, grad_scale))
    assert param.numel() == 1 or not torch.equal(ours, param)  # one bf16 value may legitimately round back


def factored_ref(param, grad, row, col, exp_avg, *, step, grad_scale=1.0, lr, relative_step=False, decay_rate, eps1,
                 clip_threshold, eps2, scale_parameter, weight_decay, beta1=0.0):
    """The reference with the op's keyword interface (its device scalars as CPU tensors)."""
    factored_update_ref(param, grad, row, col, exp_avg, torch.tensor(float(step)), torch.tensor(float(grad_scale)), lr,
                        relative_step, decay_rate, eps1, clip_threshold, eps2, scale_parameter, weight_decay, beta1)


def float32_grad_case(device="cpu"):
    """A bfloat16 weight 1.0 and a float32 gradient 2⁻⁹(1 + 2⁻¹⁰) that bfloat16 cannot hold: read at full
    precision, 1 − g lies below the midpoint of its two bfloat16 neighbours and rounds down to 1 − 2⁻⁸; rounded
    to bfloat16 first (2⁻⁹), it lands on the midpoint and rounds to even, back to 1.0."""
    param = torch.ones(8, dtype=torch.bfloat16, device=device)
    grad = torch.full((8,), 2.0**-9 * (1 + 2.0**-10), dtype=torch.float32, device=device)
    return param, grad, torch.full((8,), 1 - 2.0**-8, dtype=torch.bfloat16)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)])
def test_a_float32_gradient_of_a_bfloat16_weight_is_not_rounded_first(device):
    param, grad, expected = float32_grad_case(device)
    sgd_update_(param, grad, 1.0, 0.0, 1.0)
    assert torch.equal(param.cpu(), expected)
    ref, grad, _ = float32_grad_case()
    sgd_update_ref(ref, grad, 1.0, 0.0, 1.0)
    assert torch.equal(ref, expected)


def test_sgd_non_contiguous_and_float32_grad_for_bf16_weights():
    param, grad = tensors((40, 33), torch.bfloat16, non_contiguous=True)
    ours, ref = param.clone(), param.clone()
    sgd_update_(ours, grad.float(), 0.05, 0.0, 1.0)
    sgd_update_ref(ref, grad.float(), 0.05, 0.0, 1.0)
    assert not ours.is_contiguous() or ours.stride() == param.stride()
    assert_within(ours, ref, sgd_pair_bound(param, grad.float(), ref, 0.05, 0.0, 1.0))


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
    # ρ = min(lr, 1/√t) = 1/√10⁴ = 0.01 < lr
    pytest.param(dict(grad_scale=1.0, scale_parameter=True, weight_decay=0.0, relative_step=True, step=1e4), False,
                 id="relative-step"),
]
FACTORED_COMMON = dict(step=2.0, decay_rate=-0.8, lr=0.02, eps1=1e-30, clip_threshold=1.0, eps2=1e-3)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES, ids=shape_id)
@pytest.mark.parametrize("options,momentum", FACTORED_OPTIONS)
def test_factored_native_equals_reference(dtype, shape, options, momentum):
    param, grad = tensors(shape, dtype, seed=1)
    states = factored_state(param, momentum)
    ours, ref = param.clone(), param.clone()
    ours_state = [s.clone() for s in states]
    ref_state = [s.clone() for s in states]
    common = {**FACTORED_COMMON, **options}
    factored_update_(ours, grad, *ours_state, **common)
    factored_ref(ref, grad, *ref_state, **common)
    assert ours.dtype == dtype
    assert_factored_pair(ours, ref, ours_state, ref_state, param, states, common)
    assert param.numel() == 1 or not torch.equal(ours, param)


@pytest.mark.parametrize("dtype", DTYPES)
def test_factored_non_contiguous(dtype):
    param, grad = tensors((45, 31), dtype, seed=2, non_contiguous=True)
    states = factored_state(param, False)
    ours, ref = param.clone(), param.clone()
    ours_state, ref_state = [s.clone() for s in states], [s.clone() for s in states]
    common = dict(FACTORED_COMMON, scale_parameter=True, weight_decay=0.0)
    factored_update_(ours, grad, *ours_state, **common)
    factored_ref(ref, grad.contiguous(), *ref_state, **common)
    assert_factored_pair(ours, ref, ours_state, ref_state, param, states, common)


def test_clipping_engages():
    # a gradient with a huge outlier: the update's RMS exceeds d and must be scaled down to it
    param = torch.zeros(16, 16)
    grad = torch.full((16, 16), 1e-3)
    grad[0, 0] = 10.0
    row, col, exp_avg = torch.zeros(16), torch.zeros(16), torch.zeros(0)
    # decay_rate 0: β₂ₜ = 1 − t⁰ = 0, the second moment is this gradient's alone
    factored_update_(param, grad, row, col, exp_avg, step=1.0, decay_rate=0.0, lr=1.0, eps1=1e-30, clip_threshold=1.0,
                     eps2=1e-3, scale_parameter=False, weight_decay=0.0)
    # the RMS of N = 256 float32 values: a mean of N squares and a square root, (N/2 + 2)·u relative
    assert abs(float(param.pow(2).mean().sqrt()) - 1.0) <= (256 / 2 + 2) * U


def test_opcheck_update_ops():
    param, grad = tensors((8, 12), torch.float32)
    scale, step = torch.tensor(0.5), torch.tensor(3.0)
    torch.library.opcheck(torch.ops.lowmem.sgd_update_.default, (param.clone(), grad, 0.1, 0.01, scale))
    row, col, exp_avg = factored_state(param, True)
    torch.library.opcheck(torch.ops.lowmem.factored_update_.default,
                          (param.clone(), grad, row, col, exp_avg, step, scale, 0.01, True, -0.8, 1e-30, 1.0, 1e-3, True,
                           0.0, 0.9))


@pytest.mark.parametrize("call,match", [
    (lambda p, g: sgd_update_(p, g.view(-1)[:-1], 0.1), "grad has 11 elements, param 12"),
    (lambda p, g: torch.ops.lowmem.sgd_update_(p, g, 0.1, 0.0, torch.ones(2)), "grad_scale must be one float32 value"),
    (lambda p, g: torch.ops.lowmem.sgd_update_(p, g, 0.1, 0.0, torch.ones((), dtype=torch.float64)),
     "grad_scale must be one float32 value"),
    (lambda p, g: factored_update_(p, g, torch.zeros(5), torch.zeros(4), torch.zeros(0), step=1.0, decay_rate=-0.8,
                                   lr=0.1, eps1=1e-30, clip_threshold=1.0, eps2=1e-3, scale_parameter=True,
                                   weight_decay=0.0), "row/col state hold 5/4 values, the param needs 3/4"),
    (lambda p, g: factored_update_(p.view(-1), g.view(-1), torch.zeros(11), torch.zeros(0), torch.zeros(0), step=1.0,
                                   decay_rate=-0.8, lr=0.1, eps1=1e-30, clip_threshold=1.0, eps2=1e-3,
                                   scale_parameter=True, weight_decay=0.0), "second moment of a vector holds 11"),
    (lambda p, g: factored_update_(p, g, torch.zeros(3), torch.zeros(4), torch.zeros(5), step=1.0, decay_rate=-0.8,
                                   lr=0.1, eps1=1e-30, clip_threshold=1.0, eps2=1e-3, scale_parameter=True,
                                   weight_decay=0.0), "exp_avg must be empty or match the param"),
], ids=["grad-size", "scale-size", "scale-dtype", "row-col", "vector", "exp-avg"])
def test_bad_arguments_get_one_line_errors(call, match):
    param, grad = tensors((3, 4), torch.float32)
    with pytest.raises(RuntimeError, match=match) as err:
        call(param, grad)
    assert "\n" not in str(err.value).split("\nException raised from")[0].strip()


def assert_cuda_factored_equals_reference(param, grad, momentum, **options):
    """One factored step on the GPU and in the reference on the CPU, from the same weight, gradient and state."""
    states = factored_state(param, momentum)
    ours, ref = param.clone().cuda(), param.clone()
    ours_state, ref_state = [s.clone().cuda() for s in states], [s.clone() for s in states]
    common = {**FACTORED_COMMON, **options}
    factored_update_(ours, grad.cuda(), *ours_state, **common)
    factored_ref(ref, grad, *ref_state, **common)
    assert_factored_pair(ours, ref, ours_state, ref_state, param, states, common)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES, ids=shape_id)
@pytest.mark.parametrize("options,momentum", FACTORED_OPTIONS)
def test_cuda_update_kernels_equal_reference(dtype, shape, options, momentum):
    assert ensure_loaded().with_cuda, "lowmem._C was built without CUDA kernels"
    param, grad = tensors(shape, dtype, seed=3)
    assert_cuda_factored_equals_reference(param, grad, momentum, **options)
    sgd_ours, sgd_ref = param.clone().cuda(), param.clone()
    sgd_update_(sgd_ours, grad.cuda(), 0.05, 0.1, 0.5)
    sgd_update_ref(sgd_ref, grad, 0.05, 0.1, 0.5)
    assert_within(sgd_ours.cpu(), sgd_ref, sgd_pair_bound(param, grad, sgd_ref, 0.05, 0.1, 0.5))


@pytest.mark.cuda
@pytest.mark.parametrize("shape", [(37, 129), (4097,), (300, 4096)], ids=shape_id)
def test_cuda_factored_with_a_float32_gradient_of_a_bfloat16_weight(shape):
    param, grad = tensors(shape, torch.bfloat16, seed=4)
    grad = grad.float() * 1.001  # values bfloat16 cannot hold
    assert_cuda_factored_equals_reference(param, grad, False, scale_parameter=True, weight_decay=0.0)


@pytest.mark.cuda
def test_cuda_ops_refuse_host_scalars_and_mixed_devices():
    param, grad = tensors((3, 4), torch.float32)
    with pytest.raises(RuntimeError, match="grad_scale is on cpu, param on cuda"):
        torch.ops.lowmem.sgd_update_(param.cuda(), grad.cuda(), 0.1, 0.0, torch.ones(()))
    with pytest.raises(RuntimeError, match="grad is on cpu, param on cuda"):
        sgd_update_(param.cuda(), grad, 0.1)


@pytest.mark.cuda
def test_cuda_factored_with_more_than_65535_stacked_matrices():
    # a conv-like [256, 257, 3, 3] weight is 65792 stacked 3×3 matrices: more than a grid's y or z dimension holds
    param, grad = tensors((256, 257, 3, 3), torch.float32, seed=6)
    assert_cuda_factored_equals_reference(param, grad, False, scale_parameter=True, weight_decay=0.0)
