"""adafactor against transformers' and torch's Adafactor, adalomo against the AdaLomo formula of DESIGN.md, each
reference computed in float64 on the same gradients; lowmem's float32 result within its arithmetic's error bound
(:func:`factored_bound`, tests/float_error.py)."""

import math

import pytest
import torch
import transformers

from float_error import U32, assert_within
from lowmem.rules.factored import Factored

SHAPES = [(12, 20), (20,), (3, 5, 7)]


def grads(shape, steps, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=g) for _ in range(steps)]


def run_ours(rule, theta, gs, lr, grad_scale=1.0):
    state = rule.init_state(theta)
    for grad in gs:
        rule.update(theta, grad, state, lr, grad_scale=grad_scale)
    return state


def run_optimizer(optimizer_cls, theta, gs, **kwargs):
    """The optimizer in float64 on float64 copies of ``theta`` and the gradients."""
    param = torch.nn.Parameter(theta.double())
    optimizer = optimizer_cls([param], **kwargs)
    for grad in gs:
        param.grad = grad.double()
        optimizer.step()
    return param.detach(), optimizer.state[param]


def rms(x):
    return float(x.pow(2).mean().sqrt())


def factored_formula(theta, gs, lr, relative_step=False, scale_parameter=True, beta1=None, wd=0.0, clip=1.0,
                     decay_rate=-0.8, eps1=1e-30, eps2=1e-3):
    """Adafactor in transformers' conventions (AdaLomo: no ``beta1``, ``scale_parameter``), exactly, in float64,
    written out independently (DESIGN.md §3): β₂ₜ = 1 − t^decay_rate; row and column means of g² + ε₁ for matrices
    (the full second moment for vectors); u = g/√v̂; u /= max(1, RMS(u)/d); α = ρ·max(ε₂, RMS(θ)) with ρ = lr, or
    min(lr, 1/√t) with ``relative_step``; optional m ← β₁m + (1 − β₁)·αu; θ ← θ − α·wd·θ − (m or αu).

    Returns (θ, per step the values :func:`factored_bound` needs, the final second-moment state)."""
    theta = theta.double().clone()
    factored = theta.dim() >= 2
    row = torch.zeros(theta.shape[:-1], dtype=torch.float64)
    col = torch.zeros(theta.shape[:-2] + theta.shape[-1:], dtype=torch.float64) if factored else None
    m = torch.zeros_like(theta)
    steps = []
    for t, g in enumerate(gs, start=1):
        g = g.double()
        beta2 = 1 - t**decay_rate
        sq = g * g + eps1
        if factored:
            row = beta2 * row + (1 - beta2) * sq.mean(-1)
            col = beta2 * col + (1 - beta2) * sq.mean(-2)
            v_hat = (row / row.mean(-1, keepdim=True)).unsqueeze(-1) * col.unsqueeze(-2)
        else:
            row = beta2 * row + (1 - beta2) * sq
            v_hat = row
        unit = g / v_hat.sqrt()
        unit = unit / max(1.0, rms(unit) / clip)
        rho = min(lr, 1 / math.sqrt(t)) if relative_step else lr
        alpha = rho * max(eps2, rms(theta)) if scale_parameter else rho
        update = alpha * unit
        m_before = m
        if beta1 is not None:
            m = beta1 * m + (1 - beta1) * update
        before = theta
        theta = theta - wd * alpha * theta - (m if beta1 is not None else update)
        steps.append(dict(alpha=alpha, update=update, m_before=m_before, before=before, after=theta))
    return theta, steps, (row, col)


