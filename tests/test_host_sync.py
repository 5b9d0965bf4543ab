"""No host reads of device values inside a training step (DESIGN §4a): every strategy × rule, int8 weights,
float16 two-pass, HiFT with offloading, and the trainer's own loop run under a guard that raises on
``aten._local_scalar_dense`` (the op behind ``.item()``, ``float(t)``, ``bool(t)``) except at the named points."""

import pytest
import torch

from lowmem.config import Config, HiftConfig, MemoryConfig, UpdateConfig
from lowmem.placement.host_sync import ForbidHostReads, HostReadError, read
from lowmem.weights.int8 import quantize_model
from lowmem.activations.loss import count_label_tokens, loss_sum
from lowmem.model import load_model
from lowmem.rules import RULES, make_rule
from lowmem.strategies import make_strategy
from test_rules import batches
from test_trainer import make_config

RULE_NAMES = sorted(RULES)


def guarded_steps(model, strategy, data, lr=1e-3, chunk_tokens=0):
    """Steps as the trainer runs them: token counts on the host batch, then forward, backward and update under
    the guard. Returns the guard."""
    guard = ForbidHostReads()
    for batch in data:
        tokens = count_label_tokens(batch)
        with guard:
            strategy.prepare(lr)
            strategy.backward(loss_sum(model, batch, chunk_tokens) / tokens)
            strategy.step()
    return guard


def assert_only(guard, forwards, marked=()):
    assert set(guard.marked) <= set(marked), guard.marked
    # transformers' mask creation: at most one read per forward (two-pass backward replays no forward)
    assert sum(guard.tolerated.values()) <= forwards, guard.tolerated


@pytest.mark.parametrize("rule", RULE_NAMES)
@pytest.mark.parametrize("strategy,update", [
    ("standard", {}),
    ("fused", {}),  # per-tensor clipping: a coefficient per tensor, computed on the device
    ("fused", {"clip_mode": "two_pass"}),
    ("fused", {"clip_grad_norm": None}),
], ids=["standard", "fused-per-tensor", "fused-two-pass", "fused-no-clip"])
def test_a_step_reads_nothing_on_the_host(micro_model_path, rule, strategy, update):
    model = load_model(micro_model_path, "float32")
    config = UpdateConfig(rule=rule, **{"clip_grad_norm": 1.0, **update})
    config.lion.min_8bit_size = 256  # the micro model's matrices take the 8-bit state
    guard = guarded_steps(model, make_strategy(strategy, model, make_rule(config), config),
                          batches(2, model.config.vocab_size))
    assert_only(guard, forwards=2)


@pytest.mark.parametrize("rule", ["adamw", "adafactor", "lion8bit"])
@pytest.mark.parametrize("fused", [False, True], ids=["standard", "fused"])
def test_a_hift_step_with_offloading_reads_nothing(micro_model_path, rule, fused):
    model = load_model(micro_model_path, "float32")
    update = UpdateConfig(rule=rule, clip_grad_norm=1.0)
    config = Config(update=update, hift=HiftConfig(group_size=1, fused=fused),
                    memory=MemoryConfig(offload_states=True, offload_frozen_weights=True))
    strategy = make_strategy("hift", model, make_rule(update), update, config)
    guard = guarded_steps(model, strategy, batches(2 * strategy.n_groups, model.config.vocab_size))
    assert_only(guard, forwards=2 * strategy.n_groups)


@pytest.mark.parametrize("strategy,rule", [("fused", "lion8bit"), ("standard", "adamw"), ("fused", "adalomo")])
def test_int8_weights_step_reads_nothing(micro_model_path, strategy, rule):
    model = load_model(micro_model_path, "float32")
    quantize_model(model, refresh_every=2, seed=1)  # a refresh (outliers and scales re-picked) happens in the run
    config = UpdateConfig(rule=rule, clip_grad_norm=1.0)
    guard = guarded_steps(model, make_strategy(strategy, model, make_rule(config), config),
                          batches(3, model.config.vocab_size))
    assert_only(guard, forwards=3)


