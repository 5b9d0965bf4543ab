"""The residency scheduler (lowmem/placement/residency.py): where HiFT's states and frozen weights live, on resume,
with tied embeddings and when the model is placed from host memory; on a GPU, that offloading and weight streaming
change no weight and keep at most one group's state on the device."""

import gc
import json

import pytest
import torch

from lowmem import assets
from lowmem.config import Config, HiftConfig, MemoryConfig, UpdateConfig
from lowmem.activations.loss import count_label_tokens, loss_sum
from lowmem.model import load_model
from lowmem.placement.residency import DEVICE, HOST
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
    """Steps on the GPU, queued as training queues them: no synchronization between steps (a missing wait must show
    as a wrong weight, not be covered by a sync). Returns the bytes allocated after each step."""
    data = [{k: v.cuda() for k, v in b.items()} for b in batches(n_steps, model.config.vocab_size, seed=seed)]
    allocated = []
    for batch in data:
        step(model, strategy, batch, lr=1e-3)
        allocated.append(torch.cuda.memory_allocated())
    return allocated


def slow_side_streams(strategy):
    """Every copy on a side stream starts after a ~1 ms spin there, so the default stream, if it did not wait for it,
    would read what the destination held before (the state, or the weights, of another tensor)."""
    from lowmem.placement.movers import CudaMover

    class Slow(CudaMover):
        def copy(self, dst, src, stream):
            if stream != self.current():
                with torch.cuda.stream(stream):
                    torch.cuda._sleep(1_000_000)
            super().copy(dst, src, stream)

    strategy.residency.attach(Slow(torch.device("cuda")))


def slow_updates(strategy):
    """Delay every update on the default stream (a ~1 ms spin), so a copy on a side stream that does not wait for it,
    or a block reused too early, shows as a changed weight."""
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
    slow_side_streams(b)
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
    # one group's state, plus the allocator's rounding and small constants (a block freed while a side stream still
    # reads it counts until that copy has run: the next group's prefetch overlaps the previous one's last reads)
    bound = 2 * max(per_group) + 1024 * 1024
    second_cycle = allocated[strategy.n_groups:]
    assert max(second_cycle) - weights <= bound, (max(second_cycle) - weights, per_group)
    assert sum(per_group) > 2 * bound  # without offloading the bound could not hold
    saved = {k: v.cpu() for k, v in strategy.state_dict().items()}
    del strategy
    gc.collect()
    model.requires_grad_(True)  # as loaded: the new strategy finds every trainable tensor
    resumed = hift(model, rule="adamw", offload_frozen=False)
    resumed.load_state_dict(saved)
    assert torch.cuda.memory_allocated() - weights <= bound
    allocated = run_cycles(model, resumed, resumed.n_groups, seed=5)
    assert max(allocated) - weights <= bound


@pytest.mark.cuda
def test_cuda_offloaded_states_are_cached_in_one_pool():
    # Each group's AdamW state (here 134 MB) is copied out after its update and the next group's copied in. Allocated
    # on a side stream, the incoming states lived in that stream's pool, so the same bytes sat cached in two pools:
    # on the H200, HiFT + AdamW with offloading reserved 71.3 GiB for 36.5 GiB allocated at 8B. Allocated on the
    # default stream they reuse the outgoing group's blocks: what is reserved beyond the allocated peak is the
    # allocator's rounding, far below one group's state. Measured as training runs: no synchronization, no
    # empty_cache between steps.
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=4096, hidden_size=1024, intermediate_size=4096, num_hidden_layers=4,
                         num_attention_heads=8, num_key_value_heads=8, max_position_embeddings=256)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).cuda().train()
    model.config.use_cache = False
    strategy = hift(model, rule="adamw", offload_frozen=False)
    slow_side_streams(strategy)
    gc.collect()
    torch.cuda.empty_cache()  # before the run only: what the model's build left cached is not the run's
    torch.cuda.reset_peak_memory_stats()
    run_cycles(model, strategy, 2 * strategy.n_groups + 1)
    torch.cuda.synchronize()
    allocated, reserved = torch.cuda.max_memory_allocated(), torch.cuda.max_memory_reserved()
    per_group = max(state_bytes_by_group(strategy))
    assert per_group > 100 * 2**20
    assert reserved - allocated < per_group / 4, (reserved / 2**20, allocated / 2**20, per_group / 2**20)


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
    slow_side_streams(streamed)
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
    slow_side_streams(b)
    b.place(placed)
    streamed = [n for n, where in b.residency.weight_location.items() if where == HOST]
    assert streamed and all(p.device.type == "cpu" and p.is_pinned() for p in placed.model.layers[0].parameters())
    run_cycles(on_device, a, 2 * a.n_groups)
    run_cycles(placed, b, 2 * b.n_groups)
    for (name, x), (_, y) in zip(on_device.named_parameters(), placed.named_parameters()):
        assert torch.equal(x.cuda(), y.cuda()), name