def factored_bound(shape, steps, scale_parameter=True, beta1=None, wd=0.0):
    """The float32 error of lowmem's factored update (native kernel or reference) against the exact one, element by
    element, carried through ``steps`` (from :func:`factored_formula`). Per step, relative errors (u = 2⁻²⁴):

        s·g                        u
        row, col statistics        + 2u (g²) + (C or R)·u (a mean of C or R positive terms) + 6u (ε₁, the division,
                                   the β₂ₜ blend): they accumulate from step to step; a vector's full moment + 4u
        r = rsqrt(row / mean(row)) row's error (twice, halved by the root) + a mean of R + 2u; c = rsqrt(col): half
        the unit update g·r·c      their sum + 2u, then divided by its own RMS (a mean of N squares) when clipped
        α = ρ·max(ε₂, RMS(θ))      a mean of N squares, halved, + RMS(eθ)/RMS(θ) for the weight's own error + 2u
    The applied update (α·u, or the momentum whose error is bounded by its envelope, as it may cancel) adds that
    relative error times its size; weight decay α·wd·θ its own; the weight two roundings (u·|θ'| each)."""
    u = U32
    n = math.prod(shape)
    factored = len(shape) >= 2
    rows, cols = (shape[-2], shape[-1]) if factored else (1, 1)
    rel_row = rel_col = 0.0
    e_theta = torch.zeros(shape, dtype=torch.float64)
    e_m = torch.zeros(shape, dtype=torch.float64)
    for s in steps:
        rel_g = u
        if factored:
            rel_row += 2 * rel_g + (cols + 6) * u
            rel_col += 2 * rel_g + (rows + 6) * u
            rel_scale = rel_row + (rows + 2) * u / 2 + u + rel_col / 2 + u
        else:
            rel_row += 2 * rel_g + 4 * u
            rel_scale = rel_row / 2 + u
        rel_unit = rel_g + rel_scale + 2 * u
        rel_unit = 2 * rel_unit + (n + 3) * u / 2 + u  # divided by its own RMS
        rel_alpha = (n + 3) * u / 2 + rms(e_theta) / max(rms(s["before"]), 1e-300) + 2 * u if scale_parameter else 2 * u
        e_update = (rel_unit + rel_alpha + u) * s["update"].abs()
        if beta1 is not None:
            envelope = beta1 * s["m_before"].abs() + (1 - beta1) * s["update"].abs()
            e_m = beta1 * e_m + (1 - beta1) * e_update + 3 * u * envelope
            e_update = e_m
        decay = wd * s["alpha"]
        e_theta = (e_theta * (1 + decay) + decay * s["before"].abs() * (rel_alpha + 2 * u) + e_update
                   + 2 * u * s["after"].abs())
    return e_theta, rel_row, rel_col


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("options", [
    dict(scale_parameter=True, beta1=None, weight_decay=0.0),
    dict(scale_parameter=False, beta1=None, weight_decay=0.0),
    dict(scale_parameter=True, beta1=0.9, weight_decay=0.1),
], ids=["scaled", "unscaled", "momentum-wd"])
def test_adafactor_equals_transformers_in_float64_with_external_lr(shape, options):
    theta = torch.randn(shape)
    gs = grads(shape, 6)
    ours = theta.clone()
    state = run_ours(Factored(relative_step=False, **options), ours, gs, lr=3e-2)
    theirs, their_state = run_optimizer(transformers.Adafactor, theta, gs, lr=3e-2, relative_step=False,
                                        warmup_init=False, **options)
    exact, steps, (row, col) = factored_formula(theta, gs, 3e-2, scale_parameter=options["scale_parameter"],
                                                beta1=options["beta1"], wd=options["weight_decay"])
    torch.testing.assert_close(exact, theirs, rtol=1e-12, atol=1e-14)  # two float64 writings of one formula
    bound, rel_row, rel_col = factored_bound(shape, steps, options["scale_parameter"], options["beta1"],
                                             options["weight_decay"])
    assert_within(ours, theirs, bound, "weight")
    if len(shape) >= 2:
        assert_within(state["exp_avg_sq_row"], their_state["exp_avg_sq_row"], rel_row * row, "row statistic")
        assert_within(state["exp_avg_sq_col"], their_state["exp_avg_sq_col"], rel_col * col, "column statistic")
    else:
        assert_within(state["exp_avg_sq_row"], their_state["exp_avg_sq"], rel_row * row, "second moment")
    assert float(bound.max()) < 1e-3 * float((theirs - theta.double()).abs().max())  # not vacuous


