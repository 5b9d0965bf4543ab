"""Updates from a row-sparse gradient (lowmem/ops/update_rows.py) against the same updates from the dense gradient.

The native row-sparse kernels must write the dense kernels' bits (they are the dense kernels reading the gradient
through the slots); the references must agree with the dense references to float64 rounding of sums taken in
another order; native and reference agree as the dense pair does (tests/test_update_ops.py's bounds)."""

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from lowmem.ops.native import ensure_loaded
from lowmem.ops.update import factored_update_, factored_update_ref, sgd_update_
from lowmem.ops.update_rows import (factored_update_rows_, factored_update_rows_ref, row_slots, sgd_update_rows_,
                                    sgd_update_rows_ref)
from test_update_ops import assert_factored_pair, sgd_pair_bound

DTYPES = [pytest.param(torch.float32, id="float32"), pytest.param(torch.bfloat16, id="bfloat16"),
          pytest.param(torch.float16, id="float16")]
# (rows, cols, rows with a gradient): odd sizes, one row, none, all, a 1-row matrix
CASES = [(37, 129, [0, 5, 36]), (1000, 33, list(range(0, 1000, 7))), (64, 256, []), (9, 17, list(range(9))),
         (1, 5, [0]), (300, 1, [299, 3])]
case_id = lambda c: f"{c[0]}x{c[1]}-{len(c[2])}rows"  # noqa: E731
OPTIONS = [
    pytest.param(dict(scale_parameter=True, weight_decay=0.0), id="adalomo"),
    pytest.param(dict(scale_parameter=True, weight_decay=0.1, grad_scale=0.5), id="adalomo-wd-scaled"),
    pytest.param(dict(scale_parameter=False, weight_decay=0.01, relative_step=True), id="adafactor-relative"),
]
FACTORED = dict(lr=1e-2, decay_rate=-0.8, eps1=1e-30, clip_threshold=1.0, eps2=1e-3)


def row_sparse(n_rows, n_cols, present, dtype, values_dtype=torch.float32, device="cpu", seed=0):
    """(param, rows, values, the same gradient dense): values in a shuffled order, so slots are not the identity."""
    gen = torch.Generator().manual_seed(seed)
    param = torch.randn(n_rows, n_cols, generator=gen).to(dtype)
    rows = torch.tensor(present, dtype=torch.long)
    rows = rows[torch.randperm(len(present), generator=gen)]
    values = (torch.randn(len(present), n_cols, generator=gen) * 1e-2).to(values_dtype)
    dense = torch.zeros(n_rows, n_cols, dtype=values_dtype)
    dense[rows] = values
    return param.to(device), rows.to(device), values.to(device), dense.to(device)


def factored_state(n_rows, n_cols, device="cpu", seed=1):
    """Row and column statistics after some steps (not the zeros of a first step), and the step count."""
    gen = torch.Generator().manual_seed(seed)
    row = torch.rand(n_rows, generator=gen) * 1e-4 + 1e-6
    col = torch.rand(n_cols, generator=gen) * 1e-4 + 1e-6
    return row.to(device), col.to(device), torch.tensor(3.0, device=device)


def run_factored(rows_op, param, state, grad_args, step, **options):
    p, row, col = param.clone(), state[0].clone(), state[1].clone()
    kw = {**FACTORED, **options}
    if rows_op:
        factored_update_rows_(p, *grad_args, row, col, step=step, **kw)
    else:
        factored_update_(p, grad_args[0], row, col, p.new_empty((0,), dtype=torch.float32), step=step, **kw)
    return p, row, col


@pytest.mark.parametrize("values_dtype", [torch.float32, "param"], ids=["float32-values", "param-dtype-values"])
@pytest.mark.parametrize("options", OPTIONS)
@pytest.mark.parametrize("case", CASES, ids=case_id)
@pytest.mark.parametrize("dtype", DTYPES)
def test_factored_rows_native_equals_dense_bit_for_bit(dtype, case, options, values_dtype):
    n_rows, n_cols, present = case
    vdtype = dtype if values_dtype == "param" else values_dtype
    param, rows, values, dense = row_sparse(n_rows, n_cols, present, dtype, vdtype)
    state = factored_state(n_rows, n_cols)
    sparse = run_factored(True, param, state, (rows, values), state[2], **options)
    full = run_factored(False, param, state, (dense,), state[2], **options)
    for ours, theirs in zip(sparse, full):
        assert torch.equal(ours, theirs)
    if present or (options["weight_decay"] and dtype == torch.float32):  # bf16 rounds a 1e-3 decay away
        assert not torch.equal(sparse[0], param)


