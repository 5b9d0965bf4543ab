"""Rules under the standard strategy against torch's own optimizers, step for step, on a tiny Llama.

The reference is torch's optimizer run in float64 on float64 copies of the weights, fed at every step the very
gradients lowmem's step used (its clipping recomputed by ``torch.nn.utils.clip_grad_norm_`` in float64). So the two
differ only by lowmem's float32 arithmetic, and the tolerance is that arithmetic's error bound, carried element by
element through the steps (tests/float_error.py). Comparing two float32 runs instead fails on other CPUs: the second
step's gradients come from weights that differ in the last bit, and Adam divides by √v + ε, which turns those
differences into relative errors far above float32's where a gradient is small.
"""

import pytest
import torch

from float_error import U32, assert_within, norm_error
from lowmem.config import UpdateConfig
from lowmem.activations.loss import count_label_tokens, loss_sum
from lowmem.model import load_model
from lowmem.rules import make_rule
from lowmem.strategies import make_strategy


def batches(n, vocab, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(0, vocab, (2, 24), generator=g)
        out.append({"input_ids": ids, "labels": ids.clone(), "attention_mask": torch.ones_like(ids)})
    return out


LRS = [1e-2, 5e-3, 2e-3]


def lowmem_steps(model, update, data, lrs):
    """The standard strategy's steps; per step (strategy, lr, the gradients it stepped on in float64, its stats)."""
    strategy = make_strategy("standard", model, make_rule(update), update)
    for batch, lr in zip(data, lrs):
        strategy.prepare(lr)
        strategy.backward(loss_sum(model, batch) / count_label_tokens(batch))
        grads = {n: p.grad.detach().double().clone() for n, p in model.named_parameters() if p.grad is not None}
        stats = strategy.step()
        yield strategy, lr, grads, stats


class Reference:
    """A torch optimizer over float64 copies of ``model``'s weights, stepped on the gradients lowmem used."""

    def __init__(self, model, make_optimizer, clip):
        self.params = {n: p.detach().double().clone().requires_grad_(True) for n, p in model.named_parameters()}
        self.optimizer = make_optimizer(list(self.params.values()))
        self.clip = clip

    def step(self, grads, lr):
        """One step; returns (the float64 global gradient norm, the clipped gradients it stepped on)."""
        for name, p in self.params.items():
            p.grad = grads[name].clone()
        norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads.values()]))
        if self.clip is not None:
            torch.nn.utils.clip_grad_norm_(list(self.params.values()), self.clip)
        clipped = {n: p.grad.clone() for n, p in self.params.items()}
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return float(norm), clipped


def scale_error(model, stats, norm64, clip):
    """The relative error δ of lowmem's clipping coefficient, read from the float32 norm it reports, after checking
    that norm: each tensor's norm and the norm of norms within :func:`norm_error` (any summation order). The
    coefficient min(1, c/(norm + 10⁻⁶)) adds two roundings (the sum, the quotient)."""
    norm32 = float(stats["grad_norm"])
    sizes = [p.numel() for p in model.parameters()]
    assert abs(norm32 - norm64) <= (norm_error(max(sizes)) + norm_error(len(sizes))) * norm64, (norm32, norm64)
    if clip is None:
        return 0.0
    return abs(norm32 - norm64) / norm64 + 2 * U32


@pytest.mark.parametrize("weight_decay,clip", [(0.0, None), (0.1, 0.5)], ids=["plain", "wd-clip"])
def test_sgd_equals_torch_sgd_in_float64(micro_model_path, weight_decay, clip):
    """θ ← θ·(1 − lr·wd) − lr·(s·g), float32, per element per step (``sgd_update_``): the factor 1 − lr·wd and its
    product round (2u·|θ|); s·g carries the coefficient's δ and rounds, lr·(s·g) rounds twice more ((δ + 3u)·lr·|g|);
    the sum rounds (u·|θ'|). The previous step's error is carried, scaled by the decay."""
    model = load_model(micro_model_path, "float32")
    reference = Reference(model, lambda ps: torch.optim.SGD(ps, lr=1.0, weight_decay=weight_decay), clip)
    bound = {n: torch.zeros_like(p) for n, p in reference.params.items()}
    data = batches(3, model.config.vocab_size)
    update = UpdateConfig(rule="sgd", weight_decay=weight_decay, clip_grad_norm=clip)
    for _, lr, grads, stats in lowmem_steps(model, update, data, LRS):
        before = {n: p.detach().clone() for n, p in reference.params.items()}
        norm64, clipped = reference.step(grads, lr)
        delta = scale_error(model, stats, norm64, clip)
        for name, p in reference.params.items():
            after = p.detach()
            bound[name] = ((1 - lr * weight_decay) * bound[name] + 2 * U32 * before[name].abs()
                           + lr * clipped[name].abs() * (delta + 3 * U32) + U32 * after.abs())
    moved = 0.0
    for name, param in model.named_parameters():
        assert_within(param, reference.params[name], bound[name], name)
        moved += float((reference.params[name] - before[name]).detach().abs().sum())
    assert moved > 0  # the last step moved the weights
    assert clip is None or stats["grad_norm"] > clip  # and clipping was on


