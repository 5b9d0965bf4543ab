"""QFT's int8 weights: the dense-and-sparse format and its counted bytes, stochastic rounding against round-to-
nearest, the int8 linear layer against F.linear, standard = fused, training against float weights, export
and exact resume."""

import copy
import math

import pytest
import torch
import torch.nn.functional as F

from float_error import SUM64, U32, assert_within, matmul_pair_bound
from lowmem.checkpoint import save_model
from lowmem.config import UpdateConfig
from lowmem.weights.int8 import Int8Linear, Int8Weight, int8_weights, quantize_model, trainable_tensors
from lowmem.activations.loss import count_label_tokens, loss_sum
from lowmem.model import load_model
from lowmem.rules import make_rule
from lowmem.strategies import make_strategy
from test_rules import batches
from test_trainer import assert_resume_is_exact, make_config


def int8_model(path, **options):
    model = load_model(path, "float32")
    quantize_model(model, **options)
    return model


def train_steps(model, strategy_name, update, data, lrs):
    strategy = make_strategy(strategy_name, model, make_rule(update), update)
    losses = []
    for batch, lr in zip(data, lrs):
        strategy.prepare(lr)
        loss = loss_sum(model, batch) / count_label_tokens(batch)
        strategy.backward(loss)
        strategy.step()
        losses.append(float(loss.detach()))
    if hasattr(strategy, "remove_hooks"):
        strategy.remove_hooks()
    return losses