@pytest.mark.cuda
def test_cuda_int8_rounding_resumes_from_the_update_count_while_frozen_weights_sit_in_host_memory():
    from lowmem.config import UpdateConfig
    from lowmem.weights.int8 import int8_state_dict, int8_weights, load_int8_state_dict, quantize_model
    from lowmem.rules import make_rule

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
    assert not [k for k in flat if "rounding_rng" in k]  # the noise is counter-based: the update count resumes it
    fresh = int8_cuda_model()
    load_int8_state_dict(fresh, flat)
    sgd = make_rule(UpdateConfig(rule="sgd"))
    for name, weight in layer0.items():
        restored = fresh.get_submodule(name)
        assert restored.device.type == "cuda" and restored.host_updates == weight.host_updates > 0
        grad = torch.randn(weight.shape, generator=torch.Generator().manual_seed(0)) * 1e-3
        weight.update_with(sgd, grad, {}, 1.0)  # the original where it sits (host memory: the CPU kernel) ...
        restored.update_with(sgd, grad.cuda(), {}, 1.0)  # ... and the restored one on the GPU: the same codes
        assert torch.equal(restored.codes.cpu(), weight.codes) and torch.equal(restored.absmax.cpu(), weight.absmax)


# ---------------------------------------------------------------------------- the order rules, on the CPU


class RecordingMover:
    """A mover (``lowmem.placement.movers``) for a machine without a GPU: it copies host tensors for real, so training
    goes on, and records every allocation, copy, wait and event with its stream, so the order rules of DESIGN §4a can be
    checked. Tensors are named by their storage's address; the mover keeps what it made alive, so
    an address names one tensor for the whole run."""

    def __init__(self):
        self.log: list[tuple] = []
        self.kept: list[torch.Tensor] = []
        self.pinned: set[int] = set()
        self.allocated: set[int] = set()
        self.sides = 0

    def stream(self):
        self.sides += 1
        return f"side{self.sides}"

    def current(self):
        return "default"

    def _keep(self, tensor, names):
        self.kept.append(tensor)
        names.add(address(tensor))
        return tensor

    def empty_like(self, host):
        on_device = self._keep(torch.empty_like(host), self.allocated)
        self.log.append(("alloc", address(on_device), self.current()))
        return on_device

    def copy(self, dst, src, stream):
        self.log.append(("copy", address(dst), address(src), stream))
        dst.copy_(src)

    def event(self, stream):
        event = ("event", len(self.log))
        self.log.append(("record", event, stream))
        return event

    def wait_stream(self, waiter, stream):
        self.log.append(("wait_stream", waiter, stream))

    def wait_event(self, waiter, event):
        self.log.append(("wait_event", waiter, event))

    def pin(self, tensor):
        return self._keep(tensor.detach().clone(), self.pinned)

    def pinned_empty(self, like):
        return self._keep(torch.empty_like(like), self.pinned)

    def synchronize(self):
        self.log.append(("synchronize",))


def address(tensor):
    return tensor.untyped_storage().data_ptr()


def log_uses(model, strategy, mover):
    """Log a use of every tensor the default stream reads that a move put there: the weights of each module as its
    forward starts (after the scheduler's own pre-hook, which brings them in), each state as the rule reads it."""
    def weights_used(module, args):
        for t in [*module.parameters(), *module.buffers()]:
            mover.log.append(("use", address(t)))

    for unit in strategy.units:
        for module in unit.modules:
            module.register_forward_pre_hook(weights_used)
    rule = strategy.inner.rule
    update = rule.update

    def state_used(param, grad, state, *args, **kwargs):
        for t in state.values():
            mover.log.append(("use", address(t)))
        return update(param, grad, state, *args, **kwargs)

    rule.update = state_used


