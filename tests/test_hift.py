"""HiFT: units, groups, equivalence with the plain loop, the delayed schedule, early-stopping backward,
the residency plan, and exact resume."""

import copy
import json

import pytest
import torch

from float_error import RUN64_ADAM_EPS, RUN64_LOSS_RTOL, assert_same_run64
from lowmem.config import Config, HiftConfig, MemoryConfig, UpdateConfig
from lowmem.activations.loss import count_label_tokens, loss_sum
from lowmem.metrics import SavedTensorBytes
from lowmem.model import enable_gradient_checkpointing, load_model
from lowmem.rules import make_rule
from lowmem.schedule import learning_rate
from lowmem.strategies import make_strategy
from lowmem.placement.units import discover_units, make_groups
from test_rules import batches
from test_trainer import assert_resume_is_exact, make_config, weights


def hift_config(group_size=1, order="bottom_up", fused=False, offload_states=False, offload_frozen=False, **update):
    update = UpdateConfig(rule=update.pop("rule", "sgd"), clip_grad_norm=update.pop("clip_grad_norm", None), **update)
    return Config(update=update, hift=HiftConfig(group_size=group_size, order=order, fused=fused),
                  memory=MemoryConfig(offload_states=offload_states, offload_frozen_weights=offload_frozen))


def build(model, config):
    return make_strategy("hift", model, make_rule(config.update), config.update, config)


def step(model, strategy, batch, lr):
    strategy.prepare(lr)
    strategy.backward(loss_sum(model, batch) / count_label_tokens(batch))
    return strategy.step()


def test_units_are_found_generically(micro_model_path):
    from lowmem import assets

    model = load_model(micro_model_path, "float32")
    assert [u.name for u in discover_units(model)] == ["embeddings", "layers.0", "layers.1", "norm", "lm_head"]
    tied = load_model(str(assets.tiny_model("micro-llama-tied")), "float32")
    units = discover_units(tied)
    assert [u.name for u in units] == ["embeddings", "layers.0", "layers.1", "norm"]  # lm_head is the embedding
    assert sum(len(u.params) for u in units) == len(list(tied.parameters()))


def test_units_follow_the_forward_order(arch_path):
    # weights outside the embeddings, the layers and the head go where the forward first uses them: position
    # embeddings and OPT's project_in before the layers, OPT's project_out with the final norm after them
    units = {u.name: sorted(u.params) for u in discover_units(load_model(arch_path("gpt2")))}
    assert units["embeddings"] == ["transformer.wpe.weight", "transformer.wte.weight"]
    assert units["norm"] == ["transformer.ln_f.bias", "transformer.ln_f.weight"]
    opt = {u.name: u for u in discover_units(load_model(arch_path("opt")))}
    assert sorted(opt["embeddings"].params) == [f"model.decoder.{n}.weight" for n in
                                                ("embed_positions", "embed_tokens", "project_in")]
    assert sorted(opt["norm"].params) == ["model.decoder.final_layer_norm.bias", "model.decoder.final_layer_norm.weight",
                                          "model.decoder.project_out.weight"]
    # the modules each unit streams, in the order the forward calls them, whatever order they were registered in
    assert [type(m).__name__ for m in opt["embeddings"].modules] == [
        "Embedding", "OPTLearnedPositionalEmbedding", "Linear"]
    model = load_model(arch_path("opt"))
    decoder = model.model.decoder
    decoder._modules["embed_positions"] = decoder._modules.pop("embed_positions")  # registered last now
    reordered = {u.name: u for u in discover_units(model)}
    assert [type(m).__name__ for m in reordered["embeddings"].modules] == [
        "Embedding", "OPTLearnedPositionalEmbedding", "Linear"]


