"""Rules under the standard strategy against torch's own optimizers, step for step, on a tiny Llama."""

import copy

import pytest
import torch

from lowmem.config import UpdateConfig
from lowmem.loss import count_label_tokens, loss_sum
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


def run_lowmem(model, update, data, lrs):
    strategy = make_strategy("standard", model, make_rule(update), update)
    for batch, lr in zip(data, lrs):
        strategy.prepare(lr)
        strategy.backward(loss_sum(model, batch) / count_label_tokens(batch))
        strategy.step()
    return strategy


def run_torch(model, optimizer, data, lrs, clip):
    for batch, lr in zip(data, lrs):
        for group in optimizer.param_groups:
            group["lr"] = lr
        (loss_sum(model, batch) / count_label_tokens(batch)).backward()
        if clip is not None:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)


@pytest.fixture
def pair(micro_model_path):
    model = load_model(micro_model_path, "float32")
    return model, copy.deepcopy(model)


LRS = [1e-2, 5e-3, 2e-3]


@pytest.mark.parametrize("weight_decay,clip", [(0.0, None), (0.1, 0.5)], ids=["plain", "wd-clip"])
def test_sgd_equals_torch_sgd(pair, weight_decay, clip):
    ours, theirs = pair
    data = batches(3, ours.config.vocab_size)
    run_lowmem(ours, UpdateConfig(rule="sgd", weight_decay=weight_decay, clip_grad_norm=clip), data, LRS)
    run_torch(theirs, torch.optim.SGD(theirs.parameters(), lr=1.0, weight_decay=weight_decay), data, LRS, clip)
    for (name, a), (_, b) in zip(ours.named_parameters(), theirs.named_parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)
    with torch.no_grad():
        moved = sum(float((a - b).abs().sum()) for a, b in zip(ours.parameters(), load_model_like(ours).parameters()))
    assert moved > 0


def load_model_like(model):
    from lowmem.model import load_model as load

    return load(model.name_or_path, "float32")


@pytest.mark.parametrize("weight_decay,clip", [(0.0, None), (0.05, 1.0)], ids=["plain", "wd-clip"])
def test_adamw_equals_torch_adamw(pair, weight_decay, clip):
    ours, theirs = pair
    data = batches(3, ours.config.vocab_size, seed=1)
    update = UpdateConfig(rule="adamw", weight_decay=weight_decay, clip_grad_norm=clip, beta1=0.8, beta2=0.95, eps=1e-6)
    strategy = run_lowmem(ours, update, data, LRS)
    optimizer = torch.optim.AdamW(theirs.parameters(), lr=1.0, betas=(0.8, 0.95), eps=1e-6,
                                  weight_decay=weight_decay, foreach=False)
    run_torch(theirs, optimizer, data, LRS, clip)
    for (name, a), (_, b) in zip(ours.named_parameters(), theirs.named_parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)
    # the moments agree too, and they are counted exactly: 8 bytes per parameter plus a step scalar each
    name, param = next(iter(ours.named_parameters()))
    torch.testing.assert_close(strategy.state.by_param[name]["exp_avg"], optimizer.state[dict(theirs.named_parameters())[name]]["exp_avg"])
    n_params = sum(p.numel() for p in ours.parameters())
    n_tensors = len(list(ours.parameters()))
    assert strategy.state_bytes() == 8 * n_params + 4 * n_tensors


def test_adamw_on_bfloat16_weights_keeps_dtype_and_moves_like_float32(micro_model_path):
    low = load_model(micro_model_path, "bfloat16")
    full = load_model(micro_model_path, "float32")
    start = [p.detach().clone() for p in full.parameters()]
    data = batches(3, low.config.vocab_size, seed=2)
    update = UpdateConfig(rule="adamw", clip_grad_norm=None)
    run_lowmem(low, update, data, LRS)
    run_lowmem(full, update, data, LRS)
    assert all(p.dtype == torch.bfloat16 for p in low.parameters())
    # bf16 rounds each weight to ~3 significant digits, so compare where training moved the weights:
    # the bf16 update must point the same way as the float32 one.
    low_moves = torch.cat([(a.detach().float() - s).flatten() for a, s in zip(low.parameters(), start)])
    full_moves = torch.cat([(b.detach() - s).flatten() for b, s in zip(full.parameters(), start)])
    assert torch.nn.functional.cosine_similarity(low_moves, full_moves, dim=0) > 0.95