@pytest.mark.parametrize("trainable", ["all", "mask_lora", "scale_lora"])
@pytest.mark.parametrize("strategy,rule", [("standard", "adamw"), ("fused", "adalomo"), ("fused", "lion8bit")])
def test_a_pruned_model_retraining_step_reads_nothing(micro_model_path, strategy, rule, trainable):
    from lowmem.weights.adapters import select_trainable
    from lowmem.perp.prune import prune_model

    model = load_model(micro_model_path, "float32")
    prune_model(model, "magnitude", 0.5, "2:4")  # masks: the gradients and updates are masked in the step
    select_trainable(model, trainable, 4, 8.0)
    config = UpdateConfig(rule=rule, clip_grad_norm=1.0)
    guard = guarded_steps(model, make_strategy(strategy, model, make_rule(config), config),
                          batches(2, model.config.vocab_size))
    assert_only(guard, forwards=2)


@pytest.mark.parametrize("strategy", ["standard", "fused"])
def test_float16_reads_only_its_overflow_check_once_per_step(micro_model_path, strategy):
    model = load_model(micro_model_path, "float16")
    config = UpdateConfig(rule="sgd", clip_grad_norm=1.0, clip_mode="two_pass")
    guard = guarded_steps(model, make_strategy(strategy, model, make_rule(config), config),
                          batches(3, model.config.vocab_size))
    assert guard.marked == {"float16 overflow check": 3}
    assert_only(guard, forwards=3, marked=["float16 overflow check"])


@pytest.mark.parametrize("memory", [[], ["memory.offload_embeddings=true"]], ids=["embeddings-on-device", "on-host"])
def test_the_training_loop_reads_only_at_log_points(tmp_path, micro_model_path, text_data, memory):
    """Host embeddings included: their lookup, host update and worker hand-off read no value inside the step (on a
    CPU run the device's ids are the host's, so the copy a lookup of unfed ids would make is not seen here)."""
    from lowmem.trainer import train

    guard = ForbidHostReads()
    config = make_config(tmp_path, micro_model_path, text_data, "update.strategy=fused", "update.rule=adalomo",
                         "train.max_steps=4", "train.gradient_accumulation_steps=1", "log.every_n_steps=2", *memory)
    result = train(config, step_guard=lambda: guard)
    assert len(result.losses) == 4 and all(isinstance(x, float) for x in result.losses)
    assert_only(guard, forwards=4)


def test_the_reference_ops_read_nothing():
    """The references are the fallback on a GPU without the extension: they must not read either."""
    from lowmem.ops.quant import dequantize_blockwise_ref, dynamic_map, quantize_blockwise_ref
    from lowmem.ops.update import factored_update_ref, lion8bit_update_ref, sgd_update_ref

    param, grad = torch.randn(12, 40), torch.randn(12, 40)
    scale, step = torch.tensor(0.5), torch.tensor(3.0)
    codes, absmax = quantize_blockwise_ref(torch.randn(480) * 0.1, dynamic_map(), 256, True)
    with ForbidHostReads():
        sgd_update_ref(param, grad, 0.1, 0.01, scale)
        for relative_step, scale_parameter, momentum in [(False, True, True), (True, False, False)]:
            factored_update_ref(param, grad, torch.ones(12), torch.ones(40), torch.zeros((12, 40) if momentum else 0), step,
                                scale, 0.01, relative_step, -0.8, 1e-30, 1.0, 1e-3, scale_parameter, 0.1, 0.9)
        factored_update_ref(param[0], grad[0], torch.ones(40), torch.zeros(0), torch.zeros(0), step, scale, 0.01,
                            False, -0.8, 1e-30, 1.0, 1e-3, True, 0.0, 0.0)
        lion8bit_update_ref(param, grad, codes, absmax, dynamic_map(), scale, 1e-3, 0.9, 0.99, 0.1, 256)
        dequantize_blockwise_ref(codes, absmax, dynamic_map(), 256, torch.bfloat16)


def test_the_guard_catches_a_read_and_lets_a_named_one_through():
    guard = ForbidHostReads()
    t = torch.ones(())
    with guard, pytest.raises(HostReadError, match="test_host_sync.py"):
        float(t)
    with guard:
        assert read(t, "log") == 1.0
    assert guard.marked == {"log": 1}


@pytest.mark.cuda
@pytest.mark.parametrize("strategy,rule", [("fused", "adalomo"), ("fused", "lion8bit"), ("standard", "adamw"),
                                           ("fused", "sgd")])