def check_order_rules(mover, sides):
    """DESIGN §4a, over a whole recorded run; returns the copies made on each side stream."""
    log = mover.log
    allocated_at = {}
    copied_on = {}
    side_copies = {side: 0 for side in sides}
    for i, entry in enumerate(log):
        if entry[0] == "alloc":
            _, dst, stream = entry
            assert stream == "default", "a destination allocated on a side stream is cached in that stream's pool"
            allocated_at[dst] = i
        elif entry[0] == "copy":
            _, dst, src, stream = entry
            if dst in mover.allocated:  # host to device
                assert src in mover.pinned, "a host-to-device copy from pageable memory synchronizes"
                assert dst in allocated_at, "a device tensor must be allocated by the mover, on the default stream"
            else:  # device to host: into a pinned buffer, on the default stream
                assert dst in mover.pinned and stream == "default"
            if stream != "default":
                side_copies[stream] += 1
                waited = any(e == ("wait_stream", stream, "default") for e in log[allocated_at[dst]:i])
                assert waited, "a side stream writes a block before waiting for its last users on the default stream"
                events = [e[1] for e in log[i:] if e[0] == "record" and e[2] == stream]
                if any(e[0] == "use" for e in log[i:]):  # the run went on: the copy must be waited for, used or not
                    assert any(("wait_event", "default", event) in log[i:] for event in events), \
                        "the default stream never waits for a side-stream copy: its block returns to the pool early"
                copied_on[dst] = (i, stream)
        elif entry[0] == "use" and entry[1] in copied_on:
            at, stream = copied_on.pop(entry[1])
            events = [e[1] for e in log[at:i] if e[0] == "record" and e[2] == stream]
            assert any(("wait_event", "default", event) in log[at:i] for event in events), \
                "the default stream uses a prefetched tensor without waiting for the event after its copy"
        elif entry[0] == "wait_stream":
            assert entry[1] != "default", "the default stream waits for a whole side stream"
    return side_copies


@pytest.mark.parametrize("rule", ["adamw", "lion8bit"])
@pytest.mark.parametrize("fused", [False, True], ids=["standard", "fused"])
def test_moves_follow_the_stream_rules_and_train_as_without_offloading(micro_model_path, rule, fused):
    # top_down: the head trains first, so every unit below streams for its forward; states go out after each update
    # and the next group's come in on the state stream; two cycles, so every move happens both ways
    plain, moved = load_model(micro_model_path, "float32"), load_model(micro_model_path, "float32")
    reference = hift(plain, rule=rule, fused=fused, order="top_down", offload_states=False, offload_frozen=False)
    strategy = hift(moved, rule=rule, fused=fused, order="top_down")
    mover = RecordingMover()
    strategy.residency.attach(mover)
    strategy.place(moved)
    log_uses(moved, strategy, mover)
    data = batches(2 * strategy.n_groups, moved.config.vocab_size)
    for batch in data:
        step(plain, reference, batch)
        step(moved, strategy, batch)
    copies = check_order_rules(mover, ["side1", "side2"])
    states, weights = strategy.residency.state_stream, strategy.residency.weight_stream
    assert states != weights and copies[states] > 0 and copies[weights] > 0  # each kind of traffic on its own stream
    for (name, a), (_, b) in zip(plain.named_parameters(), moved.named_parameters()):
        assert torch.equal(a, b), name  # the copies are real: the same training


def test_the_order_check_finds_a_missing_wait(micro_model_path, monkeypatch):
    # the check above must be able to fail: without the default stream's wait before backward, it does
    from lowmem.placement.residency import ResidencyScheduler

    monkeypatch.setattr(ResidencyScheduler, "states_ready", lambda self: None)
    model = load_model(micro_model_path, "float32")
    strategy = hift(model, order="top_down")
    mover = RecordingMover()
    strategy.residency.attach(mover)
    strategy.place(model)
    log_uses(model, strategy, mover)
    for batch in batches(2 * strategy.n_groups, model.config.vocab_size):
        step(model, strategy, batch)
    with pytest.raises(AssertionError, match="never waits for a side-stream copy|without waiting for the event after"):
        check_order_rules(mover, ["side1", "side2"])
