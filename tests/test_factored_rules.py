"""adafactor against transformers' and torch's Adafactor; adalomo against the AdaLomo formula of
DESIGN.md written out independently here (float64)."""

import math

import pytest
import torch
import transformers

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
    param = torch.nn.Parameter(theta)
    optimizer = optimizer_cls([param], **kwargs)
    for grad in gs:
        param.grad = grad.clone()
        optimizer.step()
    return param.detach(), optimizer.state[param]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("options", [
    dict(scale_parameter=True, beta1=None, weight_decay=0.0),
    dict(scale_parameter=False, beta1=None, weight_decay=0.0),
    dict(scale_parameter=True, beta1=0.9, weight_decay=0.1),
], ids=["scaled", "unscaled", "momentum-wd"])
def test_adafactor_equals_transformers_with_external_lr(shape, options):
    theta = torch.randn(shape)
    gs = grads(shape, 6)
    ours = theta.clone()
    state = run_ours(Factored(relative_step=False, **options), ours, gs, lr=3e-2)
    theirs, their_state = run_optimizer(transformers.Adafactor, theta.clone(), gs, lr=3e-2, relative_step=False,
                                        warmup_init=False, **options)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)
    if len(shape) >= 2:
        torch.testing.assert_close(state["exp_avg_sq_row"], their_state["exp_avg_sq_row"], rtol=1e-5, atol=0)
        torch.testing.assert_close(state["exp_avg_sq_col"], their_state["exp_avg_sq_col"], rtol=1e-5, atol=0)
    else:
        torch.testing.assert_close(state["exp_avg_sq_row"], their_state["exp_avg_sq"], rtol=1e-5, atol=0)


@pytest.mark.parametrize("shape", SHAPES[:2], ids=lambda s: "x".join(map(str, s)))
def test_adafactor_relative_step_equals_transformers_at_lr_1e_2(shape):
    theta = torch.randn(shape)
    gs = grads(shape, 5, seed=1)
    ours = theta.clone()
    run_ours(Factored(relative_step=True), ours, gs, lr=1e-2)
    theirs, _ = run_optimizer(transformers.Adafactor, theta.clone(), gs, lr=None, relative_step=True,
                              scale_parameter=True, warmup_init=False)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("shape", SHAPES[:2], ids=lambda s: "x".join(map(str, s)))
def test_adafactor_relative_step_equals_torch_adafactor(shape):
    # lr 0.5 makes min(lr, 1/sqrt(t)) switch branches within the 12 steps
    theta = torch.randn(shape)
    gs = grads(shape, 12, seed=2)
    ours = theta.clone()
    run_ours(Factored(relative_step=True, eps1=1e-30), ours, gs, lr=0.5)
    theirs, _ = run_optimizer(torch.optim.Adafactor, theta.clone(), gs, lr=0.5, beta2_decay=-0.8,
                              eps=(None, 1e-3), d=1.0, weight_decay=0.0, foreach=False)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)


def adalomo_formula(theta, gs, lr, wd):
    """DESIGN.md §3: beta2_t = 1 - t^-0.8; factored row/col second moment of g² + 1e-30 for matrices, full
    for vectors; u = g/sqrt(v); u /= max(1, RMS(u)); alpha = lr·max(1e-3, RMS(θ)); θ ← θ(1 − α·wd) − α·u."""
    theta = theta.double().clone()
    r = c = v = None
    for t, g in enumerate(gs, start=1):
        g = g.double()
        beta2 = 1 - t ** -0.8
        sq = g * g + 1e-30
        if theta.dim() == 2:
            r = sq.mean(1) if r is None else beta2 * r + (1 - beta2) * sq.mean(1)
            c = sq.mean(0) if c is None else beta2 * c + (1 - beta2) * sq.mean(0)
            v_hat = torch.outer(r, c) / r.mean()
        else:
            v = sq if v is None else beta2 * v + (1 - beta2) * sq
            v_hat = v
        u = g / v_hat.sqrt()
        u = u / max(1.0, float(u.pow(2).mean().sqrt()))
        alpha = lr * max(1e-3, float(theta.pow(2).mean().sqrt()))
        theta = theta * (1 - alpha * wd) - alpha * u
    return theta.float()


@pytest.mark.parametrize("shape", SHAPES[:2], ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("wd", [0.0, 0.1])
def test_adalomo_equals_the_formula(shape, wd):
    from lowmem.config import UpdateConfig
    from lowmem.rules import make_rule

    theta = torch.randn(shape)
    gs = grads(shape, 8, seed=3)
    ours = theta.clone()
    rule = make_rule(UpdateConfig(rule="adalomo", weight_decay=wd))
    state = run_ours(rule, ours, gs, lr=1e-2)
    torch.testing.assert_close(ours, adalomo_formula(theta, gs, 1e-2, wd), rtol=1e-5, atol=1e-6)
    assert "exp_avg" not in state  # AdaLomo keeps no first moment


def test_grad_scale_equals_scaling_the_gradient():
    theta = torch.randn(8, 9)
    gs = grads((8, 9), 3, seed=4)
    a, b = theta.clone(), theta.clone()
    run_ours(Factored(beta1=0.5), a, [g * 0.25 for g in gs], lr=1e-2)
    run_ours(Factored(beta1=0.5), b, gs, lr=1e-2, grad_scale=0.25)
    torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_factored_state_is_o_of_rows_plus_columns():
    rule = Factored()
    state = rule.init_state(torch.zeros(300, 500))
    assert sum(t.numel() for t in state.values()) == 300 + 500 + 1
    assert math.prod(rule.init_state(torch.zeros(64)).get("exp_avg_sq_row").shape) == 64