def test_cuda_step_has_no_synchronizing_call(micro_model_path, strategy, rule):
    """On a GPU, torch's sync debug mode also sees synchronizing copies (pageable memory, a code map uploaded
    per call); every warning it raises inside a step must come from transformers' mask creation."""
    import warnings

    model = load_model(micro_model_path, "bfloat16", "cuda")
    if rule == "lion8bit":
        quantize_model(model, seed=1)
    config = UpdateConfig(rule=rule, clip_grad_norm=1.0)
    strategy = make_strategy(strategy, model, make_rule(config), config)
    data = [{k: v.cuda() for k, v in b.items()} for b in batches(3, model.config.vocab_size)]
    tokens = [count_label_tokens(b) for b in batches(3, model.config.vocab_size)]
    strategy.prepare(1e-3)  # warm-up step: lazily made state and cached constants
    strategy.backward(loss_sum(model, data[0]) / tokens[0])
    strategy.step()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for batch, n in zip(data[1:], tokens[1:]):
                strategy.prepare(1e-3)
                strategy.backward(loss_sum(model, batch) / n)
                strategy.step()
    finally:
        torch.cuda.set_sync_debug_mode(0)
    syncs = [w for w in caught if "synchroniz" in str(w.message)]
    assert all(w.filename.replace("\\", "/").endswith("transformers/masking_utils.py") for w in syncs), [
        f"{w.filename}:{w.lineno}" for w in syncs]


def meta_steps(model, strategy, n_steps=2):
    """Steps with the model on the ``meta`` device, a stand-in for a GPU on a CPU machine (shapes only, no values):
    every host-to-device copy a step makes then shows, and the guard raises on one from pageable memory. Token counts
    come from the host batches, as the trainer's do; the batches carry no padding mask, whose all-ones check
    transformers makes on the host, and the packed-sequence check is answered as a plan answers it."""
    from lowmem.planner.plan import _UnpackedPositions

    guard = ForbidHostReads()
    host = batches(n_steps, model.config.vocab_size)
    with _UnpackedPositions():
        for batch in host:
            tokens = count_label_tokens(batch)
            on_device = {k: v.to("meta") for k, v in batch.items() if k != "attention_mask"}
            with guard:
                strategy.prepare(1e-3)
                strategy.backward(loss_sum(model, on_device) / tokens)
                strategy.step()
    return guard


@pytest.mark.parametrize("rule", RULE_NAMES)
@pytest.mark.parametrize("strategy", ["standard", "fused", "hift"])
def test_a_step_on_a_device_copies_nothing_from_pageable_host_memory(micro_model_path, strategy, rule):
    # e.g. a rule state made on the host and moved to the weight's device when first needed: under HiFT that is
    # inside a step, for every group of the first cycle
    model = load_model(micro_model_path, "float32").to("meta")  # train() ran on the host (transformers' kernels)
    update = UpdateConfig(rule=rule, clip_grad_norm=1.0)
    update.lion.min_8bit_size = 256
    config = Config(update=update, hift=HiftConfig(group_size=1),
                    memory=MemoryConfig(offload_states=True, offload_frozen_weights=True))
    step = make_strategy(strategy, model, make_rule(update), update, config, torch.device("meta"))
    guard = meta_steps(model, step, n_steps=3)
    assert set(guard.marked) <= {"dynamic code map"}  # the 8-bit momentum's code map, uploaded once by name


@pytest.mark.parametrize("trainable", ["all", "mask_lora"])
def test_an_int8_pruned_step_on_a_device_copies_nothing_from_pageable_host_memory(micro_model_path, trainable):
    from lowmem.weights.adapters import select_trainable
    from lowmem.perp.prune import prune_model

    model = load_model(micro_model_path, "float32")
    quantize_model(model, refresh_every=2, seed=1, stochastic=False)  # a generator cannot live on meta
    prune_model(model, "magnitude", 0.5, "2:4")
    select_trainable(model, trainable, 4, 8.0)
    model.to("meta")
    config = UpdateConfig(rule="adalomo", clip_grad_norm=1.0)
    guard = meta_steps(model, make_strategy("fused", model, make_rule(config), config))
    assert not guard.marked


def test_the_guard_catches_a_pageable_upload_and_lets_a_named_one_through():
    from lowmem.placement.host_sync import upload

    guard = ForbidHostReads()
    with guard, pytest.raises(HostReadError, match="synchronizing copy between host and device"):
        torch.ones(3).to("meta")
    with guard, pytest.raises(HostReadError, match="synchronizing copy between host and device"):
        torch.ones(3, device="meta").cpu()  # device to host, into pageable memory: as synchronous
    with guard:
        upload(torch.ones(3), torch.device("meta"), "constant")
        torch.ones(3).to("cpu")  # host to host: no device involved
    assert guard.marked == {"constant": 1}
