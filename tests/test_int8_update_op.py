"""The fused int8-weight update (lowmem/ops/int8_update.py, csrc/{cpu,cuda}/int8_update.*): the Philox noise against
Random123's known answers, native against reference bit for bit for every rule (outliers, refreshes, masks, odd
sizes, 16-bit gradients), the factored reductions against their reference within float32 summation bounds, the fake
implementation, one-line errors, and no host read in a step."""

import pytest
import torch

from float_error import U32
from lowmem.weights.int8 import Int8Weight
from lowmem.ops import int8_update as iu
from lowmem.ops.native import ensure_loaded
from lowmem.ops.quant import dynamic_map, quantize_blockwise_ref

RULES = [iu.SGD, iu.FACTORED, iu.LION, iu.LION8BIT, iu.ASSIGN]
SHAPES = [(7, 129), (37, 300), (64, 256), (1, 5000)]
SEED = 12345678901  # wider than 32 bits: both key words matter


def shape_id(shape):
    return "x".join(map(str, shape))


@pytest.mark.parametrize("counter,key,expected", [
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((0xFFFFFFFF,) * 4, (0xFFFFFFFF, 0xFFFFFFFF), (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
     (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
], ids=["zeros", "ones", "pi"])
def test_philox_matches_random123_known_answers(counter, key, expected):
    words = iu.philox4x32_10([torch.tensor([c]) for c in counter], key)
    assert tuple(int(w) for w in words) == expected


def test_rounding_noise_depends_on_the_element_not_on_where_the_range_starts():
    whole = iu.rounding_noise(1003, SEED, 7)
    assert torch.equal(whole[501:], iu.rounding_noise(502, SEED, 7, start=501))
    assert float(whole.min()) >= 0.0 and float(whole.max()) < 1.0
    assert torch.equal(whole * 2**24, torch.floor(whole * 2**24))  # multiples of 2⁻²⁴
    # uniform: the mean of 10⁵ draws within 6 standard errors (σ = 1/√12) of 1/2
    many = iu.rounding_noise(100_000, SEED, 1)
    assert abs(float(many.double().mean()) - 0.5) <= 6 * (1 / 12) ** 0.5 / 100_000**0.5


def weight_buffers(shape, dtype=torch.float32, outlier_fraction=0.03, blocksize=256, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = Int8Weight((torch.randn(shape, generator=g) * 0.05).to(dtype), outlier_fraction=outlier_fraction,
                   blocksize=blocksize)
    return [w.codes, w.absmax, w.outlier_index, w.outlier_value]


def rule_inputs(rule, shape, blocksize, seed=1):
    """The op's rule arguments for one step, made reproducibly (each call makes fresh state tensors)."""
    g = torch.Generator().manual_seed(seed)
    n = shape[0] * shape[1]
    if rule == iu.LION:
        return {"state": torch.randn(n, generator=g) * 0.01, "beta1": 0.9, "beta2": 0.99}
    if rule == iu.LION8BIT:
        codes, absmax = quantize_blockwise_ref(torch.randn(n, generator=g) * 0.01, dynamic_map(), blocksize, True)
        return {"state": codes, "state_absmax": absmax, "state_code": dynamic_map(), "beta1": 0.9, "beta2": 0.99}
    if rule == iu.FACTORED:
        return {"coef": torch.rand(shape[0] + shape[1] + 2, generator=g) + 0.5,
                "state": torch.randn(n, generator=g) * 0.01, "beta1": 0.9}
    return {}


def run(impl, buffers, grad, mask, rule, inputs, scale, **scalars):
    """One step through ``impl`` (the registered op or the reference) on clones; returns every written tensor."""
    buffers = [b.clone() for b in buffers]
    state = {k: (v.clone() if k in ("state", "state_absmax") else v) for k, v in inputs.items()}
    none = torch.empty(0)
    args = (*buffers, grad, mask if mask is not None else torch.empty(0, dtype=torch.bool), state.get("state", none),
            state.get("state_absmax", none), state.get("state_code", none), state.get("coef", none), scale, rule,
            scalars["lr"], scalars["weight_decay"], state.get("beta1", 0.0), state.get("beta2", 0.0), SEED,
            scalars["step"], scalars["refresh"], scalars["stochastic"], scalars["blocksize"])
    impl(*args)
    return buffers + [state[k] for k in ("state", "state_absmax") if k in state]


def assert_native_equals_reference(shape, rule, grad_dtype=torch.float32, refresh=False, masked=False, blocksize=256,
                                   stochastic=True, weight_decay=0.01, scale=0.37, outlier_fraction=0.03,
                                   weight_dtype=torch.float32):
    assert ensure_loaded().loaded
    buffers = weight_buffers(shape, weight_dtype, outlier_fraction, blocksize)
    g = torch.Generator().manual_seed(3)
    grad = (torch.randn(shape, generator=g) * (0.05 if rule == iu.ASSIGN else 1.0)).to(grad_dtype)
    mask = torch.rand(shape, generator=g) > 0.5 if masked else None
    inputs = rule_inputs(rule, shape, blocksize)
    scalars = {"lr": 1e-3, "weight_decay": weight_decay, "step": 7, "refresh": refresh, "stochastic": stochastic,
               "blocksize": blocksize}
    native = run(torch.ops.lowmem.int8_update_, buffers, grad, mask, rule, inputs, torch.tensor(scale), **scalars)
    ref = run(iu.int8_update_ref, buffers, grad, mask, rule, inputs, torch.tensor(scale), **scalars)
    names = ["codes", "absmax", "outlier_index", "outlier_value", "state", "state_absmax"]
    for name, a, b in zip(names, native, ref):
        assert a.dtype == b.dtype and torch.equal(a, b), f"{name} differs: {(a != b).sum()} of {a.numel()} elements"
    return native, buffers


@pytest.mark.parametrize("rule", RULES, ids=lambda r: iu.RULE_NAMES[r])
@pytest.mark.parametrize("shape", SHAPES, ids=shape_id)
@pytest.mark.parametrize("refresh", [False, True], ids=["step", "refresh"])
@pytest.mark.parametrize("masked", [False, True], ids=["dense", "masked"])
def test_native_equals_reference_bit_for_bit(rule, shape, refresh, masked):
    native, before = assert_native_equals_reference(shape, rule, refresh=refresh, masked=masked)
    assert not torch.equal(native[0], before[0])  # the step moved codes: the comparison is not of two no-ops


@pytest.mark.parametrize("rule", RULES, ids=lambda r: iu.RULE_NAMES[r])
@pytest.mark.parametrize("grad_dtype", [torch.bfloat16, torch.float16], ids=str)
def test_native_equals_reference_with_16_bit_gradients(rule, grad_dtype):
    assert_native_equals_reference((37, 300), rule, grad_dtype=grad_dtype, refresh=True)


@pytest.mark.parametrize("rule", [iu.SGD, iu.FACTORED, iu.LION], ids=lambda r: iu.RULE_NAMES[r])
@pytest.mark.parametrize("blocksize", [64, 100, 4096])
def test_native_equals_reference_for_other_block_sizes(rule, blocksize):
    for refresh in (False, True):
        assert_native_equals_reference((37, 300), rule, refresh=refresh, blocksize=blocksize)


@pytest.mark.parametrize("outlier_fraction", [0.0, 1.0], ids=["no-outliers", "all-outliers"])
def test_native_equals_reference_at_the_outlier_extremes(outlier_fraction):
    for refresh in (False, True):
        assert_native_equals_reference((7, 129), iu.SGD, refresh=refresh, outlier_fraction=outlier_fraction)


def test_refresh_breaks_ties_by_the_lower_index_as_the_reference():
    # a bfloat16 weight and no step (lr 0, no decay): many equal magnitudes at the n_outliers-th largest
    buffers = weight_buffers((64, 300), torch.bfloat16, 0.05)
    assert_native_equals_reference((64, 300), iu.ASSIGN, refresh=True, weight_dtype=torch.bfloat16,
                                   grad_dtype=torch.bfloat16)
    w = iu._dequantized(*buffers, 256)
    kth = torch.sort(w.abs(), descending=True).values[buffers[2].numel() - 1]
    assert int((w.abs() == kth).sum()) > 1  # the case is there


def test_round_to_nearest_equals_reference():
    for rule in (iu.SGD, iu.ASSIGN):
        assert_native_equals_reference((37, 300), rule, stochastic=False, refresh=True)


def test_native_kernels_own_the_cpu_dispatch():
    assert ensure_loaded().loaded
    for op in ("int8_update_", "int8_factored_prepare"):
        table = torch._C._dispatch_dump(f"lowmem::{op}")
        assert any(line.startswith("CPU:") and "csrc/cpu/int8_update.cpp" in line for line in table.splitlines()), table


def prepare_inputs(shape, grad_dtype=torch.float32, seed=4):
    g = torch.Generator().manual_seed(seed)
    codes, absmax, _, outlier_value = weight_buffers(shape, seed=seed)
    grad = torch.randn(shape, generator=g).to(grad_dtype)
    row, col = (torch.rand(shape[0], generator=g) + 0.5) * 0.01, (torch.rand(shape[1], generator=g) + 0.5) * 0.01
    return codes, absmax, outlier_value, grad, row, col


PREPARE = {"lr": 1e-2, "relative_step": False, "decay_rate": -0.8, "eps1": 1e-30, "clip_threshold": 1.0, "eps2": 1e-3,
           "scale_parameter": True, "blocksize": 256}


@pytest.mark.parametrize("shape", SHAPES, ids=shape_id)
@pytest.mark.parametrize("grad_dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("relative_step", [False, True], ids=["lr", "relative"])
def test_factored_prepare_native_equals_reference_within_summation_bounds(shape, grad_dtype, relative_step):
    codes, absmax, outlier_value, grad, row, col = prepare_inputs(shape, grad_dtype)
    step, scale = torch.tensor(3.0), torch.tensor(0.37)
    options = {**PREPARE, "relative_step": relative_step}
    ours_row, ours_col, ref_row, ref_col = row.clone(), col.clone(), row.clone(), col.clone()
    ours = torch.ops.lowmem.int8_factored_prepare(codes, absmax, outlier_value, grad, ours_row, ours_col, step, scale,
                                                  *options.values())
    ref = iu.int8_factored_prepare_ref(codes, absmax, outlier_value, grad, ref_row, ref_col, step, scale,
                                       *options.values())
    assert ours.dtype == ref.dtype == torch.float32 and ours.shape == ref.shape == (shape[0] + shape[1] + 2,)
    rows, cols = shape
    # Each statistic is a mean of positive terms (relative error ≤ (n − 1)·u in any summation order; the native sums
    # in double) plus a few roundings (the EMA, the row mean, rsqrt, the division by the clip): the bound is
    # (n + 8)·u relative, for n the longest sum behind the value.
    for name, a, b, n in (("row", ours_row, ref_row, cols), ("col", ours_col, ref_col, rows),
                          ("r", ours[:rows], ref[:rows], rows + cols), ("c", ours[rows:-2], ref[rows:-2], rows),
                          ("divisor", ours[-2:-1], ref[-2:-1], rows * cols), ("alpha", ours[-1:], ref[-1:], rows * cols)):
        tolerance = (n + 8) * U32 * b.double().abs()
        assert ((a.double() - b.double()).abs() <= tolerance).all(), f"{name}: {(a - b).abs().max()}"
    assert float(ours[-2]) > 1.0  # the clip engaged (unit-variance gradient against rsqrt of ~1 statistics)


def test_fake_implementations_run_under_fake_tensors():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode(allow_non_fake_inputs=True):  # as the planner runs: shared constants are real tensors
        w = Int8Weight(torch.empty(300, 37), outlier_fraction=0.01)
        grad = torch.empty(300, 37)
        row, col = torch.empty(300), torch.empty(37)
        coef = iu.int8_factored_prepare(w.codes, w.absmax, w.outlier_value, grad, row, col, step=torch.tensor(1.0),
                                        **{k: v for k, v in PREPARE.items()})
        assert coef.shape == (300 + 37 + 2,) and coef.dtype == torch.float32
        iu.int8_update_(w.codes, w.absmax, w.outlier_index, w.outlier_value, grad, rule=iu.FACTORED, coef=coef,
                        lr=1e-3, refresh=True)


def test_opcheck():
    buffers = weight_buffers((7, 129))
    grad = torch.randn(7, 129)
    none = torch.empty(0)
    torch.library.opcheck(torch.ops.lowmem.int8_update_.default,
                          (*buffers, grad, torch.empty(0, dtype=torch.bool), none, none, none, none, torch.tensor(1.0),
                           iu.SGD, 1e-3, 0.0, 0.0, 0.0, 5, 3, True, True, 256))
    codes, absmax, outlier_value, grad, row, col = prepare_inputs((7, 129))
    torch.library.opcheck(torch.ops.lowmem.int8_factored_prepare.default,
                          (codes, absmax, outlier_value, grad, row, col, torch.tensor(2.0), torch.tensor(1.0),
                           *PREPARE.values()))


@pytest.mark.parametrize("change,match", [
    ({"grad": torch.zeros(5)}, "grad has 5 elements on cpu, the weight 903"),
    ({"rule": 9}, "unknown rule 9"),
    ({"mask": torch.ones(903, dtype=torch.float32)}, "mask must be empty or a contiguous bool tensor"),
    ({"rule": iu.LION, "state": torch.zeros(10)}, "state must be a contiguous float32 tensor of the weight's size"),
    ({"rule": iu.FACTORED, "coef": torch.zeros(3)}, "needs a 2-D gradient and rows \\+ cols \\+ 2"),
    ({"rule": iu.LION8BIT, "state": torch.zeros(903, dtype=torch.uint8), "state_absmax": torch.zeros(2),
      "state_code": dynamic_map()}, "lion8bit's momentum blocks must be the weight's"),
], ids=["grad", "rule", "mask", "lion-state", "coef", "lion8bit-blocks"])
def test_bad_arguments_get_one_line_errors(change, match):
    buffers = weight_buffers((7, 129))
    args = {"grad": torch.randn(7, 129), "rule": iu.SGD, **change}
    with pytest.raises(RuntimeError, match=match) as err:
        iu.int8_update_(*buffers, args.pop("grad"), **args)
    assert "\n" not in str(err.value).split("\nException raised from")[0].strip()


@pytest.mark.parametrize("rule", ["sgd", "adalomo", "adafactor", "lion", "lion8bit"])
def test_an_int8_step_reads_nothing_on_the_host(rule):
    from lowmem.config import UpdateConfig
    from lowmem.placement.host_sync import ForbidHostReads
    from lowmem.rules import make_rule

    w = Int8Weight(torch.randn(64, 300) * 0.05, outlier_fraction=0.01, refresh_every=2)
    made = make_rule(UpdateConfig(rule=rule))
    state = made.init_state(w.template(), "q_proj.weight")
    with ForbidHostReads():
        for _ in range(2):  # an ordinary step, then a refresh
            w.update_with(made, torch.randn(64, 300), state, 1e-3, grad_scale=torch.tensor(0.5))


@pytest.mark.cuda
@pytest.mark.parametrize("rule", RULES, ids=lambda r: iu.RULE_NAMES[r])
@pytest.mark.parametrize("refresh", [False, True], ids=["step", "refresh"])
@pytest.mark.parametrize("grad_dtype", [torch.float32, torch.bfloat16], ids=str)
def test_cuda_equals_cpu_bit_for_bit(rule, refresh, grad_dtype):
    shape, blocksize = (37, 300), 256
    buffers = weight_buffers(shape)
    g = torch.Generator().manual_seed(3)
    grad = (torch.randn(shape, generator=g) * 0.05).to(grad_dtype)
    mask = torch.rand(shape, generator=g) > 0.3
    inputs = rule_inputs(rule, shape, blocksize)
    scalars = {"lr": 1e-3, "weight_decay": 0.01, "step": 9, "refresh": refresh, "stochastic": True,
               "blocksize": blocksize}
    cpu = run(torch.ops.lowmem.int8_update_, buffers, grad, mask, rule, inputs, torch.tensor(0.37), **scalars)
    on_cuda = {k: (v.cuda() if isinstance(v, torch.Tensor) else v) for k, v in inputs.items()}
    cuda = run(torch.ops.lowmem.int8_update_, [b.cuda() for b in buffers], grad.cuda(), mask.cuda(), rule, on_cuda,
               torch.tensor(0.37, device="cuda"), **scalars)
    for a, b in zip(cpu, cuda):
        assert torch.equal(a, b.cpu())


@pytest.mark.cuda
def test_cuda_factored_prepare_within_summation_bounds_of_the_cpu():
    shape = (37, 300)
    codes, absmax, outlier_value, grad, row, col = prepare_inputs(shape)
    step, scale = torch.tensor(3.0), torch.tensor(0.37)
    cpu = torch.ops.lowmem.int8_factored_prepare(codes, absmax, outlier_value, grad, row.clone(), col.clone(), step,
                                                 scale, *PREPARE.values())
    cuda = torch.ops.lowmem.int8_factored_prepare(codes.cuda(), absmax.cuda(), outlier_value.cuda(), grad.cuda(),
                                                  row.cuda(), col.cuda(), step.cuda(), scale.cuda(), *PREPARE.values())
    # both sum in double: they differ by the final roundings to float32 and rsqrt's ulp
    assert ((cuda.cpu().double() - cpu.double()).abs() <= 8 * U32 * cpu.double().abs()).all()


@pytest.mark.cuda
@pytest.mark.parametrize("shape,blocksize,stochastic,grad_dtype,mask_share", [
    ((37, 300), 100, True, torch.float16, 0.3),     # blocks that start off a multiple of 4, a half gradient
    ((37, 300), 4096, True, torch.float32, 0.3),    # the kernel's largest block
    ((512, 600), 256, True, torch.bfloat16, 0.3),   # 1200 blocks: more than one per thread of the offsets scan
    ((37, 300), 256, False, torch.float32, 0.3),    # round to nearest
    ((37, 300), 256, True, torch.float32, 0.99),    # more zeros than outliers: the ties at 0 split by index
], ids=["bs100-fp16", "bs4096", "1200-blocks", "nearest", "ties-at-zero"])
def test_cuda_equals_cpu_bit_for_bit_on_the_edges(shape, blocksize, stochastic, grad_dtype, mask_share):
    g = torch.Generator().manual_seed(5)
    grad = (torch.randn(shape, generator=g) * 0.05).to(grad_dtype)
    mask = torch.rand(shape, generator=g) > mask_share
    for rule in (iu.SGD, iu.LION, iu.FACTORED):
        buffers = weight_buffers(shape, blocksize=blocksize)
        inputs = rule_inputs(rule, shape, blocksize)
        for refresh in (False, True):
            scalars = {"lr": 1e-3, "weight_decay": 0.01, "step": 9, "refresh": refresh, "stochastic": stochastic,
                       "blocksize": blocksize}
            cpu = run(torch.ops.lowmem.int8_update_, buffers, grad, mask, rule, inputs, torch.tensor(0.37), **scalars)
            on_cuda = {k: (v.cuda() if isinstance(v, torch.Tensor) else v) for k, v in inputs.items()}
            cuda = run(torch.ops.lowmem.int8_update_, [b.cuda() for b in buffers], grad.cuda(), mask.cuda(), rule,
                       on_cuda, torch.tensor(0.37, device="cuda"), **scalars)
            for a, b in zip(cpu, cuda):
                assert torch.equal(a, b.cpu()), (iu.RULE_NAMES[rule], refresh)
