"""The fused (LOMO) strategy against the standard loop it replaces, and its memory bound."""

import copy

import pytest
import torch

from conftest import write_jsonl  # noqa: F401  (fixtures)
from float_error import assert_same_run64
from lowmem.config import UpdateConfig
from lowmem.activations.loss import count_label_tokens, loss_sum
from lowmem.model import load_model
from lowmem.rules import make_rule
from lowmem.strategies import make_strategy
from test_rules import batches
from test_trainer import assert_resume_is_exact, make_config


def run(model, strategy_name, update, data, lrs):
    strategy = make_strategy(strategy_name, model, make_rule(update), update)
    stats = []
    for batch, lr in zip(data, lrs):
        strategy.prepare(lr)
        strategy.backward(loss_sum(model, batch) / count_label_tokens(batch))
        stats.append(strategy.step())
    if hasattr(strategy, "remove_hooks"):
        strategy.remove_hooks()
    return strategy, stats


def assert_same_weights(a, b, exact=False):
    """Bit for bit (the same operations in the same order), or two float64 runs of the same math within
    tests/float_error.py's RUN64_WEIGHT_ATOL."""
    for (name, x), (_, y) in zip(a.named_parameters(), b.named_parameters()):
        if exact:
            assert torch.equal(x, y), name
        else:
            assert_same_run64(x, y, name)


LRS = [1e-2, 5e-3, 2e-3]


@pytest.mark.parametrize("rule", ["sgd", "adamw", "adafactor", "adalomo"])
def test_fused_equals_standard_without_clipping(micro_model_path, rule):
    model = load_model(micro_model_path, "float32")
    other = copy.deepcopy(model)
    data = batches(3, model.config.vocab_size)
    update = UpdateConfig(rule=rule, clip_grad_norm=None)
    run(model, "standard", update, data, LRS)
    run(other, "fused", update, data, LRS)
    assert_same_weights(model, other, exact=True)


def test_fused_sgd_equals_torch_sgd(micro_model_path):
    model = load_model(micro_model_path, "float64")
    reference = copy.deepcopy(model)
    data = batches(3, model.config.vocab_size)
    run(model, "fused", UpdateConfig(rule="sgd", clip_grad_norm=None), data, LRS)
    optimizer = torch.optim.SGD(reference.parameters(), lr=1.0)
    for batch, lr in zip(data, LRS):
        optimizer.param_groups[0]["lr"] = lr
        (loss_sum(reference, batch) / count_label_tokens(batch)).backward()
        optimizer.step()
        optimizer.zero_grad()
    assert_same_weights(model, reference)


@pytest.mark.parametrize("rule", ["sgd", "adamw"])
def test_two_pass_clipping_equals_global_norm_clipping(micro_model_path, rule):
    model = load_model(micro_model_path, "float64")
    other = copy.deepcopy(model)
    data = batches(3, model.config.vocab_size, seed=5)
    _, standard_stats = run(model, "standard", UpdateConfig(rule=rule, clip_grad_norm=0.05, eps=1e-5), data, LRS)
    _, fused_stats = run(other, "fused", UpdateConfig(rule=rule, clip_grad_norm=0.05, clip_mode="two_pass", eps=1e-5),
                         data, LRS)
    assert standard_stats[0]["grad_norm"] > 0.05  # clipping really engaged
    # the same norm summed in another order: float64's n·u with n ≤ 10⁵ squares
    assert [float(s["grad_norm"]) for s in fused_stats] == pytest.approx(
        [float(s["grad_norm"]) for s in standard_stats], rel=1e-10)
    assert_same_weights(model, other)


def test_per_tensor_clipping_clips_each_gradient_by_its_own_norm(micro_model_path):
    model = load_model(micro_model_path, "float64")
    reference = copy.deepcopy(model)
    batch = batches(1, model.config.vocab_size, seed=6)
    run(model, "fused", UpdateConfig(rule="sgd", clip_grad_norm=0.01, clip_mode="per_tensor"), batch, [0.1])
    (loss_sum(reference, batch[0]) / count_label_tokens(batch[0])).backward()
    with torch.no_grad():
        for p in reference.parameters():
            torch.nn.utils.clip_grad_norm_([p], 0.01)
            p.add_(p.grad, alpha=-0.1)
    assert_same_weights(model, reference)


