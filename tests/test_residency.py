"""The residency scheduler (lowmem/residency.py): where HiFT's states and frozen weights live, on resume, with tied
embeddings and when the model is placed from host memory; on a GPU, that offloading and weight streaming change
no weight and keep at most one group's state on the device."""

import gc
import json

import pytest
import torch

from lowmem import assets
from lowmem.config import Config, HiftConfig, MemoryConfig, UpdateConfig
from lowmem.loss import count_label_tokens, loss_sum
from lowmem.model import load_model
from lowmem.residency import DEVICE, HOST
from lowmem.rules import make_rule
from lowmem.strategies import make_strategy
from test_rules import batches


def hift(model, rule="adamw", group_size=1, order="bottom_up", fused=False, offload_states=True, offload_frozen=True,
         device=None):
    update = UpdateConfig(rule=rule, clip_grad_norm=None)
    config = Config(update=update, hift=HiftConfig(group_size=group_size, order=order, fused=fused),
                    memory=MemoryConfig(offload_states=offload_states, offload_frozen_weights=offload_frozen))
    return make_strategy("hift", model, make_rule(update), update, config, device)


def step(model, strategy, batch, lr=1e-3):
    strategy.prepare(lr)
    strategy.backward(loss_sum(model, batch) / count_label_tokens(batch))
    return strategy.step()


def group_names(group):
    return {n for unit in group for n in unit.params}


def test_resume_places_states_where_the_plan_says(micro_model_path):
    model = load_model(micro_model_path, "float32")
    strategy = hift(model)
    data = batches(strategy.n_groups + 2, model.config.vocab_size)
    for batch in data:  # every group's state exists; the checkpoint falls mid-cycle
        step(model, strategy, batch)
    saved = strategy.state_dict()
    model = load_model(micro_model_path, "float32")
    resumed = hift(model)
    resumed.load_state_dict(saved)
    active = group_names(resumed.active)
    assert resumed.position == strategy.position and len(resumed.inner.state.by_param) > len(active)
    # before the first step: the active group's state on the device, every other one in host memory
    assert resumed.residency.states_on_device() == active & set(resumed.inner.state.by_param)
    assert all(resumed.residency.state_location[n] == HOST for n in resumed.inner.state.by_param if n not in active)
    for batch in batches(strategy.n_groups, model.config.vocab_size, seed=3):
        step(model, resumed, batch)
        on_device = resumed.residency.states_on_device()
        assert on_device <= group_names(resumed.active), "a resumed run kept more than one group's state on the device"


def test_without_offloading_resume_keeps_every_state_on_the_device(micro_model_path):
    model = load_model(micro_model_path, "float32")
    strategy = hift(model, offload_states=False)
    for batch in batches(strategy.n_groups, model.config.vocab_size):
        step(model, strategy, batch)
    resumed = hift(load_model(micro_model_path, "float32"), offload_states=False)
    resumed.load_state_dict(strategy.state_dict())
    assert resumed.residency.states_on_device() == set(resumed.inner.state.by_param)


def test_tied_embeddings_stay_on_the_device_while_the_head_uses_them():
    tied = load_model(str(assets.tiny_model("micro-llama-tied")), "float32")
    strategy = hift(tied)  # units: embeddings, layers.0, layers.1, norm (the head is tied to the embeddings)
    assert strategy.residency.pinned_units == {"embeddings"}
    for batch in batches(3, tied.config.vocab_size):  # embeddings, layers.0, then layers.1 active
        step(tied, strategy, batch)
    streamed = {m.name for m in strategy.residency.last_plan if m.kind == "weights" and m.dst == HOST}
    assert streamed == {"layers.0"}
    assert strategy.residency.weight_location["embeddings"] == DEVICE
    untied = load_model(str(assets.tiny_model("micro-llama")), "float32")
    assert hift(untied).residency.pinned_units == set()


def test_every_unit_below_the_norm_streams_while_it_trains(micro_model_path):
    # the final norm is used after every layer (units follow the forward order), so backward stops at it
    model = load_model(micro_model_path, "float32")
    strategy = hift(model, order="top_down")  # lm_head, norm, layers.1, layers.0, embeddings
    step(model, strategy, batches(1, model.config.vocab_size)[0])
    assert [u.name for u in strategy.active] == ["norm"]
    step(model, strategy, batches(1, model.config.vocab_size)[0])
    assert {n for n, where in strategy.residency.weight_location.items() if where == HOST} == {
        "embeddings", "layers.0", "layers.1"}


def untied_opt(arch_path, device="cpu"):
    """The tiny OPT with its head untied, so its embeddings unit (embed_tokens, embed_positions, project_in) may
    leave the device."""
    model = load_model(arch_path("opt"), "float32", device)
    model.lm_head.weight = torch.nn.Parameter(model.lm_head.weight.detach().clone())
    return model


