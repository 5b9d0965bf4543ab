"""Row-sparse embedding updates under the fused strategy (lowmem/strategies/embedding_rows.py) against the dense
gradient.

The side compared against is the same strategy with ``memory.row_sparse_embeddings=false``: torch's own embedding
backward and the dense update. In float32 the whole step is the same bits (the rows are summed as torch sums its
dense gradient on the CPU, and the row-sparse kernels are the dense kernels); the ops' own tests are in
test_update_rows_op.py."""

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from lowmem import assets
from lowmem.config import UpdateConfig, load_config
from lowmem.strategies.embedding_rows import row_gradient
from lowmem.model import load_model
from lowmem.rules import make_rule
from lowmem.strategies import make_strategy
from lowmem.strategies.fused import FusedStrategy

EXACT = [
    pytest.param(dict(rule="adalomo"), id="adalomo"),
    pytest.param(dict(rule="adalomo", weight_decay=0.1, clip_grad_norm=1.0), id="adalomo-wd-clip"),
    pytest.param(dict(rule="adalomo", clip_grad_norm=0.5, clip_mode="two_pass"), id="adalomo-two-pass"),
    pytest.param(dict(rule="sgd", weight_decay=0.1, lr=0.05), id="sgd-wd"),
    pytest.param(dict(rule="adafactor"), id="adafactor"),
]


def micro(name="micro-llama", dtype="float32"):
    torch.manual_seed(0)
    return load_model(str(assets.tiny_model(name)), dtype, "cpu", False, None, 0)


def train(model, update: UpdateConfig, row_sparse: bool, steps=3, padding=None):
    strategy = FusedStrategy(model, make_rule(update), update, row_sparse)
    g = torch.Generator().manual_seed(1)
    for _ in range(steps):
        ids = torch.randint(0, model.config.vocab_size, (2, 24), generator=g)
        ids[:, :5] = 7  # a token many times in the batch
        if padding is not None:
            ids[:, -3:] = padding
        strategy.prepare(update.lr)
        strategy.backward(model(input_ids=ids, labels=ids).loss)
        strategy.step()
    strategy.remove_hooks()
    return strategy


@pytest.mark.parametrize("options", EXACT)
def test_row_sparse_training_is_the_dense_training_bit_for_bit(options):
    update = UpdateConfig(strategy="fused", **{"lr": 1e-2, **options})
    sparse_model, dense_model = micro(), micro()
    sparse = train(sparse_model, update, True)
    dense = train(dense_model, update, False)
    assert sparse.embedding_gradient.startswith("row-sparse")
    assert dense.embedding_gradient.startswith("dense")
    embedding = "model.embed_tokens.weight"
    before = micro().state_dict()[embedding]
    assert not torch.equal(sparse_model.state_dict()[embedding], before)
    for (name, a), (_, b) in zip(sparse_model.state_dict().items(), dense_model.state_dict().items()):
        assert torch.equal(a, b), name
    for key, tensor in dense.state_dict().items():  # the rule's state: the row and column statistics too
        assert torch.equal(sparse.state_dict()[key], tensor), key


def test_a_padding_row_gets_no_update_as_in_the_dense_gradient():
    update = UpdateConfig(strategy="fused", rule="sgd", lr=0.05)
    sparse_model, dense_model = micro(), micro()
    pad = 3
    sparse_model.get_input_embeddings().padding_idx = pad
    dense_model.get_input_embeddings().padding_idx = pad
    train(sparse_model, update, True, padding=pad)
    train(dense_model, update, False, padding=pad)
    for (name, a), (_, b) in zip(sparse_model.state_dict().items(), dense_model.state_dict().items()):
        assert torch.equal(a, b), name
    assert torch.equal(sparse_model.get_input_embeddings().weight[pad], micro().get_input_embeddings().weight[pad])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_row_gradient_is_torchs_dense_embedding_gradient(dtype):
    """The rows and their sums equal torch's dense embedding gradient's nonzero rows (CPU: the same bits); the
    entries past the distinct rows are padding (row = the row count, values zero)."""
    gen = torch.Generator().manual_seed(0)
    n, width = 50, 7
    ids = torch.randint(0, n, (3, 40), generator=gen)
    ids[0, :10] = 4
    grad_out = torch.randn(3, 40, width, generator=gen, dtype=dtype)
    weight = torch.zeros(n, width, dtype=dtype, requires_grad=True)
    torch.nn.functional.embedding(ids, weight).backward(grad_out)
    rows, values = row_gradient(ids, grad_out, n, None)
    distinct = ids.unique()
    k = distinct.numel()
    assert rows.shape == (ids.numel(),) and values.shape == (ids.numel(), width) and values.dtype == dtype
    assert torch.equal(rows[:k], distinct) and (rows[k:] == n).all() and (values[k:] == 0).all()
    assert torch.equal(values[:k], weight.grad[distinct])