def test_the_trace_leaves_no_fake_tensor_in_the_constant_caches(micro_model_path):
    # the trace may be the first to ask for a device's int8 code map (weights quantized on the host, then moved):
    # a fake tensor cached then would make every later real forward fake
    from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode

    from lowmem.weights.int8 import quantize_model
    from lowmem.ops.int8_update import _empty, _linear_map_on
    from lowmem.ops.quant import _dynamic_map_on
    from lowmem.ops.update import _constant

    model = load_model(micro_model_path, "float32")
    quantize_model(model)
    for cache in (_linear_map_on, _dynamic_map_on, _constant, _empty):
        cache.cache_clear()
    discover_units(model)
    batch = batches(1, model.config.vocab_size)[0]
    assert not isinstance(loss_sum(model, batch), FakeTensor)
    from lowmem.weights.int8 import linear_map
    from lowmem.ops.int8_update import empty_on
    from lowmem.ops.quant import dynamic_map
    from lowmem.ops.update import device_scalar

    with FakeTensorMode():
        made = [linear_map("cpu"), dynamic_map("cpu"), device_scalar(0.5, "cpu"), empty_on("cpu")]
    assert not any(isinstance(t, FakeTensor) for t in made)
    assert made[0] is linear_map("cpu") and made[2] is device_scalar(0.5, "cpu")


def test_a_forward_that_cannot_be_traced_places_stray_weights_lowest_and_unstreamed(arch_path, monkeypatch, caplog):
    # then wpe's use is unknown: with the embeddings (no backward stops above it), and that unit is never streamed
    import lowmem.placement.units

    def untraceable(model, layers):
        raise RuntimeError("data-dependent op")

    monkeypatch.setattr(lowmem.placement.units, "forward_stages", untraceable)
    units = {u.name: u for u in discover_units(load_model(arch_path("gpt2")))}
    assert sorted(units["embeddings"].params) == ["transformer.ln_f.bias", "transformer.ln_f.weight",
                                                  "transformer.wpe.weight", "transformer.wte.weight"]
    assert units["embeddings"].modules == [] and "norm" not in units
    assert "could not be traced (RuntimeError: data-dependent op)" in caplog.text


def test_the_norm_step_of_gpt2_runs_no_backward_through_the_layers(arch_path):
    # GPT-2's wpe used to train with the final norm, so that step saved as many activations as the embeddings step
    model = load_model(arch_path("gpt2"))
    strategy = build(model, hift_config())
    saved = {}
    for batch in batches(strategy.n_groups, model.config.vocab_size):
        name = strategy.active[0].name
        strategy.prepare(1e-3)
        with SavedTensorBytes(model.parameters()) as counter:
            loss = loss_sum(model, batch) / count_label_tokens(batch)
        strategy.backward(loss)
        strategy.step()
        saved[name] = counter.nbytes
    assert list(saved) == ["embeddings", "layers.0", "layers.1", "norm"]
    assert saved["norm"] < saved["layers.1"] < saved["layers.0"]  # backward stops at the active unit
    assert saved["norm"] < saved["embeddings"] / 3


def test_group_orders(micro_model_path):
    units = discover_units(load_model(micro_model_path, "float32"))
    names = lambda groups: [[u.name for u in g] for g in groups]  # noqa: E731
    assert names(make_groups(units, 2, "bottom_up", 0)) == [["embeddings", "layers.0"], ["layers.1", "norm"], ["lm_head"]]
    assert names(make_groups(units, 2, "top_down", 0)) == [["lm_head"], ["layers.1", "norm"], ["embeddings", "layers.0"]]
    random_order = names(make_groups(units, 1, "random", 3))
    assert random_order == names(make_groups(units, 1, "random", 3)) and sorted(map(tuple, random_order)) == sorted(
        map(tuple, names(make_groups(units, 1, "bottom_up", 0))))