@pytest.mark.parametrize("shape", SHAPES[:2], ids=lambda s: "x".join(map(str, s)))
def test_adafactor_relative_step_equals_transformers_at_lr_1e_2(shape):
    theta = torch.randn(shape)
    gs = grads(shape, 5, seed=1)
    ours = theta.clone()
    run_ours(Factored(relative_step=True), ours, gs, lr=1e-2)
    theirs, _ = run_optimizer(transformers.Adafactor, theta, gs, lr=None, relative_step=True,
                              scale_parameter=True, warmup_init=False)
    exact, steps, _ = factored_formula(theta, gs, 1e-2, relative_step=True)
    torch.testing.assert_close(exact, theirs, rtol=1e-12, atol=1e-14)
    assert_within(ours, theirs, factored_bound(shape, steps)[0], "weight")


@pytest.mark.parametrize("shape", SHAPES[:2], ids=lambda s: "x".join(map(str, s)))
def test_adafactor_relative_step_equals_torch_adafactor(shape):
    # lr 0.5 makes min(lr, 1/sqrt(t)) switch branches within the 12 steps
    theta = torch.randn(shape)
    gs = grads(shape, 12, seed=2)
    ours = theta.clone()
    run_ours(Factored(relative_step=True, eps1=1e-30), ours, gs, lr=0.5)
    theirs, _ = run_optimizer(torch.optim.Adafactor, theta, gs, lr=0.5, beta2_decay=-0.8,
                              eps=(None, 1e-3), d=1.0, weight_decay=0.0, foreach=False)
    # torch floors v̂ at ε₁² (ε₁: float64's machine epsilon) where lowmem adds ε₁ = 10⁻³⁰ to g²: both ~10⁻³⁰ of v̂ here
    exact, steps, _ = factored_formula(theta, gs, 0.5, relative_step=True)
    torch.testing.assert_close(exact, theirs, rtol=1e-12, atol=1e-14)
    assert_within(ours, theirs, factored_bound(shape, steps)[0], "weight")


@pytest.mark.parametrize("shape", SHAPES[:2], ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("wd", [0.0, 0.1])
def test_adalomo_equals_the_formula(shape, wd):
    """DESIGN.md §3's AdaLomo: β₂ₜ = 1 − t^−0.8; factored row/col second moment of g² + 10⁻³⁰ (full for vectors);
    u = g/√v; u /= max(1, RMS(u)); α = lr·max(10⁻³, RMS(θ)); θ ← θ(1 − α·wd) − α·u."""
    from lowmem.config import UpdateConfig
    from lowmem.rules import make_rule

    theta = torch.randn(shape)
    gs = grads(shape, 8, seed=3)
    ours = theta.clone()
    rule = make_rule(UpdateConfig(rule="adalomo", weight_decay=wd))
    state = run_ours(rule, ours, gs, lr=1e-2)
    exact, steps, _ = factored_formula(theta, gs, 1e-2, wd=wd)
    assert_within(ours, exact, factored_bound(shape, steps, wd=wd)[0], "weight")
    assert "exp_avg" not in state  # AdaLomo keeps no first moment


def test_grad_scale_equals_scaling_the_gradient():
    # 0.25 is a power of two: scaling by it is exact, so both runs compute the very same float32 values
    theta = torch.randn(8, 9)
    gs = grads((8, 9), 3, seed=4)
    a, b = theta.clone(), theta.clone()
    run_ours(Factored(beta1=0.5), a, [g * 0.25 for g in gs], lr=1e-2)
    run_ours(Factored(beta1=0.5), b, gs, lr=1e-2, grad_scale=0.25)
    assert torch.equal(a, b)


def test_factored_state_is_o_of_rows_plus_columns():
    rule = Factored()
    state = rule.init_state(torch.zeros(300, 500))
    assert sum(t.numel() for t in state.values()) == 300 + 500 + 1
    assert math.prod(rule.init_state(torch.zeros(64)).get("exp_avg_sq_row").shape) == 64