@pytest.mark.parametrize("shape", [(64, 300), (7, 129), (1, 5000)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dense_error_is_half_a_code_and_outliers_are_the_exact_largest_values(shape, dtype):
    weight = torch.randn(shape, generator=torch.Generator().manual_seed(1)).to(dtype)
    weight.view(-1)[17] = 40.0  # one huge value: it must go to the sparse set, not widen its block
    q = Int8Weight(weight, outlier_fraction=0.01)
    back = q.dequantize(torch.float32).view(-1)
    flat = weight.float().view(-1)
    k = round(0.01 * flat.numel())
    assert q.n_outliers == k and q.dequantize().dtype == dtype
    expected = set(torch.sort(flat.abs(), descending=True, stable=True).indices[:k].tolist())  # ties: lower index
    assert set(q.outlier_index.tolist()) == expected and 17 in expected
    index = q.outlier_index.long()
    assert torch.equal(back[index], flat[index])  # outliers exact
    block = torch.arange(flat.numel()) // q.blocksize
    # dense part: within half a code step of its block (absmax/254), plus float32's roundings on the way (x·127/absmax
    # and its quotient; the map entry (i − 128)/127 and its product with absmax: 4u of at most absmax)
    absmax = q.absmax[block].double()
    assert_within(back, flat, absmax / 254 + 4 * U32 * absmax, "dense part")
    assert q.absmax.max() < 40.0


def test_stored_bytes_are_one_per_value_plus_scales_and_outliers():
    n = 4096 * 1024
    q = Int8Weight(torch.randn(4096, 1024), outlier_fraction=0.01)
    k = round(0.01 * n)
    assert q.stored_bytes() == n + 4 * (n // 256) + 8 * k + 8  # codes, absmax, index+value, update count
    assert q.stored_bytes() / n == pytest.approx(1.0 + 4 / 256 + 0.08, abs=1e-5)  # 1.096 B/param
    assert Int8Weight(torch.randn(4096, 1024), outlier_fraction=0.0).stored_bytes() / n == pytest.approx(1.0156, abs=1e-4)


def test_no_float_copy_of_a_quantized_weight_is_kept(micro_model_path):
    model = load_model(micro_model_path, "float32")
    linear = {n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and m is not model.lm_head}
    float_bytes = sum(p.numel() * 4 for n, p in model.named_parameters() if n.rsplit(".", 1)[0] not in linear)
    linear_numel = sum(model.get_submodule(n).weight.numel() for n in linear)
    buffer_bytes = sum(b.numel() * b.element_size() for b in model.buffers())
    quantize_model(model)
    weights = int8_weights(model)
    assert len(weights) == len(linear)
    params_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    stored = sum(w.stored_bytes() for w in weights.values())
    assert params_bytes == float_bytes  # the linear weights left the parameters entirely
    # every byte the model holds now: the float parameters, its old buffers, and the int8 weights; nothing else
    after = params_bytes + sum(b.numel() * b.element_size() for b in model.buffers())
    assert after == float_bytes + buffer_bytes + stored
    assert stored / linear_numel < 1.1


def sgd_steps(weight, steps, lr, stochastic):
    q = Int8Weight(weight, outlier_fraction=0.0, refresh_every=0, stochastic=stochastic, seed=3)
    sgd = make_rule(UpdateConfig(rule="sgd"))
    grad = weight.sign()  # every weight shrinks, so no block outgrows its scale
    for _ in range(steps):
        q.update_with(sgd, grad, {}, lr)
    return q


def test_stochastic_rounding_keeps_updates_far_below_a_code_step_and_nearest_freezes_them():
    weight = torch.randn(64, 256, generator=torch.Generator().manual_seed(0))
    start = Int8Weight(weight, outlier_fraction=0.0).dequantize()
    code_step = float(start.abs().amax(dim=1).min()) / 127
    lr, steps = code_step / 20, 200  # each step moves every weight by 1/20 of a code; 10 codes in all
    nearest = sgd_steps(weight, steps, lr, stochastic=False)
    assert torch.equal(nearest.dequantize(), start)  # every update rounded away: frozen
    stochastic = sgd_steps(weight, steps, lr, stochastic=True)
    moved = ((start - stochastic.dequantize()) * weight.sign()).double().mean()
    # unbiased: on average the float drift. Each step's stochastic rounding adds an error of mean 0 and variance at
    # most a quarter of the block's code step squared, independently per step and weight, so the mean over N weights
    # has a standard deviation of at most √(steps/4 · mean(code²) / N); six of them bound it (p < 10⁻⁸).
    codes = (stochastic.absmax.double() / 127).repeat_interleave(stochastic.blocksize)[: weight.numel()]
    sd = math.sqrt(steps / 4 * float(codes.square().mean()) / weight.numel())
    assert abs(float(moved) - steps * lr) <= 6 * sd, (float(moved), steps * lr, sd)
    assert 6 * sd < 0.1 * steps * lr  # the check says something


def test_refresh_picks_the_new_largest_values_as_outliers():
    weight = torch.randn(16, 256, generator=torch.Generator().manual_seed(2))
    q = Int8Weight(weight, outlier_fraction=0.01, refresh_every=4)
    sgd = make_rule(UpdateConfig(rule="sgd"))
    grad = torch.zeros_like(weight)
    grad[5, 7] = -1.0  # one weight grows far beyond the others
    before = set(q.outlier_index.tolist())
    block_max = float(q.absmax[(5 * 256 + 7) // q.blocksize])
    for step in range(4):
        assert 5 * 256 + 7 not in set(q.outlier_index.tolist())
        q.update_with(sgd, grad, {}, lr=3.0)
    assert 5 * 256 + 7 in set(q.outlier_index.tolist()) and set(q.outlier_index.tolist()) != before
    # the fourth update stores it exactly (an outlier); each of the three before rounded it stochastically, within one
    # code step of its block, whose scale is at most the larger of the block's start and the value, with headroom
    from lowmem.ops.int8_update import HEADROOM, MAX_CODE

    start = float(weight[5, 7])
    bound = sum(max(block_max, abs(start + 3.0 * t)) * HEADROOM / MAX_CODE for t in (1, 2, 3))
    assert abs(float(q.dequantize()[5, 7]) - (start + 12.0)) <= bound


def assert_linear_pair(x, w, y, y2, w_grad, w_grad2, x_grad, x_grad2, b_grad, b_grad2):
    """y = x·Wᵀ + b with the loss Σ y·[0, 1, …, 69], computed twice (the int8 layer's own backward, autograd's): each
    output, weight-gradient, input-gradient and bias-gradient element is a sum computed in another order, within
    tests/float_error.py's matmul bound (the bias adds one rounding of |y|)."""
    g = torch.arange(70.0).expand(*y.shape).reshape(-1, 70)
    flat_x = x.detach().reshape(-1, x.shape[-1])
    assert_within(y, y2, matmul_pair_bound(flat_x, w.T).view(y.shape) + 2 * U32 * y2.detach().double().abs(), "y")
    assert_within(w_grad, w_grad2, matmul_pair_bound(g.T, flat_x), "weight gradient")
    if x_grad is not None:
        assert_within(x_grad, x_grad2, matmul_pair_bound(g, w.detach()).view(x.shape), "input gradient")
    if b_grad is not None:
        assert_within(b_grad, b_grad2, matmul_pair_bound(g.T, torch.ones(g.shape[0], 1)).view(-1), "bias gradient")


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("input_grad", [True, False])
def test_int8_linear_equals_f_linear_on_the_dequantized_weight(bias, input_grad):
    linear = torch.nn.Linear(300, 70, bias=bias)
    layer = Int8Linear(linear)
    x = torch.randn(3, 5, 300, requires_grad=input_grad)
    y = layer(x)
    (y * torch.arange(70.0)).sum().backward()
    w = layer.weight.dequantize().requires_grad_()
    b = linear.bias.detach().clone().requires_grad_() if bias else None
    x2 = x.detach().clone().requires_grad_(input_grad)
    y2 = F.linear(x2, w, b)
    (y2 * torch.arange(70.0)).sum().backward()
    assert_linear_pair(x, w, y, y2, layer.weight.grad, w.grad, x.grad if input_grad else None, x2.grad,
                       linear.bias.grad if bias else None, b.grad if bias else None)


@pytest.mark.parametrize("input_grad", [True, False])
def test_int8_conv1d_equals_conv1d_on_the_dequantized_weight(input_grad):
    # transformers' Conv1D (GPT-2): weight stored [in, out], y = x @ W + b; the int8 weight keeps that layout
    from transformers.pytorch_utils import Conv1D

    conv = Conv1D(70, 300)  # nf=70 outputs, nx=300 inputs
    torch.nn.init.normal_(conv.bias)
    layer = Int8Linear(conv)
    assert layer.weight.shape == (300, 70) and (layer.in_features, layer.out_features) == (300, 70)
    x = torch.randn(3, 5, 300, requires_grad=input_grad)
    y = layer(x)
    (y * torch.arange(70.0)).sum().backward()
    reference = Conv1D(70, 300)
    reference.weight.data.copy_(layer.weight.dequantize())
    reference.bias.data.copy_(conv.bias.detach())
    x2 = x.detach().clone().requires_grad_(input_grad)
    y2 = reference(x2)
    (y2 * torch.arange(70.0)).sum().backward()
    assert_linear_pair(x, reference.weight.detach().T, y, y2, layer.weight.grad.T, reference.weight.grad.T,
                       x.grad if input_grad else None, x2.grad, conv.bias.grad, reference.bias.grad)


def test_gpt2_int8_quantizes_every_conv1d_and_exports_its_own_layout(arch_path, tmp_path):
    from transformers import AutoModelForCausalLM
    from transformers.pytorch_utils import Conv1D

    model = load_model(arch_path("gpt2"), "float64")  # the same loss by other kernels: float64 (float_error.py)
    shapes = {k: v.shape for k, v in model.state_dict().items()}
    n_conv = sum(isinstance(m, Conv1D) for m in model.modules())
    assert quantize_model(model) == n_conv == 8  # c_attn, c_proj, c_fc, mlp.c_proj per layer
    assert not any(isinstance(m, Conv1D) for m in model.modules())
    batch = batches(1, model.config.vocab_size)[0]
    loss = float(loss_sum(model.eval(), batch))  # eval: GPT-2 has dropout
    save_model(model, tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float64)
    assert {k: v.shape for k, v in reloaded.state_dict().items()} == shapes
    assert float(loss_sum(reloaded.eval(), batch)) == pytest.approx(loss, rel=SUM64)


def test_int8_refuses_a_matrix_layer_it_would_leave_float(micro_model_path):
    from lowmem.errors import UserError

    class OwnLinear(torch.nn.Module):  # a model's own projection class: not nn.Linear, not Conv1D
        def __init__(self):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.randn(64, 64))

        def forward(self, x):
            return x @ self.weight

    model = load_model(micro_model_path, "float32")
    model.model.layers[1].mlp.extra = OwnLinear()
    with pytest.raises(UserError, match=r"int8: model.layers.1.mlp.extra.weight \(OwnLinear, shape \(64, 64\)\) "
                                        "would stay float"):
        quantize_model(model)


def test_a_frozen_int8_weight_gets_no_gradient_and_no_graph():
    layer = Int8Linear(torch.nn.Linear(64, 32, bias=False))
    layer.weight.requires_grad_(False)
    y = layer(torch.randn(4, 64))
    assert not y.requires_grad and layer.weight.grad is None


@pytest.mark.parametrize("rule", ["sgd", "lion8bit"])
def test_fused_equals_standard_with_int8_weights(micro_model_path, rule):
    model = int8_model(micro_model_path, refresh_every=2)
    other = copy.deepcopy(model)
    data = batches(3, model.config.vocab_size)
    update = UpdateConfig(rule=rule, clip_grad_norm=None)
    train_steps(model, "standard", update, data, [1e-2, 5e-3, 2e-3])
    train_steps(other, "fused", update, data, [1e-2, 5e-3, 2e-3])
    a, b = model.state_dict(), other.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)  # codes, scales, outliers and float parameters


def test_trainable_tensors_name_int8_weights_as_the_hf_weights(micro_model_path):
    float_names = {n for n, _ in load_model(micro_model_path, "float32").named_parameters()}
    assert set(trainable_tensors(int8_model(micro_model_path))) == float_names


def test_int8_training_lowers_the_loss_within_a_margin_of_float_weights(micro_model_path):
    """Stated margin: fused lion8bit on int8 weights ends within 3% of the same run on float weights."""
    update = UpdateConfig(rule="lion8bit", lr=1e-3, clip_grad_norm=None)
    float_model = load_model(micro_model_path, "float32")
    data = [batches(5, float_model.config.vocab_size, seed=4)[s % 5] for s in range(40)]
    float_losses = train_steps(float_model, "fused", update, data, [1e-3] * 40)
    int8_losses = train_steps(int8_model(micro_model_path, refresh_every=10), "fused", update, data, [1e-3] * 40)
    assert int8_losses[-1] < 0.8 * int8_losses[0]
    assert int8_losses[-1] == pytest.approx(float_losses[-1], rel=0.03)
    assert all(math.isfinite(x) for x in int8_losses)


def test_export_is_a_float_hf_folder_with_the_dequantized_weights(tmp_path, micro_model_path):
    from transformers import AutoModelForCausalLM

    from lowmem.checkpoint import save_model

    model = load_model(micro_model_path, "float64")  # the same logits by other kernels: float64 (float_error.py)
    quantize_model(model)
    model.eval()
    save_model(model, tmp_path / "out")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float64).eval()
    assert not int8_weights(loaded)
    ids = torch.randint(0, model.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = model(ids).logits
        assert_within(loaded(ids).logits, expected, SUM64 * float(expected.abs().max()), "logits")
    expected = {n for n, _ in load_model(micro_model_path).state_dict().items()}
    assert set(loaded.state_dict()) == expected


@pytest.mark.parametrize("strategy,rule,refresh", [("fused", "lion8bit", 3), ("standard", "adamw", 3),
                                                   ("hift", "lion8bit", 1)])
def test_resume_is_exact_with_int8_weights(tmp_path, micro_model_path, text_data, strategy, rule, refresh):
    # refreshes fall after the resume point (step 2 of 4): outliers, scales and rounding RNG all resume
    second = assert_resume_is_exact(tmp_path, micro_model_path, text_data, "model.weight_format=int8",
                                    f"model.int8.refresh_every={refresh}", f"update.strategy={strategy}",
                                    f"update.rule={rule}", "update.lr=1e-3", "hift.fused=true",
                                    "hift.group_size=2", "train.warmup_ratio=0")
    checkpoint = second.output_dir / "checkpoint-4"
    assert (checkpoint / "weights_int8.safetensors").is_file()
    assert not (second.final_dir / "weights_int8.safetensors").exists()


def test_int8_runs_in_bfloat16_with_gradient_checkpointing(micro_model_path):
    model = load_model(micro_model_path, "bfloat16", gradient_checkpointing=True)
    quantize_model(model)
    update = UpdateConfig(rule="lion8bit", lr=1e-3, clip_grad_norm=1.0)
    data = batches(2, model.config.vocab_size)
    losses = train_steps(model, "fused", update, data * 3, [1e-3] * 6)
    assert all(math.isfinite(x) for x in losses) and losses[-1] < losses[0]
    assert next(iter(int8_weights(model).values())).dequantize().dtype == torch.bfloat16


def test_config_checks_for_int8_weights(tmp_path, micro_model_path, text_data):
    from lowmem.errors import ConfigError

    with pytest.raises(ConfigError, match="model.int8.outlier_fraction"):
        make_config(tmp_path, micro_model_path, text_data, "model.int8.outlier_fraction=0.7")
    with pytest.raises(ConfigError, match="model.weight_format"):
        make_config(tmp_path, micro_model_path, text_data, "model.weight_format=int4")


def test_checkpoint_versions_older_resume_newer_and_mismatched_are_refused(tmp_path, micro_model_path, text_data):
    import json

    from safetensors.torch import load_file, save_file

    from lowmem.errors import UserError
    from lowmem.trainer import train

    args = ("model.weight_format=int8", "update.strategy=fused", "update.rule=lion8bit", "update.lr=1e-3")
    full = train(make_config(tmp_path, micro_model_path, text_data, *args, name="full"))
    first = train(make_config(tmp_path, micro_model_path, text_data, *args, "train.max_steps=2"))
    checkpoint = first.output_dir / "checkpoint-2"
    state_file, int8_file = checkpoint / "trainer_state.json", checkpoint / "weights_int8.safetensors"
    state = json.loads(state_file.read_text())
    assert state["format_version"] == 4
    saved = load_file(int8_file)
    assert not [k for k in saved if "rounding_rng" in k]  # the noise is counter-based: the update counts resume it
    # versions 3 and 2 also held generator states (by device; one CPU generator per weight): read past, and resumed
    # exactly, since the noise of an update depends only on the weight's seed, the element and the update count
    for version, suffix in ((3, ".rounding_rng.cpu"), (2, ".rounding_rng")):
        save_file({**saved, **{k.removesuffix(".codes") + suffix: torch.zeros(16, dtype=torch.uint8)
                               for k in saved if k.endswith(".codes")}}, int8_file)
        state_file.write_text(json.dumps({**state, "format_version": version}))
        resumed = train(make_config(tmp_path, micro_model_path, text_data, *args, f"checkpoint.resume={checkpoint}"))
        assert first.losses + resumed.losses == full.losses
    # a version 1 checkpoint has no int8 file: its float weights are requantized and training goes on
    int8_file.unlink()
    state_file.write_text(json.dumps({**state, "format_version": 1}))
    resumed = train(make_config(tmp_path, micro_model_path, text_data, *args, f"checkpoint.resume={checkpoint}"))
    assert len(resumed.losses) == 2 and all(math.isfinite(x) for x in resumed.losses)
    # other int8 settings: refused by the recipe check, or, for a checkpoint without its recipe, by the shapes
    last = first.output_dir / "checkpoint-4"
    other = (*args, "model.int8.outlier_fraction=0.02", f"checkpoint.resume={last}")
    with pytest.raises(UserError, match="model.int8.outlier_fraction was 0.01 when .* is 0.02 now"):
        train(make_config(tmp_path, micro_model_path, text_data, *other))
    last_state = json.loads((last / "trainer_state.json").read_text())
    (last / "trainer_state.json").write_text(json.dumps({k: v for k, v in last_state.items() if k != "config"}))
    mismatch = r"outlier_index has shape \(41,\), the model expects \(82,\) \(resume with the model.int8 settings"
    with pytest.raises(UserError, match=mismatch):
        train(make_config(tmp_path, micro_model_path, text_data, *other))
    state_file.write_text(json.dumps({**state, "format_version": 5}))
    with pytest.raises(UserError, match="format version 5, newer"):
        train(make_config(tmp_path, micro_model_path, text_data, *args, f"checkpoint.resume={checkpoint}"))


def test_rounding_resumes_from_the_update_count_alone(micro_model_path):
    from lowmem.weights.int8 import int8_state_dict, load_int8_state_dict
    from lowmem.ops.int8_update import rounding_noise

    model = int8_model(micro_model_path)
    weights = int8_weights(model)
    name = list(weights)[0]
    rule = make_rule(UpdateConfig(rule="sgd"))
    grads = [torch.randn(weights[name].shape, generator=torch.Generator().manual_seed(s)) * 1e-3 for s in (1, 2)]
    weights[name].update_with(rule, grads[0], {}, lr=1.0)
    flat = int8_state_dict(model)
    assert int(flat[f"{name}.updates"]) == 1 and not [k for k in flat if "rounding_rng" in k]
    other = int8_model(micro_model_path)
    load_int8_state_dict(other, flat)
    assert other.get_submodule(name).host_updates == 1  # the refresh counter, restored without a device read
    for w in (weights[name], other.get_submodule(name)):
        w.update_with(rule, grads[1], {}, lr=1.0)
    assert torch.equal(other.get_submodule(name).codes, weights[name].codes)
    # the noise is the weight's own: another seed, or the same update count of another weight, rounds otherwise
    u = rounding_noise(1000, weights[name].seed, 2)
    assert not torch.equal(u, rounding_noise(1000, weights[name].seed + 1, 2))
    assert not torch.equal(u, rounding_noise(1000, weights[name].seed, 3))


def test_hift_trains_only_the_active_groups_int8_weights(micro_model_path):
    from lowmem.config import Config, HiftConfig

    model = int8_model(micro_model_path)
    update = UpdateConfig(strategy="hift", rule="lion8bit", lr=1e-3, clip_grad_norm=None)
    config = Config(update=update, hift=HiftConfig(group_size=1, fused=True))
    strategy = make_strategy("hift", model, make_rule(update), update, config)
    unit_names = [u.name for u in strategy.units]
    assert unit_names[:2] == ["embeddings", "layers.0"]
    assert any(isinstance(p, Int8Weight) for p in strategy.units[1].params.values())
    batch = batches(1, model.config.vocab_size)[0]
    for _ in range(2):  # embeddings, then layers.0
        before = {n: w.codes.clone() for n, w in int8_weights(model).items()}
        strategy.prepare(1e-3)
        strategy.backward(loss_sum(model, batch) / count_label_tokens(batch))
        strategy.step()
    changed = {n for n, w in int8_weights(model).items() if not torch.equal(w.codes, before[n])}
    assert changed and all(n.startswith("model.layers.0.") for n in changed)


# -- the output head as int8 (model.int8.include_head) ---------------------------------------------------


def test_include_head_quantizes_the_head_and_refuses_a_tied_one(micro_model_path):
    from lowmem import assets
    from lowmem.errors import UserError
    from lowmem.weights.int8 import matrix_layers

    model = load_model(micro_model_path, "float32")
    n_body = quantize_model(copy.deepcopy(model))
    assert quantize_model(model, include_head=True) == n_body + 1
    head = model.get_output_embeddings()
    assert isinstance(head, Int8Linear) and "lm_head.weight" in int8_weights(model)
    assert all(layer is not head for _, layer in matrix_layers(model))  # PERP prunes (and adapts) the body only
    tied = load_model(str(assets.tiny_model("micro-llama-tied")), "float32")
    with pytest.raises(UserError, match="include_head: the head is tied to the input embedding"):
        quantize_model(tied, include_head=True)


@pytest.mark.parametrize("chunk", [16, 200])
def test_chunked_loss_with_an_int8_head_equals_the_plain_int8_head(micro_model_path, monkeypatch, chunk):
    """The chunked int8 head (dequantized a few vocabulary rows at a time, its gradient summed over the chunks and
    handed over once) against the int8 head's own forward and backward on the whole batch: in float64 they differ
    only in the order of sums (head gradient summed over chunks, input gradient over row slices): ≤ n·2⁻⁵³ relative
    each, far below 1e-10."""
    import lowmem.activations.loss as loss_module

    monkeypatch.setattr(loss_module, "HEAD_SLICE_VALUES", 64 * 100)  # 100 rows: 11 slices of the micro head
    model = load_model(micro_model_path, "float64")
    quantize_model(model, include_head=True)
    ids = torch.randint(0, model.config.vocab_size, (2, 40), generator=torch.Generator().manual_seed(0))
    batch = {"input_ids": ids, "labels": ids}
    head = model.get_output_embeddings().weight
    q_proj = model.model.layers[0].self_attn.q_proj.weight
    results = []
    for chunk_tokens in [0, chunk]:
        calls = []
        handle = head.register_post_accumulate_grad_hook(lambda w: calls.append(w.grad.clone()))
        loss = loss_sum(model, batch, chunk_tokens)
        loss.backward()
        handle.remove()
        results.append((loss.detach(), calls, q_proj.grad))
        for weight in int8_weights(model).values():
            weight.grad = None
    (plain_loss, plain_calls, plain_q), (chunked_loss, chunked_calls, chunked_q) = results
    assert len(plain_calls) == len(chunked_calls) == 1  # the head's gradient arrives once, whole
    torch.testing.assert_close(chunked_loss, plain_loss, rtol=1e-12, atol=0)
    torch.testing.assert_close(chunked_calls[0], plain_calls[0], rtol=1e-10, atol=1e-14)
    torch.testing.assert_close(chunked_q, plain_q, rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize("strategy", ["fused", "standard"])
def test_an_int8_head_trains_and_resumes_exactly(tmp_path, micro_model_path, text_data, strategy):
    """Every weight moves, the head included, and the head's codes resume from the checkpoint."""
    assert_resume_is_exact(tmp_path, micro_model_path, text_data, "model.weight_format=int8",
                           "model.int8.include_head=true", f"update.strategy={strategy}", "update.rule=adalomo",
                           "memory.loss_chunk_tokens=32")
