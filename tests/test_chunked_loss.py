"""Chunked loss (memory.loss_chunk_tokens): the loss and every gradient equal the plain computation for tied and
untied heads and the heads that transform their logits; the full logits tensor never exists; the chunks run without
host reads; the trainer and eval use it; a model whose logits cannot be chunked is refused in one line."""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from float_error import RUN64_ADAM_EPS, RUN64_LOSS_RTOL, SUM64, assert_same_grads64
from lowmem.config import UpdateConfig
from lowmem.errors import UserError
from lowmem.activations.loss import check_chunked_head, chunk_tokens_for, loss_sum
from lowmem.metrics import SavedTensorBytes
from lowmem.model import load_model
from lowmem.rules import make_rule
from lowmem.strategies import make_strategy
from test_host_sync import guarded_steps
from test_rules import batches
from test_trainer import EVERY_STRATEGY, make_config


def tiny_extra(name, tmp_path, tokenizer_path):
    """Tiny models of the heads that transform their logits: Gemma-2 (soft-capping), Cohere (logit_scale),
    Granite (logits_scaling)."""
    import transformers as tf

    common = dict(vocab_size=1024, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    config = {
        "gemma2": lambda: tf.Gemma2Config(head_dim=16, final_logit_softcapping=2.0, **common),
        "cohere": lambda: tf.CohereConfig(logit_scale=0.5, **common),
        "granite": lambda: tf.GraniteConfig(logits_scaling=3.0, **common),
    }[name]()
    torch.manual_seed(0)
    model = tf.AutoModelForCausalLM.from_config(config)
    model.save_pretrained(tmp_path / name)
    return str(tmp_path / name)


def with_padding(batch):
    """The batch with the second sequence's tail padded and unlabeled, as chat data is."""
    batch = {k: v.clone() for k, v in batch.items()}
    batch["attention_mask"][1, -5:] = 0
    batch["labels"][1, -5:] = -100
    batch["labels"][0, :3] = -100
    return batch


def loss_and_grads(model, batch, chunk):
    model.zero_grad()
    loss = loss_sum(model, batch, chunk)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("arch", ["llama", "llama-tied", "gpt2", "opt", "gemma", "gemma2", "cohere", "granite"])
def test_chunked_loss_and_gradients_equal_the_plain_ones(arch, arch_path, tmp_path, micro_model_path):
    path = arch_path(arch) if arch in ("llama", "llama-tied", "gpt2", "opt", "gemma") else tiny_extra(
        arch, tmp_path, micro_model_path)
    # the same sums in another order: in float64, each off by at most n·2⁻⁵³ of its terms' magnitudes, n ≤ 10⁴ here
    # (≈ 1.1·10⁻¹²); SUM64 leaves a factor 100 for the chain rule's products (tests/float_error.py)
    model = load_model(path, "float64").eval()  # eval: GPT-2 and OPT have dropout
    check_chunked_head(model)
    batch = with_padding(batches(1, model.config.vocab_size)[0])
    plain, plain_grads = loss_and_grads(model, batch, 0)
    for chunk in (7, 64, 10_000):  # odd, several chunks per sequence, one chunk for everything
        loss, grads = loss_and_grads(model, batch, chunk)
        assert loss.dtype == torch.float64 and abs(float(loss - plain)) <= SUM64 * abs(float(plain))
        assert_same_grads64(plain_grads, grads, f"{arch} chunk {chunk}")


class LargestOutput(TorchDispatchMode):
    """The most elements of any tensor an op produced."""

    def __init__(self):
        super().__init__()
        self.most = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.most = max(self.most, t.numel())
        return out


def test_the_full_logits_never_exist_in_forward_or_backward(micro_model_path):
    model = load_model(micro_model_path, "float32")
    ids = torch.randint(0, model.config.vocab_size, (4, 96), generator=torch.Generator().manual_seed(0))
    batch = {"input_ids": ids, "labels": ids.clone(), "attention_mask": torch.ones_like(ids)}
    positions, vocab = ids.numel(), model.config.vocab_size
    largest_weight = max(p.numel() for p in model.parameters())
    assert positions * vocab > 4 * largest_weight
    with LargestOutput() as plain:
        loss_sum(model, batch).backward()
    with LargestOutput() as chunked:
        loss_sum(model, batch, 16).backward()
    assert plain.most >= (positions - 4) * vocab  # the logits
    assert chunked.most <= max(16 * vocab, largest_weight)  # one chunk's logits, or a weight's gradient
    with SavedTensorBytes(model.parameters()) as plain_saved:
        loss_sum(model, batch)
    with SavedTensorBytes(model.parameters()) as chunked_saved:
        loss_sum(model, batch, 16)
    # the float32 log-softmax of the logits, B·(T−1) × V × 4 bytes, is saved for backward only without chunking
    assert plain_saved.nbytes - chunked_saved.nbytes >= (positions - ids.shape[0]) * vocab * 4


@pytest.mark.parametrize("strategy", ["standard", "fused"])
def test_a_chunked_step_reads_nothing_on_the_host(micro_model_path, strategy):
    model = load_model(micro_model_path, "float32")
    config = UpdateConfig(rule="adamw", clip_grad_norm=1.0)
    update = make_strategy(strategy, model, make_rule(config), config)
    guard = guarded_steps(model, update, batches(2, model.config.vocab_size), chunk_tokens=16)
    assert not guard.marked and sum(guard.tolerated.values()) <= 2


CHUNKED_RUNS = {
    **EVERY_STRATEGY,
    # the graph is run backward twice: the head's summed gradient must be handed over in each pass
    "fused-two-pass": ["update.strategy=fused", "update.rule=adalomo", "update.clip_mode=two_pass",
                       "update.clip_grad_norm=1.0"],
    "int8-head": ["model.weight_format=int8", "model.int8.include_head=true", "update.strategy=fused",
                  "update.rule=adalomo"],
    "int8-head-two-pass": ["model.weight_format=int8", "model.int8.include_head=true", "update.strategy=fused",
                           "update.rule=adalomo", "update.clip_mode=two_pass", "update.clip_grad_norm=1.0"],
}


@pytest.mark.parametrize("args", list(CHUNKED_RUNS.values()), ids=list(CHUNKED_RUNS))
def test_training_with_chunked_loss_equals_training_without(tmp_path, micro_model_path, text_data, args):
    from lowmem.trainer import train

    # the same math in another order, so in float64 (tests/float_error.py)
    common = [*args, "model.dtype=float64", *RUN64_ADAM_EPS, "train.max_steps=3"]
    plain = train(make_config(tmp_path, micro_model_path, text_data, *common, "memory.loss_chunk_tokens=0",
                              name="plain"))
    chunked = train(make_config(tmp_path, micro_model_path, text_data, *common, "memory.loss_chunk_tokens=20",
                                name="chunked"))
    assert chunked.losses == pytest.approx(plain.losses, rel=RUN64_LOSS_RTOL)
    assert chunked.last_eval["val_loss"] == pytest.approx(plain.last_eval["val_loss"], rel=RUN64_LOSS_RTOL)


def test_auto_chunking_and_a_head_that_cannot_be_chunked(micro_model_path):
    assert chunk_tokens_for(None, 32_000) == 512 and chunk_tokens_for(None, 1024) == 0
    assert chunk_tokens_for(0, 128_256) == 0 and chunk_tokens_for(64, 1024) == 64
    model = load_model(micro_model_path, "float32")
    forward = type(model).forward

    class ScaledLogits(type(model)):  # does something to its logits that chunking does not know
        def forward(self, *args, **kwargs):
            out = forward(self, *args, **kwargs)
            out.logits = out.logits * 2
            return out

    model.__class__ = ScaledLogits
    with pytest.raises(UserError, match="ScaledLogits computes its logits otherwise .* memory.loss_chunk_tokens=0"):
        check_chunked_head(model)


def test_live_tensor_bytes_counts_what_a_forward_leaves_alive():
    from lowmem.metrics import LiveTensorBytes

    w = torch.nn.Parameter(torch.randn(100, 100))
    x = torch.randn(10, 100)
    with LiveTensorBytes([w]) as live:
        y = (x @ w).relu()  # x @ w is freed (relu saves its output); y is saved by the next matmul
        z = (y @ w).sum()  # y @ w is freed (sum saves nothing); z remains
    assert live.nbytes == 10 * 100 * 4 + 4
    with LiveTensorBytes() as counted_with_weight:  # w.t() is made inside and saved: w's storage counts then
        out = (x.requires_grad_() @ w.t()).sum()  # the grad of x needs w.t(), a view of w
    assert counted_with_weight.nbytes == 100 * 100 * 4 + 4
    del y, z, out


def test_auto_chunking_falls_back_to_the_plain_loss_where_an_explicit_setting_is_refused(
        tmp_path, micro_model_path, text_data, monkeypatch, caplog):
    import lowmem.activations.loss
    from lowmem.trainer import train

    def refuse(model):
        raise UserError("memory.loss_chunk_tokens: Odd computes its logits otherwise (set memory.loss_chunk_tokens=0)")

    monkeypatch.setattr(lowmem.activations.loss, "check_chunked_head", refuse)
    monkeypatch.setattr(lowmem.activations.loss, "chunk_tokens_for", lambda setting, vocab: setting or 16)  # auto: on
    result = train(make_config(tmp_path, micro_model_path, text_data, "train.max_steps=1", name="auto"))
    assert result.losses and "loss: not chunked (Odd computes its logits otherwise" in caplog.text
    with pytest.raises(UserError, match="Odd computes its logits otherwise"):
        train(make_config(tmp_path, micro_model_path, text_data, "train.max_steps=1", "memory.loss_chunk_tokens=16",
                          name="asked"))