def test_one_group_of_everything_equals_standard(tmp_path, micro_model_path, text_data):
    from lowmem.trainer import train

    standard = train(make_config(tmp_path, micro_model_path, text_data, name="std"))
    hift = train(make_config(tmp_path, micro_model_path, text_data, "update.strategy=hift", "hift.group_size=5",
                             name="hift1"))
    assert hift.losses == standard.losses
    wa, wb = weights(standard.final_dir), weights(hift.final_dir)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


@pytest.mark.parametrize("fused", [False, True], ids=["standard", "fused"])
def test_one_cycle_updates_each_parameter_once_with_the_rule(micro_model_path, fused):
    model = load_model(micro_model_path, "float64")  # the same math in another arrangement: float64 (float_error.py)
    reference = copy.deepcopy(model)
    config = hift_config(group_size=2, fused=fused)
    strategy = build(model, config)
    data = batches(strategy.n_groups, model.config.vocab_size, seed=11)
    lr = 0.05
    changes = {n: 0 for n, _ in model.named_parameters()}
    for batch, group in zip(data, strategy.groups):
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        step(model, strategy, batch, lr)
        # independent reference: plain autograd on a copy, SGD applied to this group's parameters only
        reference.zero_grad()
        (loss_sum(reference, batch) / count_label_tokens(batch)).backward()
        active = {n for unit in group for n in unit.params}
        with torch.no_grad():
            for name, param in reference.named_parameters():
                if name in active:
                    param.add_(param.grad, alpha=-lr)
        for name, param in model.named_parameters():
            changed = not torch.equal(param, before[name])
            assert changed == (name in active), name
            changes[name] += changed
    assert set(changes.values()) == {1}
    for (name, a), (_, b) in zip(model.named_parameters(), reference.named_parameters()):
        assert_same_run64(a, b, name)


def test_accumulation_2x2_equals_batch_4_under_hift(tmp_path, micro_model_path, text_data):
    from lowmem.trainer import train

    # the same math in another arrangement, so in float64 (tests/float_error.py)
    common = ["update.strategy=hift", "hift.group_size=2", "train.max_steps=6", "model.dtype=float64", *RUN64_ADAM_EPS]
    a = train(make_config(tmp_path, micro_model_path, text_data, *common, "train.batch_size=4", name="h4"))
    b = train(make_config(tmp_path, micro_model_path, text_data, *common, "train.batch_size=2",
                          "train.gradient_accumulation_steps=2", name="h2x2"))
    assert a.losses == pytest.approx(b.losses, rel=RUN64_LOSS_RTOL)
    wa, wb = weights(a.final_dir), weights(b.final_dir)
    for key in wa:
        assert_same_run64(wa[key], wb[key], key)


def test_delayed_schedule_steps_once_per_cycle_over_the_whole_run(tmp_path, micro_model_path, text_data):
    from lowmem.trainer import train

    # 5 units, group_size 2 → 3 groups; 9 steps = 3 cycles; linear decay, no warmup
    train(make_config(tmp_path, micro_model_path, text_data, "update.strategy=hift", "hift.group_size=2",
                      "train.max_steps=9", "train.lr_schedule=linear", "train.warmup_ratio=0", name="lr"))
    records = [json.loads(line) for line in (tmp_path / "lr" / "metrics.jsonl").read_text().splitlines()]
    lrs = [r["lr"] for r in records if "loss" in r]
    # one lr per cycle: the plain 9-step schedule at the cycle's last step (2, 5, 8)
    assert lrs == pytest.approx([3e-3 * 7 / 9] * 3 + [3e-3 * 4 / 9] * 3 + [3e-3 / 9] * 3)
    assert [r["hift_group"] for r in records if "loss" in r] == [0, 1, 2] * 3