def live_grad_peak(model, strategy_name, update, batch):
    """Peak bytes of .grad tensors alive, measured independently of the strategy's own counter: a hook
    registered before the strategy's sees, at every gradient completion, every .grad that exists."""
    params = [p for p in model.parameters() if p.requires_grad]
    peak = [0]

    def observe(_):
        peak[0] = max(peak[0], sum(p.grad.numel() * p.grad.element_size() for p in params if p.grad is not None))

    handles = [p.register_post_accumulate_grad_hook(observe) for p in params]
    strategy, stats = run(model, strategy_name, update, [batch], [1e-3])
    for h in handles:
        h.remove()
    observe(None)  # what is still alive after backward (standard: everything, until step())
    return peak[0], stats[0]


def test_fused_gradient_peak_is_at_most_the_two_largest_tensors(micro_model_path):
    model = load_model(micro_model_path, "float32")
    sizes = sorted((p.numel() * p.element_size() for p in model.parameters()), reverse=True)
    batch = batches(1, model.config.vocab_size)[0]
    fused_peak, fused_stats = live_grad_peak(model, "fused", UpdateConfig(rule="adalomo"), batch)
    standard_peak, standard_stats = live_grad_peak(copy.deepcopy(model), "standard", UpdateConfig(rule="adalomo"), batch)
    assert fused_peak <= sizes[0] + sizes[1]
    assert standard_peak == sum(sizes)
    assert fused_stats["grad_bytes_peak"] <= sizes[0] + sizes[1]
    assert standard_stats["grad_bytes_peak"] == sum(sizes)


def test_tied_weights_are_updated_once_with_the_summed_gradient(tmp_path):
    from lowmem import assets

    path = str(assets.tiny_model("micro-llama-tied"))
    model = load_model(path, "float32")
    assert model.lm_head.weight is model.model.embed_tokens.weight
    other = copy.deepcopy(model)
    data = batches(3, model.config.vocab_size, seed=7)
    run(model, "standard", UpdateConfig(rule="adamw", clip_grad_norm=None), data, LRS)
    run(other, "fused", UpdateConfig(rule="adamw", clip_grad_norm=None), data, LRS)
    assert_same_weights(model, other, exact=True)


def test_frozen_parameters_stay_frozen(micro_model_path):
    model = load_model(micro_model_path, "float32")
    model.model.embed_tokens.weight.requires_grad_(False)
    before = model.model.embed_tokens.weight.detach().clone()
    other = copy.deepcopy(model)
    data = batches(2, model.config.vocab_size)
    run(model, "fused", UpdateConfig(rule="sgd", clip_grad_norm=None), data, LRS)
    run(other, "standard", UpdateConfig(rule="sgd", clip_grad_norm=None), data, LRS)
    assert torch.equal(model.model.embed_tokens.weight, before)
    assert_same_weights(model, other, exact=True)


def test_fused_with_gradient_checkpointing_equals_without(micro_model_path):
    plain = load_model(micro_model_path, "float64")
    checkpointed = load_model(micro_model_path, "float64", gradient_checkpointing=True)
    data = batches(2, plain.config.vocab_size)
    run(plain, "fused", UpdateConfig(rule="adalomo", clip_grad_norm=None), data, LRS)
    run(checkpointed, "fused", UpdateConfig(rule="adalomo", clip_grad_norm=None), data, LRS)
    assert_same_weights(plain, checkpointed)