def test_a_unit_of_several_modules_is_planned_off_the_device(arch_path):
    model = untied_opt(arch_path)
    strategy = hift(model, order="top_down", device=torch.device("meta"))  # lm_head first: all below frozen
    embeddings = strategy.units[0]
    assert embeddings.name == "embeddings" and len(embeddings.modules) == 3
    assert strategy.residency.pinned_units == set()
    sent = []
    strategy.residency._to_device = lambda t: sent.append(id(t))
    strategy.place(model)
    assert strategy.residency.weight_location["embeddings"] == HOST
    assert not {id(t) for m in embeddings.modules for t in m.parameters()} & set(sent)


def test_a_model_loaded_in_host_memory_is_placed_without_visiting_the_device(micro_model_path):
    model = load_model(micro_model_path, "float32")
    # "meta" stands in for the GPU: every tensor on another device is sent there, except those of units planned
    # off the device
    strategy = hift(model, order="top_down", device=torch.device("meta"))  # lm_head first: all below frozen
    sent = []
    strategy.residency._to_device = lambda t: sent.append(id(t))
    strategy.place(model)
    host_units = {"embeddings", "layers.0", "layers.1", "norm"}
    assert {n for n, where in strategy.residency.weight_location.items() if where == HOST} == host_units
    kept = {id(t) for u in strategy.units if u.name in host_units for m in u.modules for t in [*m.parameters(), *m.buffers()]}
    everything = {id(t) for t in [*model.parameters(), *model.buffers()]}
    assert set(sent) == everything - kept and len(sent) == len(set(sent))  # each once, tied or not
    assert id(model.model.rotary_emb.inv_freq) in sent  # a buffer outside every unit goes too


def test_resume_with_offloading_in_the_trainer_is_exact(tmp_path, micro_model_path, text_data):
    from test_trainer import assert_resume_is_exact

    second = assert_resume_is_exact(tmp_path, micro_model_path, text_data, "update.strategy=hift", "hift.group_size=1",
                                    "update.rule=adamw", "update.lr=1e-2", "train.warmup_ratio=0",
                                    "memory.offload_states=true", "memory.offload_frozen_weights=true",
                                    "train.max_steps=7", split_at=3)
    records = [json.loads(line) for line in (tmp_path / "split" / "metrics.jsonl").read_text().splitlines()]
    assert [r["hift_group"] for r in records if "loss" in r] == [0, 1, 2, 3, 4, 0, 1]
    assert second.losses


# ---------------------------------------------------------------------------------------------------------- GPU


def cuda_model(name="tiny-llama", dtype="float32"):
    return load_model(str(assets.tiny_model(name)), dtype, "cuda")


def run_cycles(model, strategy, n_steps, seed=0):
    """Steps on the GPU; returns the bytes allocated after each, once its copies have landed."""
    data = [{k: v.cuda() for k, v in b.items()} for b in batches(n_steps, model.config.vocab_size, seed=seed)]
    allocated = []
    for batch in data:
        step(model, strategy, batch, lr=1e-3)
        torch.cuda.synchronize()
        torch.cuda.empty_cache()  # processes the events of blocks freed while another stream still used them
        allocated.append(torch.cuda.memory_allocated())
    return allocated


def slow_updates(strategy):
    """Delay every update on the default stream (a ~1 ms spin), so a copy on the side stream that does not wait
    for it, or a block reused too early, shows as a changed weight."""
    rule = strategy.inner.rule
    update = rule.update

    def delayed(*args, **kwargs):
        torch.cuda._sleep(2_000_000)
        update(*args, **kwargs)

    rule.update = delayed


def state_bytes_by_group(strategy):
    return [sum(strategy.residency._state_bytes(n) for n in group_names(g)) for g in strategy.groups]


@pytest.mark.cuda
@pytest.mark.parametrize("fused", [False, True], ids=["standard", "fused"])
@pytest.mark.parametrize("rule", ["adamw", "lion8bit"])
def test_cuda_offloading_changes_no_weight(rule, fused):
    plain, offloaded = cuda_model(), cuda_model()
    a = hift(plain, rule=rule, fused=fused, offload_states=False, offload_frozen=False)
    b = hift(offloaded, rule=rule, fused=fused)
    slow_updates(b)
    steps = 3 * a.n_groups
    run_cycles(plain, a, steps)
    run_cycles(offloaded, b, steps)
    for (name, x), (_, y) in zip(plain.named_parameters(), offloaded.named_parameters()):
        assert torch.equal(x.cuda(), y.cuda()), name


@pytest.mark.cuda
def test_cuda_at_most_one_groups_state_is_on_the_device_also_after_resume():
    model = cuda_model()
    strategy = hift(model, rule="adamw", offload_frozen=False)
    weights = torch.cuda.memory_allocated()
    allocated = run_cycles(model, strategy, 2 * strategy.n_groups)
    per_group = state_bytes_by_group(strategy)
    bound = max(per_group) + 1024 * 1024  # one group's state, plus the allocator's rounding and small constants
    second_cycle = allocated[strategy.n_groups:]
    assert max(second_cycle) - weights <= bound, (max(second_cycle) - weights, per_group)
    assert sum(per_group) > 2 * bound  # without offloading the bound could not hold
    saved = {k: v.cpu() for k, v in strategy.state_dict().items()}
    del strategy
    gc.collect()
    torch.cuda.empty_cache()
    model.requires_grad_(True)  # as loaded: the new strategy finds every trainable tensor
    resumed = hift(model, rule="adamw", offload_frozen=False)
    resumed.load_state_dict(saved)
    torch.cuda.synchronize()
    assert torch.cuda.memory_allocated() - weights <= bound
    allocated = run_cycles(model, resumed, resumed.n_groups, seed=5)
    assert max(allocated) - weights <= bound


