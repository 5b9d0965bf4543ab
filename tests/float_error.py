"""Tolerances from float arithmetic, never from what one machine happened to give.

A comparison of two computations that differ only in rounding is bounded by what IEEE-754 arithmetic can produce on
any machine, whatever order a CPU (scalar, AVX2, AVX-512 kernels; any thread count) or a GPU runs it in:

* one rounding of a value x to a format of unit roundoff u moves it by at most u·|x| (round to nearest; a fused
  multiply-add rounds once where two operations round twice, so it only does better);
* a sum of n terms, in any order or tree, is off by at most (n − 1)·u·Σ|terms| (Higham, *Accuracy and Stability of
  Numerical Algorithms*, 2nd ed., §4.2): relative to the sum when the terms have one sign (squares, counts), but
  relative to Σ|terms| when they cancel, which is why a momentum's error is bounded by its envelope
  (β·M + (1 − β)·|g|, the same recursion on absolute values), not by its value;
* a square root halves a relative error, a product or a quotient adds the relative errors of its operands;
* the bounds are first order: products of two rounding errors (u² ≈ 4·10⁻¹⁵ in float32) are left out.

Each test says which of these its bound adds up, next to the bound. A reference computed in float64 has a unit
roundoff 2²⁹ times smaller than float32's, so its own error is left out of a bound on a float32 computation.

``make test`` also runs the numerical tests with torch's scalar CPU kernels (``ATEN_CPU_CAPABILITY=default``), which
sum in another order than the vectorized ones: a tolerance picked from one machine fails there.
"""

from __future__ import annotations

import torch

UNIT_ROUNDOFF = {torch.float32: 2.0**-24, torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11, torch.float64: 2.0**-53}
U32 = UNIT_ROUNDOFF[torch.float32]


def norm_error(n: int) -> float:
    """Relative error of a float32 2-norm of ``n`` values, in any summation order: the squares round (u), their sum
    is off by (n − 1)·u relative (positive terms), the square root halves that and rounds once more."""
    return (n * U32) / 2 + U32


def dtype_step(dtype: torch.dtype, value: torch.Tensor) -> torch.Tensor:
    """One rounding step (an ulp, 2u relative) of ``dtype`` at ``value``: two computations that agree in float32 up
    to e and then each round once to ``dtype`` may land on neighbouring values of it."""
    return 2 * UNIT_ROUNDOFF[dtype] * value.double().abs()


def assert_within(actual: torch.Tensor, expected: torch.Tensor, bound, what: str = "") -> None:
    """|actual − expected| ≤ bound, element by element (in float64); the message names the worst element and the
    share of the bound the worst one used."""
    diff = (actual.detach().double() - expected.detach().double()).abs()
    bound = torch.as_tensor(bound, dtype=torch.float64).expand_as(diff)
    over = diff > bound
    if bool(over.any()):
        i = int((diff - bound).flatten().argmax())
        raise AssertionError(
            f"{what}: {int(over.sum())} of {diff.numel()} elements outside the float bound; worst at flat index {i}: "
            f"|{float(actual.flatten()[i]):.9g} - {float(expected.flatten()[i]):.9g}| = {float(diff.flatten()[i]):.3g} "
            f"> {float(bound.flatten()[i]):.3g}")


def used_share(actual: torch.Tensor, expected: torch.Tensor, bound) -> float:
    """The largest |actual − expected| / bound (how much of a bound the comparison used)."""
    diff = (actual.detach().double() - expected.detach().double()).abs()
    bound = torch.as_tensor(bound, dtype=torch.float64).expand_as(diff)
    return float((diff / bound.clamp_min(1e-300)).max())


# A float64 sum of up to 10⁴ terms is off by at most 10⁴·2⁻⁵³ ≈ 1.1·10⁻¹² of its terms' magnitudes; SUM64 leaves a
# factor 100 above that for the products a gradient's chain rule multiplies such sums by.
SUM64 = 1e-10

# Two float64 runs of the same math in another arrangement (a strategy against the plain loop it replaces, micro-batches
# against one batch, a chunked loss against the plain one), over a test's few steps of a tiny model. Each gradient
# element is a sum of at most n ≈ 10⁴ terms of size ≤ 1 (the loss is normalized by its tokens), so it is off by at most
# n·2⁻⁵³ ≈ 1.1·10⁻¹²; Adam divides by √v + ε, with ε ≥ 10⁻⁵ in these tests, so an update moves by at most
# lr·1.1·10⁻⁷ per step: ≤ 2·10⁻⁹ over six steps at lr 3·10⁻³ (SGD and the factored rules far less). A loss, a sum of
# ≤ 10⁴ positive terms, is off by ≤ 1.1·10⁻¹² relative, plus what those weight differences move it (‖∇L‖·‖Δθ‖ with
# ‖∇L‖ ≤ 1 and ‖Δθ‖ ≤ 2·10⁻⁹·√(10⁵ weights) ≈ 10⁻⁶ absolute, ~10⁻⁷ of a loss near 7). A bug moves a weight by a
# step's size (≥ lr·10⁻³ ≈ 10⁻⁶ here) and a loss by ~10⁻³ of itself.
RUN64_WEIGHT_ATOL = 1e-8
RUN64_LOSS_RTOL = 1e-6
RUN64_ADAM_EPS = ["update.eps=1e-5"]  # the ε the bound above assumes (recipe override)


def assert_same_run64(a, b, what: str = "") -> None:
    """Two float64 tensors (weights of two runs) within :data:`RUN64_WEIGHT_ATOL`."""
    assert a.dtype == b.dtype == torch.float64, (a.dtype, b.dtype)
    assert_within(a, b, RUN64_WEIGHT_ATOL, what)


def assert_same_grads64(grads: dict, others: dict, what: str = "") -> None:
    """Float64 gradients of one loss computed in two arrangements (name → tensor, the same names): each element of
    ``others`` within SUM64 of the largest entry of ``grads``, the scale of the sums every gradient is made of (a
    gradient that is ~0, like a key bias's, is off by what its terms' sizes allow, not by its own size)."""
    assert grads.keys() == others.keys(), (sorted(grads), sorted(others))
    scale = max(float(g.abs().max()) for g in grads.values())
    for name, grad in grads.items():
        assert_within(others[name], grad, SUM64 * scale, f"{what} {name}".strip())


def matmul_pair_bound(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """How far two float32 computations of ``a @ b`` (in any blocking or order) may be apart, element by element: each
    is a sum of k products, off by at most k·u·(|a| @ |b|) (the products round too), so together by twice that."""
    k = a.shape[-1]
    return 2 * k * U32 * (a.detach().double().abs() @ b.detach().double().abs())