def test_every_step_of_a_warmup_trains_at_a_positive_lr(tmp_path, micro_model_path, text_data):
    from lowmem.trainer import train

    train(make_config(tmp_path, micro_model_path, text_data, "update.strategy=hift", "hift.group_size=2",
                      "train.max_steps=13", "train.lr_schedule=cosine", "train.warmup_ratio=0.5", name="wu"))
    records = [json.loads(line) for line in (tmp_path / "wu" / "metrics.jsonl").read_text().splitlines()]
    lrs = [r["lr"] for r in records if "loss" in r]
    cycle_ends = [2, 2, 2, 5, 5, 5, 8, 8, 8, 11, 11, 11, 12]  # the last, partial cycle ends at the last step
    assert lrs == pytest.approx([learning_rate(s, 3e-3, 13, 0.5, "cosine") for s in cycle_ends])
    assert min(lrs) > 0
    assert lrs[0] < lrs[3] < lrs[6] and lrs[9] < lrs[6]  # 7 warmup steps, then cosine decay


def test_a_three_step_hift_run_with_warmup_moves_every_weight(tmp_path, micro_model_path, text_data):
    from lowmem.trainer import train

    # 3 groups, 3 steps: one cycle, inside the warmup; each group trains once and must change
    result = train(make_config(tmp_path, micro_model_path, text_data, "update.strategy=hift", "hift.group_size=2",
                               "update.rule=sgd", "train.max_steps=3", "train.warmup_ratio=0.5", name="smoke"))
    before = weights(__import__("pathlib").Path(micro_model_path))
    after = weights(result.final_dir)
    unchanged = [k for k in before if torch.equal(before[k], after[k])]
    assert not unchanged


@pytest.mark.parametrize("checkpointing", [False, True], ids=["plain", "checkpointed"])
def test_layers_below_the_active_group_keep_no_graph(micro_model_path, checkpointing):
    # checkpointed: transformers' switch also makes the embeddings' output require grad, which would send
    # backward through every frozen layer (and stop weight streaming); enable_gradient_checkpointing undoes that
    model = load_model(micro_model_path, "float32")
    if checkpointing:
        enable_gradient_checkpointing(model)
    strategy = build(model, hift_config(group_size=1, order="top_down"))  # first group: lm_head
    layers = model.model.layers
    outputs_need_grad = []
    hooks = [layer.register_forward_hook(lambda m, a, out: outputs_need_grad.append(
        (out[0] if isinstance(out, tuple) else out).requires_grad)) for layer in layers]
    batch = batches(1, model.config.vocab_size)[0]
    saved = {}
    for name in ["lm_head", "norm", "layers.1", "layers.0", "embeddings"]:
        strategy.prepare(1e-3)
        outputs_need_grad.clear()
        with SavedTensorBytes(model.parameters()) as counter:
            loss = loss_sum(model, batch) / count_label_tokens(batch)
        strategy.backward(loss)
        strategy.step()
        saved[name] = counter.nbytes
        if name in ("lm_head", "norm"):
            assert outputs_need_grad == [False, False]  # no decoder layer recorded a graph
        if name == "layers.1":
            assert outputs_need_grad == [False, True]
    for h in hooks:
        h.remove()
    if not checkpointing:  # (checkpointed, the logits dominate what any group saves)
        assert saved["lm_head"] < saved["layers.1"] < saved["layers.0"]  # the higher the group, the less is saved
        assert saved["lm_head"] < 0.5 * saved["embeddings"]


def test_residency_keeps_one_group_of_state_on_the_device(micro_model_path):
    model = load_model(micro_model_path, "float32")
    strategy = build(model, hift_config(group_size=1, offload_states=True, rule="adamw"))
    resident_without = None
    data = batches(2 * strategy.n_groups, model.config.vocab_size)
    for i, batch in enumerate(data):
        upcoming = {n for u in strategy.groups[(i + 1) % strategy.n_groups] for n in u.params}
        stats = step(model, strategy, batch, 1e-3)
        on_device = strategy.residency.states_on_device()
        assert on_device <= upcoming, "state outside the next group stayed on the device"
        groups_with_state_on_device = {j for j, g in enumerate(strategy.groups)
                                       if on_device & {n for u in g for n in u.params}}
        assert len(groups_with_state_on_device) <= 1
        if i >= strategy.n_groups:  # second cycle: every group's state exists; the next one was prefetched
            assert on_device == upcoming
            plan = strategy.residency.last_plan
            assert any(m.prefetch and m.dst == "device" for m in plan) and any(m.dst == "host" for m in plan)
        resident_without = stats["device_resident_bytes"]
    weights_bytes = sum(p.numel() * 4 for p in model.parameters())
    all_state = strategy.state_bytes()
    assert resident_without < weights_bytes + all_state