@pytest.mark.cuda
def test_cuda_streamed_frozen_units_leave_the_device_and_tied_heads_still_run():
    model = cuda_model()
    strategy = hift(model, rule="sgd", order="top_down", offload_states=False)
    full = torch.cuda.memory_allocated()
    run_cycles(model, strategy, 1)  # lm_head active: embeddings and every layer live in pinned host memory
    streamed = sum(u.nbytes for u in strategy.units if strategy.residency.weight_location[u.name] == HOST)
    assert streamed > 0 and all(p.device.type == "cpu" and p.is_pinned() for p in model.model.layers[0].parameters())
    assert full - torch.cuda.memory_allocated() >= 0.9 * streamed
    tied = cuda_model("micro-llama-tied")
    tied_strategy = hift(tied, rule="sgd", order="top_down", offload_states=False)
    run_cycles(tied, tied_strategy, tied_strategy.n_groups)  # the head runs on the embeddings' device-resident weight


@pytest.mark.cuda
def test_cuda_a_unit_of_several_modules_streams_each_for_its_own_forward(arch_path):
    # OPT's embeddings unit: embed_tokens and embed_positions called by the decoder, then project_in
    streamed_model, plain_model = untied_opt(arch_path, "cuda"), untied_opt(arch_path, "cuda")
    streamed = hift(streamed_model, rule="adamw", order="top_down")
    plain = hift(plain_model, rule="adamw", order="top_down", offload_states=False, offload_frozen=False)
    torch.manual_seed(0)  # OPT has dropout: both runs draw the same masks
    run_cycles(streamed_model, streamed, 1)
    assert streamed.residency.weight_location["embeddings"] == HOST
    assert streamed_model.model.decoder.project_in.weight.device.type == "cpu"
    run_cycles(streamed_model, streamed, 2 * streamed.n_groups - 1, seed=1)
    torch.manual_seed(0)
    run_cycles(plain_model, plain, 1)
    run_cycles(plain_model, plain, 2 * plain.n_groups - 1, seed=1)
    for (name, x), (_, y) in zip(streamed_model.named_parameters(), plain_model.named_parameters()):
        assert torch.equal(x.cuda(), y.cuda()), name


@pytest.mark.cuda
def test_cuda_a_model_placed_from_host_memory_trains_like_one_loaded_on_the_device():
    on_device = cuda_model()
    placed = load_model(str(assets.tiny_model("tiny-llama")), "float32", "cpu")
    a = hift(on_device, rule="adamw", order="top_down")
    b = hift(placed, rule="adamw", order="top_down", device=torch.device("cuda"))
    b.place(placed)
    streamed = [n for n, where in b.residency.weight_location.items() if where == HOST]
    assert streamed and all(p.device.type == "cpu" and p.is_pinned() for p in placed.model.layers[0].parameters())
    run_cycles(on_device, a, 2 * a.n_groups)
    run_cycles(placed, b, 2 * b.n_groups)
    for (name, x), (_, y) in zip(on_device.named_parameters(), placed.named_parameters()):
        assert torch.equal(x.cuda(), y.cuda()), name


@pytest.mark.cuda
def test_cuda_int8_rounding_generators_resume_while_frozen_weights_sit_in_host_memory():
    from lowmem.int8_weights import int8_state_dict, int8_weights, load_int8_state_dict, quantize_model

    def int8_cuda_model():
        model = cuda_model("micro-llama")
        quantize_model(model, seed=3)
        return model

    model = int8_cuda_model()
    strategy = hift(model, rule="lion8bit")  # bottom_up: embeddings, layers.0, layers.1, ...
    run_cycles(model, strategy, 3)  # layers.0 was updated on the GPU, then left it while layers.1 trains
    layer0 = {n: w for n, w in int8_weights(model).items() if n.startswith("model.layers.0.")}
    assert layer0 and all(w.device.type == "cpu" for w in layer0.values())
    flat = int8_state_dict(model)
    for name in layer0:  # the generator that rounded the update, not a fresh one for where the weight sits now
        assert [k for k in flat if k.startswith(f"{name}.rounding_rng.")] == [f"{name}.rounding_rng.cuda:0"]
    fresh = int8_cuda_model()
    assert load_int8_state_dict(fresh, flat) == []
    for name, weight in layer0.items():
        restored = fresh.get_submodule(name).generator()
        assert torch.equal(restored.get_state(), weight.generator_states()["cuda:0"])