@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
@pytest.mark.parametrize("case", CASES, ids=case_id)
@pytest.mark.parametrize("dtype", DTYPES)
def test_sgd_rows_native_equals_dense_bit_for_bit(dtype, case, weight_decay):
    n_rows, n_cols, present = case
    param, rows, values, dense = row_sparse(n_rows, n_cols, present, dtype)
    sparse, full = param.clone(), param.clone()
    sgd_update_rows_(sparse, rows, values, 0.05, weight_decay, torch.tensor(0.5))
    sgd_update_(full, dense, 0.05, weight_decay, torch.tensor(0.5))
    assert torch.equal(sparse, full)


@pytest.mark.parametrize("options", OPTIONS)
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_factored_rows_reference_equals_dense_reference_in_float64(case, options):
    """The reference over the k rows and the dense reference differ only in the order of their sums: in float64,
    each of ≤ R·C terms carries ≤ (R·C)·2⁻⁵³ relative error, far below 1e-12."""
    n_rows, n_cols, present = case
    param, rows, values, dense = row_sparse(n_rows, n_cols, present, torch.float64, torch.float64)
    row, col, step = (t.double() for t in factored_state(n_rows, n_cols))
    kw = {**FACTORED, "relative_step": False, "grad_scale": torch.tensor(1.0, dtype=torch.float64), **options}
    kw["grad_scale"] = torch.as_tensor(kw["grad_scale"], dtype=torch.float64)
    ordered = ("grad_scale", "lr", "relative_step", "decay_rate", "eps1", "clip_threshold", "eps2", "scale_parameter",
               "weight_decay")
    a = [param.clone(), row.clone(), col.clone()]
    factored_update_rows_ref(a[0], row_slots(rows, n_rows), values, a[1], a[2], step, *(kw[k] for k in ordered))
    b = [param.clone(), row.clone(), col.clone()]
    factored_update_ref(b[0], dense, b[1], b[2], param.new_empty((0,)), step, *(kw[k] for k in ordered), 0.0)
    for ours, theirs in zip(a, b):
        torch.testing.assert_close(ours, theirs, rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_sgd_rows_reference_equals_dense_reference(case, weight_decay):
    """Element-wise: the same operations on each element, so the same bits (float32)."""
    n_rows, n_cols, present = case
    param, rows, values, dense = row_sparse(n_rows, n_cols, present, torch.float32)
    a, b = param.clone(), param.clone()
    sgd_update_rows_ref(a, row_slots(rows, n_rows), values, 0.05, weight_decay, torch.tensor(0.5))
    from lowmem.ops.update import sgd_update_ref

    sgd_update_ref(b, dense, 0.05, weight_decay, torch.tensor(0.5))
    assert torch.equal(a, b)


@pytest.mark.parametrize("options", OPTIONS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_factored_rows_native_equals_reference(dtype, options):
    n_rows, n_cols, present = CASES[1]
    param, rows, values, dense = row_sparse(n_rows, n_cols, present, dtype)
    row, col, step = factored_state(n_rows, n_cols)
    kw = {**FACTORED, "relative_step": False, "grad_scale": 1.0, **options}
    ours = run_factored(True, param, (row, col), (rows, values), step, **kw)
    theirs = [param.clone(), row.clone(), col.clone()]
    factored_update_rows_ref(theirs[0], row_slots(rows, n_rows), values, theirs[1], theirs[2], step,
                             torch.tensor(float(kw["grad_scale"])), kw["lr"], kw["relative_step"], kw["decay_rate"],
                             kw["eps1"], kw["clip_threshold"], kw["eps2"], kw["scale_parameter"], kw["weight_decay"])
    empty = param.new_empty((0,), dtype=torch.float32)
    assert_factored_pair(ours[0], theirs[0], [ours[1], ours[2], empty], [theirs[1], theirs[2], empty], param,
                         (row, col, empty), {**kw, "step": float(step)})


@pytest.mark.parametrize("dtype", DTYPES)
def test_sgd_rows_native_equals_reference(dtype):
    n_rows, n_cols, present = CASES[1]
    param, rows, values, dense = row_sparse(n_rows, n_cols, present, dtype)
    ours, ref = param.clone(), param.clone()
    sgd_update_rows_(ours, rows, values, 0.05, 0.1, torch.tensor(0.5))
    sgd_update_rows_ref(ref, row_slots(rows, n_rows), values, 0.05, 0.1, torch.tensor(0.5))
    bound = sgd_pair_bound(param, dense, ref, 0.05, 0.1, 0.5)
    assert ((ours.double() - ref.double()).abs() <= bound).all()


def test_rows_ops_run_on_fake_tensors():
    """The planner simulates the trainer's step on fake tensors: the ops, their slots included, must run there."""
    with FakeTensorMode(allow_non_fake_inputs=True):  # as the planner runs it: cached constants are real
        param, rows, values = torch.empty(1000, 64), torch.arange(10), torch.empty(10, 64)
        row, col = torch.empty(1000), torch.empty(64)
        sgd_update_rows_(param, rows, values, 0.1)
        factored_update_rows_(param, rows, values, row, col, step=torch.ones(()), lr=0.1, **{
            k: v for k, v in FACTORED.items() if k != "lr"}, scale_parameter=True, weight_decay=0.0)


def test_opcheck_rows_ops():
    ensure_loaded()
    param, rows, values, _ = row_sparse(37, 129, [0, 5, 36], torch.float32)
    slot = row_slots(rows, 37)
    torch.library.opcheck(torch.ops.lowmem.sgd_update_rows_, (param.clone(), slot, values, 0.1, 0.0, torch.ones(())))
    row, col, step = factored_state(37, 129)
    torch.library.opcheck(torch.ops.lowmem.factored_update_rows_,
                          (param.clone(), slot, values, row, col, step, torch.ones(()), 0.01, False, -0.8, 1e-30, 1.0,
                           1e-3, True, 0.0))


@pytest.mark.parametrize("call, match", [
    (lambda: torch.ops.lowmem.sgd_update_rows_(torch.zeros(4, 3), torch.tensor([0, 5, -1, -1], dtype=torch.int32),
                                               torch.zeros(2, 3), 0.1, 0.0, torch.ones(())),
     r"slot\[1\] = 5 but values has 2 rows"),
    (lambda: torch.ops.lowmem.sgd_update_rows_(torch.zeros(4, 3), torch.zeros(3, dtype=torch.int32),
                                               torch.zeros(2, 3), 0.1, 0.0, torch.ones(())),
     "slot must be contiguous int32 with one entry per row"),
    (lambda: torch.ops.lowmem.sgd_update_rows_(torch.zeros(4, 3), torch.zeros(4, dtype=torch.int32),
                                               torch.zeros(2, 4), 0.1, 0.0, torch.ones(())),
     "values must be k × 3"),
    (lambda: torch.ops.lowmem.sgd_update_rows_(torch.zeros(12), torch.zeros(12, dtype=torch.int32),
                                               torch.zeros(2, 1), 0.1, 0.0, torch.ones(())),
     "needs a matrix param"),
])
def test_bad_arguments_get_one_line_errors(call, match):
    ensure_loaded()
    with pytest.raises(RuntimeError, match=match):
        call()


@pytest.mark.cuda
@pytest.mark.parametrize("options", OPTIONS)
@pytest.mark.parametrize("case", CASES, ids=case_id)
@pytest.mark.parametrize("dtype", DTYPES)
def test_cuda_rows_equal_cuda_dense(dtype, case, options):
    """On CUDA the factored update's Σu² is added across blocks by atomicAdd, in no fixed order, so even two dense
    runs may differ in the clip divisor's last bits: the statistics must be equal, the weights within a rounding."""
    assert ensure_loaded().with_cuda, "lowmem._C was built without CUDA kernels"
    n_rows, n_cols, present = case
    param, rows, values, dense = row_sparse(n_rows, n_cols, present, dtype, device="cuda")
    state = factored_state(n_rows, n_cols, "cuda")
    sparse = run_factored(True, param, state, (rows, values), state[2], **options)
    full = run_factored(False, param, state, (dense,), state[2], **options)
    assert torch.equal(sparse[1], full[1]) and torch.equal(sparse[2], full[2])
    torch.testing.assert_close(sparse[0], full[0], rtol=2 * torch.finfo(dtype).eps, atol=0)
    a, b = param.clone(), param.clone()
    sgd_update_rows_(a, rows, values, 0.05, 0.1, torch.tensor(0.5, device="cuda"))
    sgd_update_(b, dense, 0.05, 0.1, torch.tensor(0.5, device="cuda"))
    assert torch.equal(a, b)
