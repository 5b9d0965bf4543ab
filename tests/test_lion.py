"""lion and lion8bit: against an independent Lion formula, against each other, against bitsandbytes'
Lion8bit, native kernel against reference, counted state bytes, and exact resume."""

import pytest
import torch

from float_error import U32, assert_within, dtype_step
from lowmem.config import UpdateConfig
from lowmem.ops.native import ensure_loaded
from lowmem.ops.quant import dequantize_blockwise_ref, dynamic_map
from lowmem.ops.update import lion8bit_update_, lion8bit_update_ref
from lowmem.rules import make_rule


def rule(name="lion", **lion):
    update = UpdateConfig(rule=name, weight_decay=lion.pop("weight_decay", 0.0))
    for key, value in lion.items():
        setattr(update.lion, key, value)
    return make_rule(update)


def grads(shape, steps, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=g) for _ in range(steps)]


def run(r, theta, gs, lr, name="layers.0.weight"):
    state = r.init_state(theta, name)
    for grad in gs:
        r.update(theta, grad, state, lr)
    return state


def lion_formula(theta, gs, lr, beta1, beta2, wd):
    """Chen et al. 2023, exactly, in float64: c = β1·m + (1−β1)·g; θ ← θ − lr·(sign(c) + wd·θ); m ← β2·m + (1−β2)·g.
    Returns θ and the float32 error bound of lowmem's ``lion`` rule against it, element by element
    (tests/float_error.py): β1·m and (1−β1)·g round and add (ec ≤ β1·em + 3u·(β1|m| + (1−β1)|g|)); where |c| ≤ ec the
    sign may come out otherwise (a difference of 2·lr that step); the decay factor and its product round (2u·|θ|), lr
    is rounded (u·lr), the sum rounds (u·|θ'|); the momentum's error em is carried by its envelope (it may cancel)."""
    u = U32
    theta, m = theta.double().clone(), torch.zeros_like(theta, dtype=torch.float64)
    e_theta, e_m = torch.zeros_like(theta), torch.zeros_like(theta)
    for g in gs:
        g = g.double()
        c = beta1 * m + (1 - beta1) * g
        e_c = beta1 * e_m + 3 * u * (beta1 * m.abs() + (1 - beta1) * g.abs())
        before = theta
        theta = theta - lr * (torch.sign(c) + wd * theta)
        e_theta = ((1 - lr * wd) * e_theta + 2 * u * before.abs() + u * lr + u * theta.abs()
                   + torch.where(c.abs() <= e_c, 2 * lr, 0.0))
        e_m = beta2 * e_m + 3 * u * (beta2 * m.abs() + (1 - beta2) * g.abs())
        m = beta2 * m + (1 - beta2) * g
    return theta, e_theta


@pytest.mark.parametrize("wd", [0.0, 0.1])
def test_lion_equals_the_formula_within_its_float_error(wd):
    theta = torch.randn(40, 70, generator=torch.Generator().manual_seed(3))
    gs = grads(theta.shape, 10)
    ours = theta.clone()
    run(rule("lion", weight_decay=wd), ours, gs, lr=1e-2)
    exact, bound = lion_formula(theta, gs, 1e-2, 0.9, 0.99, wd)
    assert_within(ours, exact, bound, "weight")
    # not vacuous: a step moves a weight by lr = 10⁻²; where no sign may flip the bound is float32 rounding
    assert float(bound.median()) < 1e-3 * 1e-2


@pytest.mark.parametrize("wd", [0.0, 0.1])
def test_lion8bit_with_lossless_quantization_equals_lion(wd):
    # the 8-bit path with its quantization made exact: one value per block, and a code map holding -1, 0 and 1,
    # so every momentum value is stored as ±absmax or 0
    from lowmem.weights.int8 import linear_map

    theta = torch.randn(64, 129)
    gs = grads(theta.shape, 10, seed=1)
    a, b = theta.clone(), theta.clone()
    run(rule("lion", weight_decay=wd), a, gs, lr=1e-2)
    lossless = rule("lion8bit", weight_decay=wd, min_8bit_size=1)
    lossless.blocksize, lossless.code = 1, linear_map()
    state = run(lossless, b, gs, lr=1e-2)
    assert set(state) == {"exp_avg_codes", "exp_avg_absmax"} and state["exp_avg_absmax"].numel() == theta.numel()
    assert torch.equal(a, b)