class AdamWBound:
    """The float32 error of lowmem's AdamW (``lowmem/rules/adamw.py``), element by element, against AdamW computed
    exactly on the same gradients; it also computes the exact moments m, v.

    Per step, with g the exact clipped gradient and δ the clipping coefficient's relative error:
        s·g                     (δ + u)·|g|
        m ← lerp(m, g, 1 − β₁)  em ← β₁·em + (1 − β₁)·(δ + u)·|g| + 4u·(β₁|m| + (1 − β₁)|g|)   (may cancel: envelope)
        v ← β₂v + (1 − β₂)g²    ev ← β₂·ev + (1 − β₂)·g²·(2δ + 3u) + 4u·v'                     (positive terms)
        q = m̂ / (√v̂ + ε)        e_q = em/bc₁/d + |q|·(ev/2v + 8u): the square root halves ev/v; √bc₂ is rounded to
                                float32 and divides, ε adds, the quotient rounds, −lr/bc₁ is rounded and multiplies
        θ ← θ(1 − lr·wd) − lr·q  eθ ← (1 − lr·wd)·eθ + 2u·|θ| + lr·e_q + u·|θ'|
    """

    def __init__(self, like, beta1, beta2, eps, weight_decay):
        self.beta1, self.beta2, self.eps, self.wd = beta1, beta2, eps, weight_decay
        self.m, self.v = torch.zeros_like(like), torch.zeros_like(like)
        self.em, self.ev, self.theta = torch.zeros_like(like), torch.zeros_like(like), torch.zeros_like(like)
        self.t = 0

    def step(self, g, delta, lr, before, after):
        b1, b2, u = self.beta1, self.beta2, U32
        self.t += 1
        self.em = b1 * self.em + (1 - b1) * (delta + u) * g.abs() + 4 * u * (b1 * self.m.abs() + (1 - b1) * g.abs())
        self.m = b1 * self.m + (1 - b1) * g
        self.v = b2 * self.v + (1 - b2) * g * g
        self.ev = b2 * self.ev + (1 - b2) * g * g * (2 * delta + 3 * u) + 4 * u * self.v
        bc1, bc2 = 1 - b1**self.t, 1 - b2**self.t
        d = (self.v / bc2).sqrt() + self.eps
        q = self.m / bc1 / d
        relative_v = torch.where(self.v > 0, self.ev / (2 * self.v).clamp_min(1e-300), torch.zeros_like(self.v))
        e_q = self.em / bc1 / d + q.abs() * (relative_v + 8 * u)
        self.theta = (1 - lr * self.wd) * self.theta + 2 * u * before.abs() + lr * e_q + u * after.abs()


@pytest.mark.parametrize("weight_decay,clip", [(0.0, None), (0.05, 1.0)], ids=["plain", "wd-clip"])
def test_adamw_equals_torch_adamw_in_float64(micro_model_path, weight_decay, clip):
    betas, eps = (0.8, 0.95), 1e-6
    model = load_model(micro_model_path, "float32")
    reference = Reference(model, lambda ps: torch.optim.AdamW(ps, lr=1.0, betas=betas, eps=eps, weight_decay=weight_decay,
                                                              foreach=False), clip)
    bounds = {n: AdamWBound(p.detach(), *betas, eps, weight_decay) for n, p in reference.params.items()}
    update = UpdateConfig(rule="adamw", weight_decay=weight_decay, clip_grad_norm=clip, beta1=betas[0], beta2=betas[1],
                          eps=eps)
    data = batches(3, model.config.vocab_size, seed=1)
    for strategy, lr, grads, stats in lowmem_steps(model, update, data, LRS):
        before = {n: p.detach().clone() for n, p in reference.params.items()}
        norm64, clipped = reference.step(grads, lr)
        delta = scale_error(model, stats, norm64, clip)
        for name, p in reference.params.items():
            bounds[name].step(clipped[name], delta, lr, before[name], p.detach())
    for name, param in model.named_parameters():
        theirs = reference.params[name]
        assert_within(param, theirs, bounds[name].theta, name)
        # the moments agree too
        exp_avg = reference.optimizer.state[theirs]["exp_avg"]
        assert_within(strategy.state.by_param[name]["exp_avg"], exp_avg, bounds[name].em, f"{name} exp_avg")
    # the bound is not vacuous: the weights moved by far more than it allows (a bug in the rule moves them by ~lr)
    moves = torch.cat([(reference.params[n] - before[n]).abs().flatten() for n in reference.params])
    allowed = torch.cat([bounds[n].theta.flatten() for n in reference.params])
    assert float(allowed.max()) < 1e-3 * float(moves.max())
    # and the moments are counted exactly: 8 bytes per parameter plus a step scalar each
    n_params = sum(p.numel() for p in model.parameters())
    n_tensors = len(list(model.parameters()))
    assert strategy.state_bytes() == 8 * n_params + 4 * n_tensors


def test_adamw_on_bfloat16_weights_keeps_dtype_and_moves_like_float32(micro_model_path):
    low = load_model(micro_model_path, "bfloat16")
    full = load_model(micro_model_path, "float32")
    start = [p.detach().clone() for p in full.parameters()]
    data = batches(3, low.config.vocab_size, seed=2)
    update = UpdateConfig(rule="adamw", clip_grad_norm=None)
    for _ in lowmem_steps(low, update, data, LRS):
        pass
    for _ in lowmem_steps(full, update, data, LRS):
        pass
    assert all(p.dtype == torch.bfloat16 for p in low.parameters())
    # bf16 rounds each weight to ~3 significant digits, so compare where training moved the weights:
    # the bf16 update must point the same way as the float32 one.
    low_moves = torch.cat([(a.detach().float() - s).flatten() for a, s in zip(low.parameters(), start)])
    full_moves = torch.cat([(b.detach() - s).flatten() for b, s in zip(full.parameters(), start)])
    assert torch.nn.functional.cosine_similarity(low_moves, full_moves, dim=0) > 0.95