def test_float16_overflow_skips_the_step_untouched_and_the_scale_recovers(micro_model_path):
    model = load_model(micro_model_path, "float16")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    update = UpdateConfig(rule="sgd", clip_grad_norm=1.0, clip_mode="two_pass")
    update.loss_scale.init_scale = 2.0**40  # float16 overflows far below this
    update.loss_scale.growth_interval = 2
    strategy = make_strategy("fused", model, make_rule(update), update)
    data = batches(1, model.config.vocab_size)[0]

    def step():
        strategy.prepare(1e-2)
        strategy.backward(loss_sum(model, data) / count_label_tokens(data))
        return strategy.step()

    first = step()
    assert first["skipped"] == 1 and strategy.scaler.scale == 2.0**39
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    stats = [step() for _ in range(40)]
    good = [s for s in stats if not s["skipped"]]
    assert good, "the scale never came down far enough for a step to apply"
    assert not all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    assert all(torch.isfinite(p).all() for p in model.parameters())
    # the scale after each step: halved on an overflow; doubled after every 2 good steps in a row
    expected, scale, good_run = [], 2.0**39, 0
    for s in stats:
        good_run = 0 if s["skipped"] else good_run + 1
        scale = scale / 2 if s["skipped"] else scale * 2 if good_run % 2 == 0 else scale
        expected.append(scale)
    assert [s["loss_scale"] for s in stats] == expected
    assert sum(1 for a, b in zip(expected, expected[1:]) if b == 2 * a) >= 3  # it grew, more than once


@pytest.mark.parametrize("strategy", ["standard", "fused"])
@pytest.mark.parametrize("rule", ["sgd", "adamw", "adafactor", "adalomo"])
def test_resume_equals_uninterrupted_for_every_rule_and_strategy(tmp_path, micro_model_path, text_data, rule, strategy):
    assert_resume_is_exact(tmp_path, micro_model_path, text_data, f"update.rule={rule}",
                           f"update.strategy={strategy}", "update.lr=1e-2")


def test_fused_config_refuses_accumulation_and_fp16_per_tensor(tmp_path, micro_model_path, text_data):
    from lowmem.errors import ConfigError

    with pytest.raises(ConfigError, match="gradient_accumulation_steps must be 1"):
        make_config(tmp_path, micro_model_path, text_data, "update.strategy=fused", "train.gradient_accumulation_steps=2")
    with pytest.raises(ConfigError, match="needs update.clip_mode=two_pass"):
        make_config(tmp_path, micro_model_path, text_data, "update.strategy=fused", "model.dtype=float16")


def test_fused_training_lowers_loss_and_reports_memory(tmp_path, micro_model_path, text_data):
    import json

    from lowmem.trainer import train

    result = train(make_config(tmp_path, micro_model_path, text_data, "update.strategy=fused", "update.rule=adalomo",
                               "update.lr=5e-2", "train.max_steps=12", name="fa"))
    assert result.last_eval["val_loss"] < result.first_eval["val_loss"]
    records = [json.loads(line) for line in (tmp_path / "fa" / "metrics.jsonl").read_text().splitlines()]
    step = [r for r in records if "loss" in r][-1]
    assert 0 < step["grad_bytes_peak"] and 0 < step["state_bytes"]


@pytest.mark.parametrize("name", ["standard", "fused", "hift"])
def test_a_dropped_model_and_strategy_free_the_weights(micro_model_path, name):
    """A tensor's hooks are invisible to Python's cycle collector: a hook holding its strategy strongly kept the
    model alive (seen on a GPU, where the next run's peak held the previous model)."""
    import gc
    import weakref

    from lowmem.config import Config

    model = load_model(micro_model_path, "float32")
    update = UpdateConfig(rule="adalomo")
    strategy = make_strategy(name, model, make_rule(update), update, Config(update=update))
    batch = batches(1, model.config.vocab_size)[0]
    strategy.prepare(1e-3)
    strategy.backward(loss_sum(model, batch) / count_label_tokens(batch))
    strategy.step()
    weight = weakref.ref(model.model.layers[0].mlp.up_proj.weight)
    del model, strategy
    gc.collect()
    assert weight() is None