def test_lion8bit_state_is_1_016_bytes_per_parameter_and_small_tensors_stay_float32():
    r = rule("lion8bit")
    big = r.init_state(torch.zeros(1000, 4096), "layers.0.mlp.up_proj.weight")
    n = 1000 * 4096
    assert sum(t.numel() * t.element_size() for t in big.values()) == n + 4 * (n // 256)
    assert (n + 4 * (n // 256)) / n == pytest.approx(1.0156, abs=1e-4)
    assert set(r.init_state(torch.zeros(4095), "layers.0.norm.weight")) == {"exp_avg"}
    assert set(r.init_state(torch.zeros(1000, 64), "model.embed_tokens.weight")) == {"exp_avg"}
    assert set(rule("lion8bit", quantize_embeddings=True).init_state(torch.zeros(1000, 64), "embed")) == {
        "exp_avg_codes", "exp_avg_absmax"}


def test_native_lion8bit_owns_the_cpu_dispatch():
    assert ensure_loaded().loaded
    table = torch._C._dispatch_dump("lowmem::lion8bit_update_")
    assert any(line.startswith("CPU:") and "csrc/cpu/lion8bit.cpp" in line for line in table.splitlines()), table


def assert_lion8bit_within(ours, ref, param, grad, codes0, absmax0, grad_scale, absmax_a, absmax_b, lr=1e-2):
    """Two float32 computations of one lion8bit step (β 0.9, 0.99) from the same weight, gradient and momentum codes,
    within their float error (tests/float_error.py). Both dequantize the same m (one rounding each: u·|m|); c =
    β1·m + (1−β1)·s·g is then off by ec ≤ 4u·(β1|m| + (1−β1)|s·g|) on either side, so where |c| ≤ 2·ec the two signs
    may differ (2·lr); elsewhere each side's decay, lr and sum round (3u·|θ| + u·lr), and each rounds once to the
    weight's dtype. The new momentum β2·m + (1−β2)·s·g is off by 4u of its envelope on either side, so a block's
    absmax (its largest |m|) by twice the block's largest such error."""
    u = U32
    m = dequantize_blockwise_ref(codes0.cpu(), absmax0.cpu(), dynamic_map(), 256, torch.float64).view(param.shape)
    g = grad.cpu().double() * float(grad_scale)
    c = 0.9 * m + 0.1 * g
    e_c = 4 * u * (0.9 * m.abs() + 0.1 * g.abs())
    bound = torch.where(c.abs() <= 2 * e_c, 2 * lr, 0.0) + 2 * (3 * u * param.cpu().double().abs() + u * lr)
    if param.dtype != torch.float32:
        bound = bound + dtype_step(param.dtype, ref)
    assert_within(ours.cpu(), ref, bound, "weight")
    e_m = (4 * u * (0.99 * m.abs() + 0.01 * g.abs())).flatten()
    e_block = torch.nn.functional.pad(e_m, (0, -e_m.numel() % 256)).view(-1, 256).amax(dim=1)
    assert_within(absmax_a.cpu(), absmax_b, 2 * e_block, "absmax")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("shape", [(1,), (123,), (4097,), (37, 129)], ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("weight_decay,grad_scale", [(0.0, 1.0), (0.1, 0.5)], ids=["plain", "wd-scaled"])
def test_native_lion8bit_equals_reference(dtype, shape, weight_decay, grad_scale):
    g = torch.Generator().manual_seed(2)
    param = torch.randn(shape, generator=g).to(dtype)
    grad = torch.randn(shape, generator=g).to(dtype)
    n = param.numel()
    m0 = torch.randn(n, generator=g) * 0.1
    from lowmem.ops.quant import quantize_blockwise_ref

    codes0, absmax0 = quantize_blockwise_ref(m0, dynamic_map(), 256, True)
    ours, ref = param.clone(), param.clone()
    codes_a, absmax_a, codes_b, absmax_b = codes0.clone(), absmax0.clone(), codes0.clone(), absmax0.clone()
    args = dict(lr=1e-2, beta1=0.9, beta2=0.99, weight_decay=weight_decay, grad_scale=grad_scale)
    lion8bit_update_(ours, grad, codes_a, absmax_a, **args)
    lion8bit_update_ref(ref, grad, codes_b, absmax_b, dynamic_map(), torch.tensor(grad_scale), args["lr"],
                        args["beta1"], args["beta2"], weight_decay, 256)
    assert ours.dtype == dtype
    assert_lion8bit_within(ours, ref, param, grad, codes0, absmax0, grad_scale, absmax_a, absmax_b)
    assert (codes_a.int() - codes_b.int()).abs().max() <= 1  # nearest code, up to one at a float32 tie


def test_lion8bit_tracks_lion_over_50_steps_on_a_tiny_model(micro_model_path):
    from lowmem.activations.loss import count_label_tokens, loss_sum
    from lowmem.model import load_model
    from lowmem.strategies import make_strategy
    from test_rules import batches

    losses = {}
    for name in ("lion", "lion8bit"):
        model = load_model(micro_model_path, "float32")
        update = UpdateConfig(rule=name, lr=1e-3, clip_grad_norm=None)
        strategy = make_strategy("fused", model, make_rule(update), update)
        data = batches(5, model.config.vocab_size, seed=4)
        losses[name] = []
        for s in range(50):
            batch = data[s % 5]
            strategy.prepare(1e-3)
            loss = loss_sum(model, batch) / count_label_tokens(batch)
            strategy.backward(loss)
            strategy.step()
            losses[name].append(float(loss.detach()))
        if name == "lion8bit":
            quantized = [n for n, s in strategy.state.by_param.items() if "exp_avg_codes" in s]
            assert quantized, "no tensor used the 8-bit state"
    assert losses["lion8bit"][-1] < 0.8 * losses["lion8bit"][0]  # it trains
    # a stated quality target, not a rounding bound: 8-bit momenta take another path than float32 ones (a sign flips
    # where a momentum is near zero), and every loss of the 50 must stay within 2% of float32 Lion's
    for a, b in zip(losses["lion8bit"], losses["lion"]):
        assert a == pytest.approx(b, rel=0.02)


def test_lion8bit_close_to_bitsandbytes_lion8bit():
    bnb = pytest.importorskip("bitsandbytes")
    theta = torch.randn(64, 128)
    gs = grads(theta.shape, 20, seed=5)
    ours = theta.clone()
    run(rule("lion8bit"), ours, gs, lr=1e-3)
    p = torch.nn.Parameter(theta.clone())
    optimizer = bnb.optim.Lion8bit([p], lr=1e-3, betas=(0.9, 0.99), min_8bit_size=4096)
    for g in gs:
        p.grad = g.clone()
        optimizer.step()
    exact = lion_formula(theta, gs, 1e-3, 0.9, 0.99, 0.0)[0].float()
    # sign updates: each weight moves by ±lr per step; disagreements come from momenta near zero
    ours_err = (ours - exact).abs().mean()
    bnb_err = (p.detach() - exact).abs().mean()
    assert ours_err <= 1.5 * bnb_err + 1e-6
    assert ((ours - p.detach()).abs() > 1e-6).float().mean() < 0.05


def test_resume_is_exact_with_lion8bit(tmp_path, micro_model_path, text_data):
    from test_trainer import assert_resume_is_exact

    assert_resume_is_exact(tmp_path, micro_model_path, text_data, "update.rule=lion8bit", "update.lr=1e-3",
                           "update.strategy=fused", "update.lion.min_8bit_size=1024")


def test_opcheck_lion8bit():
    param, grad = torch.randn(300), torch.randn(300)
    codes, absmax = torch.full((300,), 127, dtype=torch.uint8), torch.zeros(2)
    torch.library.opcheck(torch.ops.lowmem.lion8bit_update_.default,
                          (param, grad, codes, absmax, dynamic_map(), torch.tensor(1.0), 1e-3, 0.9, 0.99, 0.0, 256))


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=lambda d: str(d)[6:])
def test_cuda_lion8bit_equals_reference(dtype):
    assert ensure_loaded().with_cuda
    param, grad = torch.randn(4097).to(dtype), torch.randn(4097).to(dtype)
    codes, absmax = torch.full((4097,), 127, dtype=torch.uint8), torch.zeros(17)
    ours, ref = param.clone().cuda(), param.clone()
    ca, aa = codes.clone().cuda(), absmax.clone().cuda()
    cb, ab = codes.clone(), absmax.clone()
    lion8bit_update_(ours, grad.cuda(), ca, aa, lr=1e-2, beta1=0.9, beta2=0.99)
    lion8bit_update_ref(ref, grad, cb, ab, dynamic_map(), torch.tensor(1.0), 1e-2, 0.9, 0.99, 0.0, 256)
    assert_lion8bit_within(ours, ref, param, grad, codes, absmax, 1.0, aa, ab)
    assert (ca.cpu().int() - cb.int()).abs().max() <= 1
    # a float32 gradient of a bfloat16 weight, with a device-side gradient scale
    if dtype == torch.bfloat16:
        ours, ref = param.clone().cuda(), param.clone()
        ca, aa, cb, ab = codes.clone().cuda(), absmax.clone().cuda(), codes.clone(), absmax.clone()
        g32 = torch.randn(4097)
        lion8bit_update_(ours, g32.cuda(), ca, aa, lr=1e-2, beta1=0.9, beta2=0.99, grad_scale=torch.tensor(0.5).cuda())
        lion8bit_update_ref(ref, g32, cb, ab, dynamic_map(), torch.tensor(0.5), 1e-2, 0.9, 0.99, 0.0, 256)
        assert_lion8bit_within(ours, ref, param, g32, codes, absmax, 0.5, aa, ab)
        assert (ca.cpu().int() - cb.int()).abs().max() <= 1


def test_lion8bit_refuses_bad_blocks_in_one_line():
    param, grad = torch.randn(300), torch.randn(300)
    codes = torch.full((300,), 127, dtype=torch.uint8)
    with pytest.raises(RuntimeError, match="absmax must hold one value per block of 256 \\(2\\), got 3"):
        lion8bit_update_(param, grad, codes, torch.zeros(3), lr=1e-3, beta1=0.9, beta2=0.99)
    with pytest.raises(RuntimeError, match="blocksize must be positive, got 0"):
        lion8bit_update_(param, grad, codes, torch.zeros(2), lr=1e-3, beta1=0.9, beta2=0.99, blocksize=0)


@pytest.mark.parametrize("name", ["lion", "adamw"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_an_element_wise_update_runs_in_slices_with_the_same_result_and_bounded_temporaries(monkeypatch, dtype, name):
    # the unquantized embeddings under lion8bit (Llama-3: 128256 × 4096) took four float32 temporaries of their size
    import lowmem.ops.update as update
    from lowmem.planner.plan import StorageAccountant

    theta = torch.randn(300, 70).to(dtype)
    gs = grads(theta.shape, 3, seed=4)
    whole = theta.clone()
    whole_state = run(rule(name, weight_decay=0.1), whole, gs, lr=1e-2)
    monkeypatch.setattr(update, "SLICE", 1000)  # 21 slices, the last one partial
    sliced = theta.clone()
    r = rule(name, weight_decay=0.1)
    state = r.init_state(sliced, "layers.0.weight")
    for g in gs[:-1]:
        r.update(sliced, g, state, 1e-2)
    accountant = StorageAccountant()
    for resident in (sliced, gs[-1], *state.values()):
        accountant.track(resident)
    before = accountant.current
    with accountant:
        r.update(sliced, gs[-1], state, 1e-2)
    assert torch.equal(sliced, whole) and all(torch.equal(state[k], whole_state[k]) for k in state)
    # a few float32 slices alive at once, never a whole-tensor copy (21000 values)
    assert accountant.peak - before <= 6 * 4 * 1000