def test_frozen_weights_below_the_active_group_are_planned_off_the_device(micro_model_path):
    model = load_model(micro_model_path, "float32")
    strategy = build(model, hift_config(group_size=1, order="top_down", offload_frozen=True))
    batch = batches(1, model.config.vocab_size)[0]
    total = sum(p.numel() * 4 for p in model.parameters())
    stats = step(model, strategy, batch, 1e-3)  # lm_head active: every unit below it streams
    streamed = {m.name for m in strategy.residency.last_plan if m.kind == "weights" and m.dst == "host"}
    assert streamed == {"embeddings", "layers.0", "layers.1", "norm"}
    units = {u.name: u.nbytes for u in strategy.units}
    assert stats["device_resident_bytes"] == total - sum(units[n] for n in streamed)


@pytest.mark.parametrize("fused", ["false", "true"])
def test_resume_mid_cycle_is_exact(tmp_path, micro_model_path, text_data, fused):
    # 3 groups; the checkpoint at step 2 falls mid-cycle
    second = assert_resume_is_exact(tmp_path, micro_model_path, text_data, "update.strategy=hift", "hift.group_size=2",
                                    f"hift.fused={fused}", "update.rule=adafactor", "update.clip_grad_norm=null",
                                    "memory.offload_states=true", "train.max_steps=5",
                                    "train.warmup_ratio=0")
    assert second.losses and json.loads((tmp_path / "split" / "checkpoint-5" / "trainer_state.json").read_text())


def test_a_group_size_above_the_unit_count_is_refused(micro_model_path, caplog):
    from lowmem.errors import UserError

    with pytest.raises(UserError, match="hift.group_size 6 is more than the model's 5 HiFT units .*hift.group_size=5"):
        build(load_model(micro_model_path, "float32"), hift_config(group_size=6))
    build(load_model(micro_model_path, "float32"), hift_config(group_size=5))
    assert "one group of all 5 units" in caplog.text


def test_hift_fused_refuses_accumulation(tmp_path, micro_model_path, text_data):
    from lowmem.errors import ConfigError

    with pytest.raises(ConfigError, match="hift.fused=false accumulates exactly"):
        make_config(tmp_path, micro_model_path, text_data, "update.strategy=hift", "hift.fused=true",
                    "train.gradient_accumulation_steps=2")


def test_with_weight_streaming_the_chunked_loss_probe_runs_after_placement(tmp_path, micro_model_path, text_data,
                                                                           monkeypatch):
    # the probe is a forward of the model: before placement it would run the whole model in host memory
    import lowmem.trainer
    from lowmem.strategies.hift import HiftStrategy

    calls = []
    import lowmem.activations.loss

    probe, place = lowmem.activations.loss.check_chunked_head, HiftStrategy.place
    monkeypatch.setattr(lowmem.activations.loss, "check_chunked_head",
                        lambda model: calls.append("probe") or probe(model))
    monkeypatch.setattr(HiftStrategy, "place", lambda self, model: calls.append("place") or place(self, model))
    lowmem.trainer.train(make_config(tmp_path, micro_model_path, text_data, "update.strategy=hift",
                                     "memory.offload_frozen_weights=true", "memory.loss_chunk_tokens=16",
                                     "train.max_steps=1"))
    assert calls == ["place", "probe"]