def test_the_dense_embedding_backward_never_runs():
    """What the feature is for: no vocabulary × hidden gradient of the input embedding exists (torch's
    embedding_dense_backward is what makes it)."""

    class Ops(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.seen = set()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.seen.add(func.overloadpacket.__name__)
            return func(*args, **(kwargs or {}))

    for row_sparse, expected in [(True, False), (False, True)]:
        ops = Ops()
        with ops:
            train(micro(), UpdateConfig(strategy="fused", rule="adalomo", lr=1e-2), row_sparse, steps=1)
        assert ("embedding_dense_backward" in ops.seen) == expected
        assert ("factored_update_rows_" in ops.seen) == row_sparse


@pytest.mark.parametrize("model_name, update, reason", [
    ("micro-llama-tied", ["update.rule=adalomo"], "tied to the head"),
    ("micro-llama", ["update.rule=adamw"], "update.rule=adamw moves rows without a gradient"),
    ("micro-llama", ["update.rule=lion"], "update.rule=lion"),
    ("micro-llama", ["update.rule=adafactor", "update.adafactor.beta1=0.9"], "update.rule=adafactor"),
])
def test_where_rows_alone_are_not_exact_the_gradient_stays_dense_and_says_why(model_name, update, reason):
    config = load_config(None, ["model.path=lowmem:micro-llama", "data.path=x.jsonl", "update.strategy=fused", *update])
    model = micro(model_name)
    strategy = make_strategy("fused", model, make_rule(config.update), config.update, config)
    assert strategy.embedding_gradient.startswith("dense gradient") and reason in strategy.embedding_gradient
    assert "forward" not in vars(model.get_input_embeddings())


def test_hift_and_the_knob_keep_the_dense_gradient():
    base = ["model.path=lowmem:micro-llama", "data.path=x.jsonl"]
    config = load_config(None, [*base, "update.strategy=fused", "update.rule=adalomo",
                                "memory.row_sparse_embeddings=false"])
    model = micro()
    strategy = make_strategy("fused", model, make_rule(config.update), config.update, config)
    assert "row_sparse_embeddings=false" in strategy.embedding_gradient
    config = load_config(None, [*base, "update.strategy=hift", "update.rule=adalomo", "hift.fused=true"])
    model = micro()
    make_strategy("hift", model, make_rule(config.update), config.update, config)
    assert "forward" not in vars(model.get_input_embeddings())


def test_removing_the_strategy_gives_the_lookup_back():
    model = micro()
    strategy = FusedStrategy(model, make_rule(UpdateConfig(rule="adalomo")), UpdateConfig(rule="adalomo"))
    assert "forward" in vars(model.get_input_embeddings())
    strategy.remove_hooks()
    assert "forward" not in vars(model.get_input_embeddings())


# -- the input embedding in host memory (memory.offload_embeddings) ---------------------------------------------


def train_fed(model, update: UpdateConfig, offload: bool, steps=3):
    """As :func:`train`, handing each batch's host ids to the strategy first, as the trainer does."""
    strategy = FusedStrategy(model, make_rule(update), update, True, offload)
    g = torch.Generator().manual_seed(1)
    for _ in range(steps):
        ids = torch.randint(0, model.config.vocab_size, (2, 24), generator=g)
        ids[:, :5] = 7
        strategy.prepare(update.lr)
        strategy.feed({"input_ids": ids.clone()})
        strategy.backward(model(input_ids=ids, labels=ids).loss)
        strategy.step()
    state = strategy.state_dict()  # waits for the last host update
    strategy.remove_hooks()
    return strategy, state


@pytest.mark.parametrize("options", EXACT)
def test_host_embeddings_train_as_on_the_device_bit_for_bit(options):
    """The host update (worker thread, host rule state) is the device's row-sparse update: on a CPU run, where both
    use the CPU kernels, the same bits, the last update included (it is waited for before the state is read)."""
    update = UpdateConfig(strategy="fused", **{"lr": 1e-2, **options})
    host_model, device_model = micro(), micro()
    host, host_state = train_fed(host_model, update, True)
    device, device_state = train_fed(device_model, update, False)
    assert host.embedding_gradient.startswith("row-sparse updates in host memory")
    for (name, a), (_, b) in zip(host_model.state_dict().items(), device_model.state_dict().items()):
        assert torch.equal(a, b), name
    assert host_state.keys() == device_state.keys()
    for key, tensor in device_state.items():
        assert torch.equal(host_state[key], tensor), key


def test_a_host_lookup_without_fed_ids_reads_them_and_is_the_same():
    model = micro()
    strategy = FusedStrategy(model, make_rule(UpdateConfig(rule="adalomo")), UpdateConfig(rule="adalomo"), True, True)
    ids = torch.randint(0, model.config.vocab_size, (2, 9))
    with torch.no_grad():
        unfed = model.get_input_embeddings()(ids)
        strategy.feed({"input_ids": ids.clone()})
        fed = model.get_input_embeddings()(ids)
    strategy.remove_hooks()
    assert torch.equal(unfed, fed) and torch.equal(fed, F.embedding(ids, model.get_input_embeddings().weight))


def test_offload_embeddings_refuses_what_it_cannot_do_in_one_line():
    from lowmem.errors import ConfigError, UserError

    base = ["model.path=lowmem:micro-llama", "data.path=x.jsonl", "memory.offload_embeddings=true"]
    for overrides, message in [
        (["update.strategy=standard"], "memory.offload_embeddings needs update.strategy=fused"),
        (["update.strategy=fused", "update.rule=adamw"], "not update.rule=adamw"),
        (["update.strategy=fused", "update.rule=adafactor", "update.adafactor.beta1=0.9"], "adafactor with beta1"),
        (["update.strategy=fused", "memory.row_sparse_embeddings=false"], "needs memory.row_sparse_embeddings=true"),
    ]:
        with pytest.raises(ConfigError, match=message):
            load_config(None, [*base, *overrides])
    config = load_config(None, [*base, "update.strategy=fused", "update.rule=adalomo"])
    with pytest.raises(UserError, match="offload_embeddings .* not exact here: dense gradient .*tied to the head"):
        make_strategy("fused", micro("micro-llama-tied"), make_rule(config.update), config.update, config)


def test_the_plan_counts_the_host_embedding_in_host_memory(tmp_path, micro_model_path, text_data):
    from lowmem.planner.plan import simulate
    from test_trainer import make_config

    common = ["data.max_seq_len=64", "update.strategy=fused", "update.rule=adalomo"]
    on_device = simulate(make_config(tmp_path, micro_model_path, text_data, *common), steps=2)
    on_host = simulate(make_config(tmp_path, micro_model_path, text_data, *common, "memory.offload_embeddings=true"),
                       steps=2)
    weight = micro().get_input_embeddings().weight
    assert on_host.host["weights float32"] == weight.numel() * weight.element_size()
    assert on_device.device["weights float32"] - on_host.device["weights float32"] == on_host.host["weights float32"]
    assert 0 < on_host.host["rule state"] < 0.05 * on_host.host["weights float32"]  # row and column statistics


def test_host_embeddings_resume_exactly(tmp_path, micro_model_path, text_data):
    from test_trainer import assert_resume_is_exact

    assert_resume_is_exact(tmp_path, micro_model_path, text_data, "update.strategy=fused", "update.rule=adalomo",
                           "memory.offload_embeddings=true")


@pytest.mark.cuda
def test_cuda_host_embeddings_train_as_on_the_device():
    """On a GPU: the weight and its rule state stay in host memory through training (and the weight goes back to the
    device when the strategy is removed), and training equals the device's row-sparse training to the rounding where
    CPU and CUDA kernels differ (the factored step's Σu²)."""
    update = UpdateConfig(strategy="fused", rule="adalomo", lr=1e-2, weight_decay=0.1)
    host_model, device_model = micro().cuda(), micro().cuda()
    _, state = train_fed_cuda(host_model, update, True)
    train_fed_cuda(device_model, update, False)
    assert state["model.embed_tokens.weight::exp_avg_sq_row"].device.type == "cpu"
    assert host_model.get_input_embeddings().weight.device.type == "cuda"
    for (name, a), (_, b) in zip(host_model.state_dict().items(), device_model.state_dict().items()):
        torch.testing.assert_close(a.cpu(), b.cpu(), rtol=1e-5, atol=1e-6, msg=name)


def train_fed_cuda(model, update, offload, steps=3):
    strategy = FusedStrategy(model, make_rule(update), update, True, offload)
    g = torch.Generator().manual_seed(1)
    for _ in range(steps):
        ids = torch.randint(0, model.config.vocab_size, (2, 24), generator=g)
        strategy.prepare(update.lr)
        strategy.feed({"input_ids": ids.clone()})
        strategy.backward(model(input_ids=ids.cuda(), labels=ids.cuda()).loss)
        strategy.step()
        if offload:
            assert model.get_input_embeddings().weight.device.type == "cpu"
    state = strategy.state_dict()
    strategy.remove_hooks()
    return strategy, state
