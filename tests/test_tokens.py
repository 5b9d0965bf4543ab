"""LeMo token elimination (lowmem/activations/tokens.py): keep_ratio 1 equals no elimination exactly; eliminated
tokens pass through unchanged and every position reaches the loss; kept tokens are computed at their original positions
(against the layer run by hand on them); a batch of 2 with different patterns equals the two run separately; no
host reads; the trainer runs it under every strategy; unsupported layers are refused."""

import pytest
import torch

from float_error import SUM64, U32, assert_same_grads64, assert_within
from lowmem.errors import UserError
from lowmem.activations.loss import loss_sum
from lowmem.model import load_model
from lowmem.ops.blocks import kept_rows
from lowmem.activations.tokens import TokenEliminator
from test_host_sync import guarded_steps
from test_trainer import EVERY_STRATEGY, make_config


def batch_of(n, length, vocab, seed=0, pad_last=0):
    ids = torch.randint(0, vocab, (n, length), generator=torch.Generator().manual_seed(seed))
    batch = {"input_ids": ids, "labels": ids.clone(), "attention_mask": torch.ones_like(ids)}
    if pad_last:
        batch["attention_mask"][-1, -pad_last:] = 0
        batch["labels"][-1, -pad_last:] = -100
    return batch


def grads_of(model, batch):
    model.zero_grad()
    loss = loss_sum(model, batch)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("arch", ["llama", "qwen3", "gemma", "phi3"])
def test_keeping_every_block_equals_no_elimination_exactly(arch, arch_path):
    model = load_model(arch_path(arch), "float32")
    model.config.attention_dropout = 0.0
    batch = batch_of(2, 70, model.config.vocab_size, pad_last=9)  # a tail shorter than a block; padding
    plain, plain_grads = grads_of(model, batch)
    eliminator = TokenEliminator(model, keep_ratio=1.0, dense_layers=0, block_size=16)
    loss, grads = grads_of(model, batch)
    eliminator.remove()
    assert torch.equal(loss, plain)
    assert all(torch.equal(grads[n], plain_grads[n]) for n in plain_grads)


def plant_content_scores(eliminator):
    """Block scores from the hidden states' content (a sum per block): the same for a sequence alone or in a batch,
    and another pattern per sequence, where the true scores of a random tiny model favour early blocks."""
    def scores(layer, hidden, kwargs):
        b, length, width = hidden.shape
        n = length // eliminator.block_size
        return hidden[:, :n * eliminator.block_size].reshape(b, n, -1).sum(-1).detach()

    eliminator.block_scores = scores


def test_block_scores_are_the_positive_query_key_products_each_key_receives(arch_path):
    # independent: Q and K by hand from the layer's projections and the model's rotary, then Σ_i relu(Q_i·K_j). In
    # float64 (tests/float_error.py): sums of positive products, each off by SUM64 relative at most; pooled in float64
    # and rounded once to float32 (u₃₂ relative).
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    model = load_model(arch_path("llama"), "float64")
    layer, config = model.model.layers[0], model.config
    batch = batch_of(2, 40, config.vocab_size, seed=2, pad_last=6)
    hidden = model.model.embed_tokens(batch["input_ids"]).detach()
    positions = torch.arange(40)[None]
    cos, sin = model.model.rotary_emb(hidden, position_ids=positions)
    heads, kv, dim = config.num_attention_heads, config.num_key_value_heads, config.hidden_size // config.num_attention_heads
    normed = layer.input_layernorm(hidden)
    q = layer.self_attn.q_proj(normed).view(2, 40, heads, dim).transpose(1, 2)
    k = layer.self_attn.k_proj(normed).view(2, 40, kv, dim).transpose(1, 2)
    q, k = apply_rotary_pos_emb(q, k, cos, sin)
    k = k.repeat_interleave(heads // kv, dim=1)
    products = (q @ k.transpose(-1, -2)).clamp_min(0)  # [b, h, query, key]
    padding = batch["attention_mask"].bool()
    valid = torch.ones(40, 40).tril().bool()[None] & padding[:, None, :] & padding[:, :, None]  # no pad key or query
    expected = (products * valid[:, None]).sum(dim=(1, 2)).view(2, 5, 8).sum(-1)
    eliminator = TokenEliminator(model, keep_ratio=0.5, dense_layers=0, block_size=8)
    from transformers.masking_utils import create_causal_mask

    mask = create_causal_mask(config=config, inputs_embeds=hidden, attention_mask=batch["attention_mask"],
                              cache=None, position_ids=positions)
    scores = eliminator.block_scores(layer, hidden, {"position_embeddings": (cos, sin), "attention_mask": mask})
    bound = (SUM64 + U32) * expected.detach().abs()
    assert_within(scores, expected, bound, "block scores")
    import lowmem.activations.tokens

    budget = lowmem.activations.tokens.SCORE_BYTES
    lowmem.activations.tokens.SCORE_BYTES = 4 * 2 * 4 * 40 * 7  # 7 queries a chunk: 6 chunks, the last partial
    try:
        chunked = eliminator.block_scores(layer, hidden, {"position_embeddings": (cos, sin), "attention_mask": mask})
    finally:
        lowmem.activations.tokens.SCORE_BYTES = budget
    eliminator.remove()
    assert_within(chunked, expected, bound, "block scores, chunked")


@pytest.mark.parametrize("arch", ["llama", "qwen3", "gemma", "phi3"])
def test_exact_scoring_runs_the_query_and_key_projections_only(arch, arch_path):
    # the matrix FLOPs of scoring a layer: Q and K projections of every token and the products of the causal chunks;
    # the value and output projections must not run (a fused qkv projection, Phi-3's, computes V with them)
    from torch.utils.flop_counter import FlopCounterMode

    model = load_model(arch_path(arch), "float32")
    layer, config = model.model.layers[0], model.config
    attention = layer.self_attn
    batch, length = 2, 40
    hidden = model.model.embed_tokens(batch_of(batch, length, config.vocab_size)["input_ids"]).detach()
    cos_sin = model.model.rotary_emb(hidden, position_ids=torch.arange(length)[None])
    eliminator = TokenEliminator(model, keep_ratio=0.5, dense_layers=0, block_size=8)
    projections = ["qkv_proj"] if hasattr(attention, "qkv_proj") else ["q_proj", "k_proj"]
    expected = sum(2 * batch * length * getattr(attention, n).weight.numel() for n in projections)
    heads, head_dim = config.num_attention_heads, attention.head_dim
    expected += 2 * batch * heads * length * length * head_dim  # one chunk of queries against every key
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        eliminator.exact_token_scores(layer, layer.input_layernorm(hidden), {"position_embeddings": cos_sin})
    eliminator.remove()
    assert counter.get_total_flops() == expected


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_eliminated_tokens_pass_through_and_kept_ones_are_computed_at_their_positions(arch_path, attention):
    model = load_model(arch_path("llama"), "float64")  # the hand run computes in another order (float_error.py)
    model.set_attn_implementation(attention)
    layer = model.model.layers[0]
    batch = batch_of(2, 64, model.config.vocab_size, seed=3, pad_last=11)  # the mask is gathered, not None
    eliminator = TokenEliminator(model, keep_ratio=0.5, dense_layers=0, block_size=8)
    plant_content_scores(eliminator)
    chosen = []
    kept_blocks = eliminator.kept_blocks
    eliminator.kept_blocks = lambda scores: chosen.append(kept_blocks(scores)) or chosen[-1]
    inputs = []
    pre = layer.register_forward_pre_hook(lambda mod, args, kwargs: inputs.append(kwargs.get("hidden_states", args[0] if args else None)), with_kwargs=True, prepend=True)
    outputs = []
    post = layer.register_forward_hook(lambda mod, args, out: outputs.append(out))  # after the rejoin
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    pre.remove(), post.remove()
    eliminator.remove()
    index = kept_rows(chosen[0], 8, 64)  # token positions, by the op's reference
    assert index.shape == (2, 32) and not torch.equal(index[0], index[1])  # each sequence its own pattern
    assert torch.isfinite(logits).all()  # every position reaches the loss through the dense last layer
    hidden_in, hidden_out = inputs[0], outputs[0]
    dropped = torch.ones(2, 64, dtype=torch.bool)
    dropped[torch.arange(2)[:, None], index] = False
    assert torch.equal(hidden_out[dropped], hidden_in[dropped])  # eliminated: unchanged
    assert not torch.allclose(hidden_out[~dropped], hidden_in[~dropped])
    # independent: the layer run by hand on each sequence's kept tokens, with the rotary of their own positions and
    # a mask written out: key position ≤ query position, key not padding
    for b in range(2):
        positions = index[b][None]
        x = hidden_in[b:b + 1, index[b]]
        cos_sin = model.model.rotary_emb(x, position_ids=positions)
        p = index[b]
        allowed = (p[None, :] <= p[:, None]) & batch["attention_mask"][b, p].bool()[None, :]
        mask = allowed if attention == "sdpa" else torch.zeros(allowed.shape, dtype=torch.float64).masked_fill(
            ~allowed, torch.finfo(torch.float64).min)
        eliminator.remove()  # the hand run is dense
        expected = layer(x, position_embeddings=cos_sin, attention_mask=mask[None, None], position_ids=positions)
        expected = expected[0] if isinstance(expected, tuple) else expected
        assert_within(hidden_out[b, index[b]], expected[0], SUM64 * float(expected.abs().max()), f"sequence {b}")


def test_a_batch_of_two_with_different_patterns_equals_each_alone(arch_path):
    model = load_model(arch_path("qwen2"), "float64")  # sums in another order: float64 (tests/float_error.py)
    eliminator = TokenEliminator(model, keep_ratio=0.4, dense_layers=0, block_size=8)
    plant_content_scores(eliminator)
    pair = batch_of(2, 80, model.config.vocab_size, seed=5)
    chosen = eliminator.kept_blocks(eliminator.block_scores(None, model.model.embed_tokens(pair["input_ids"]), {}))
    assert not torch.equal(chosen[0], chosen[1])  # the patterns differ (in layer 0, whose input is the embedding)
    loss, grads = grads_of(model, pair)
    alone = [grads_of(model, {k: v[i:i + 1] for k, v in pair.items()}) for i in range(2)]
    eliminator.remove()
    assert abs(float(loss - (alone[0][0] + alone[1][0]))) <= SUM64 * float(loss)
    assert_same_grads64(grads, {name: alone[0][1][name] + alone[1][1][name] for name in grads})


def test_an_eliminating_step_reads_nothing_on_the_host(arch_path):
    from lowmem.config import UpdateConfig
    from lowmem.rules import make_rule
    from lowmem.strategies import make_strategy

    model = load_model(arch_path("llama"), "float32")
    TokenEliminator(model, keep_ratio=0.5, dense_layers=0, block_size=8)
    config = UpdateConfig(rule="adamw", clip_grad_norm=1.0)
    strategy = make_strategy("fused", model, make_rule(config), config)
    guard = guarded_steps(model, strategy, [batch_of(2, 64, model.config.vocab_size, seed=seed) for seed in range(2)])
    assert not guard.marked and sum(guard.tolerated.values()) <= 2


@pytest.mark.parametrize("args", list(EVERY_STRATEGY.values()), ids=list(EVERY_STRATEGY))
def test_training_with_token_elimination(tmp_path, micro_model_path, text_data, args):
    from lowmem.trainer import train

    common = [*args, "train.max_steps=3", "tokens.dense_layers=0", "tokens.block_size=8"]
    plain = train(make_config(tmp_path, micro_model_path, text_data, *common, name="plain"))
    kept_all = train(make_config(tmp_path, micro_model_path, text_data, *common, "tokens.eliminate=true",
                                 "tokens.keep_ratio=1.0", name="all"))
    assert kept_all.losses == plain.losses
    sparse = train(make_config(tmp_path, micro_model_path, text_data, *common, "tokens.eliminate=true",
                               "tokens.keep_ratio=0.5", name="sparse"))
    assert sparse.losses[0] == pytest.approx(plain.losses[0], rel=0.05) and sparse.losses != plain.losses
    assert sparse.last_eval["val_loss"] < sparse.first_eval["val_loss"]
    # the predictor: fitted at step 0 (selecting exactly as the exact scores do), predicting at steps 1 and 2
    predicted = train(make_config(tmp_path, micro_model_path, text_data, *common, "tokens.eliminate=true",
                                  "tokens.keep_ratio=0.5", "tokens.predictor=true", name="predicted"))
    assert predicted.losses[0] == sparse.losses[0]
    assert predicted.last_eval["val_loss"] < predicted.first_eval["val_loss"]


def test_what_cannot_be_eliminated_is_refused(arch_path):
    with pytest.raises(UserError, match="GPT2LMHeadModel's decoder layers do not take position_embeddings"):
        TokenEliminator(load_model(arch_path("gpt2")), 0.5, 0)
    llama = load_model(arch_path("llama"))
    with pytest.raises(UserError, match="tokens.dense_layers 1 leaves no sparse layer in LlamaForCausalLM's 2"):
        TokenEliminator(llama, 0.5, 1)
    llama.config._attn_implementation_internal = "flash_attention_2"
    with pytest.raises(UserError, match="attention 'flash_attention_2' is not supported"):
        TokenEliminator(llama, 0.5, 0)


def test_elimination_under_gradient_checkpointing_equals_it_without(arch_path):
    from lowmem.model import enable_gradient_checkpointing

    results = []
    for checkpointing in (False, True):
        model = load_model(arch_path("llama"), "float64")  # recomputation: float64 (tests/float_error.py)
        if checkpointing:
            enable_gradient_checkpointing(model)
        eliminator = TokenEliminator(model, keep_ratio=0.5, dense_layers=0, block_size=8)
        plant_content_scores(eliminator)
        results.append(grads_of(model, batch_of(2, 64, model.config.vocab_size, seed=9)))
    (loss_a, grads_a), (loss_b, grads_b) = results
    assert torch.equal(loss_a, loss_b)
    assert_same_grads64(grads_a, grads_b)


def test_weight_streaming_brings_a_layer_in_before_the_scoring_runs(micro_model_path, monkeypatch):
    # on a GPU a streamed layer's weights must be on the device before the eliminator scores with them: the
    # residency's pre-hook is prepended whenever it is (re-)registered. A step with both, its moves recorded on the CPU
    # (tests/test_residency.py's mover): when the scoring runs, the layer's projections are the copies moved in.
    from lowmem.config import Config, HiftConfig, MemoryConfig, UpdateConfig
    from lowmem.rules import make_rule
    from lowmem.strategies import make_strategy
    from test_residency import RecordingMover, address, step

    model = load_model(micro_model_path, "float32")
    update = UpdateConfig(rule="sgd")
    config = Config(update=update, hift=HiftConfig(order="top_down"), memory=MemoryConfig(offload_frozen_weights=True))
    strategy = make_strategy("hift", model, make_rule(update), update, config)
    mover = RecordingMover()
    strategy.residency.attach(mover)
    eliminator = TokenEliminator(model, keep_ratio=0.5, dense_layers=0, block_size=8)  # before placement, as the
    strategy.place(model)  # trainer makes it; the head trains first: layers.0 and layers.1 stream for their forward
    scored = []
    score = TokenEliminator.exact_token_scores

    def checked(self, layer, normed, kwargs):
        attention = layer.self_attn
        scored.append(all(address(m.weight) in mover.allocated for m in (attention.q_proj, attention.k_proj)))
        return score(self, layer, normed, kwargs)

    monkeypatch.setattr(TokenEliminator, "exact_token_scores", checked)
    step(model, strategy, batch_of(2, 32, model.config.vocab_size), 1e-3)
    eliminator.remove()
    assert strategy.residency.weight_location["layers.0"] == "host"
    assert scored == [True]  # layers.0, its one sparse layer, scored on the weights brought in


# ------------------------------------------------------------------------------------------- the predictor


def test_recall_counts_the_exact_top_blocks_the_predicted_top_contains():
    from lowmem.activations.tokens import block_recall

    exact = torch.tensor([[9.0, 8, 7, 1, 2, 3], [1.0, 2, 3, 4, 5, 6]])  # tops: {0, 1, 2} and {3, 4, 5}
    predicted = torch.tensor([[5.0, 6, 0, 0, 0, 7], [0.0, 0, 0, 1, 3, 2]])  # {0, 1, 5}: 2 of 3; {3, 4, 5}: 3 of 3
    assert block_recall(predicted, exact, 3).item() == pytest.approx((2 / 3 + 1) / 2)
    assert block_recall(exact, exact, 2).item() == 1.0
    assert block_recall(-exact, exact, 3).item() == 0.0


def test_query_counts_are_the_queries_that_may_attend_each_token(arch_path):
    from transformers.masking_utils import create_causal_mask

    from lowmem.activations.tokens import query_counts

    model = load_model(arch_path("llama"), "float32")
    batch = batch_of(2, 12, model.config.vocab_size, pad_last=3)
    hidden = model.model.embed_tokens(batch["input_ids"])
    mask = create_causal_mask(config=model.config, inputs_embeds=hidden, attention_mask=batch["attention_mask"],
                              cache=None, position_ids=torch.arange(12)[None])
    counts = query_counts(mask, 2, 12, hidden.device)
    # by hand: query i sees key j when j <= i and neither is padding
    valid = batch["attention_mask"].bool()
    expected = torch.stack([torch.tensor([sum(1 for i in range(j, 12) if valid[b, i]) if valid[b, j] else 0
                                          for j in range(12)], dtype=torch.float32) for b in range(2)])
    assert torch.equal(counts, expected)
    assert torch.equal(query_counts(None, 2, 12, "cpu"), torch.arange(12, 0, -1).float().expand(2, -1))


def test_the_predictor_recovers_a_planted_log_linear_score():
    from lowmem.activations.tokens import ScorePredictor

    generator = torch.Generator().manual_seed(0)
    normed = torch.randn(2, 300, 16, generator=generator)
    w = torch.randn(16, generator=generator) * 0.5
    counts = torch.arange(300, 0, -1).float().expand(2, -1)
    scores = counts * torch.exp(normed @ w + 0.3)
    predictor = ScorePredictor()
    predictor.fit(normed, scores, counts)
    planted = torch.cat([w, torch.tensor([0.3])]).double()
    # How far the fit may be from the planted weights, from the fit's own terms: ridge regression with λ shrinks the
    # solution by at most λ/(σ²_min + λ) of it (σ²_min: the least eigenvalue of XᵀX); the floor added to keep log(0)
    # finite moves each target by at most floor/value, which moves the solution by at most ‖Δy‖·σ_max/(σ²_min + λ);
    # the float32 statistics (sums of n = 600 products) are off by n·u of their terms, which the solve amplifies by the
    # condition number.
    x = torch.cat([normed, torch.ones(2, 300, 1)], dim=-1).flatten(0, 1).double()
    gram = x.T @ x
    ridge = ScorePredictor.RIDGE * float(gram.diagonal().mean())
    eigenvalues = torch.linalg.eigvalsh(gram)
    low, high = float(eigenvalues[0]), float(eigenvalues[-1])
    mean = (scores / counts).flatten().double()
    floor = 1e-6 * float(mean.mean()) + 1e-30
    bound = (ridge / (low + ridge) * float(planted.norm()) + float((floor / mean).norm()) * high**0.5 / (low + ridge)
             + x.shape[0] * U32 * (high + ridge) / (low + ridge) * float(planted.norm()))
    error = predictor.weight.double() - planted
    assert float(error.norm()) <= bound, (float(error.norm()), bound)
    assert bound < 0.01 * float(planted.norm())  # the bound says something
    # a prediction exp(x·w') then differs from the planted exp(x·w) by at most exp(|x|·|w' − w|) − 1, relative, plus
    # its own float32 rounding (the d + 1 products and their sum, the exponential, the count: (d + 5)·u of x·w')
    fresh = torch.randn(1, 300, 16, generator=generator)
    features = torch.cat([fresh, torch.ones(1, 300, 1)], dim=-1).double()
    exact = counts[:1].double() * torch.exp(features @ planted)
    relative = torch.expm1(features.abs() @ error.abs()) + 21 * U32 * (1 + (features.abs() @ planted.abs()))
    assert_within(predictor.predict(fresh, counts[:1]), exact, relative * exact, "prediction")


def predictor_run(model, steps, refresh_every=2, **kwargs):
    """Steps of plain backward with a predicting eliminator; returns (eliminator, losses, stats per step)."""
    eliminator = TokenEliminator(model, keep_ratio=0.5, dense_layers=0, block_size=8, predictor=True,
                                 refresh_every=refresh_every, **kwargs)
    losses, stats = [], []
    for step in range(steps):
        eliminator.start_step(step)
        loss, _ = grads_of(model, batch_of(2, 64, model.config.vocab_size, seed=step, pad_last=5))
        losses.append(loss)
        stats.append(eliminator.step_stats())
    return eliminator, losses, stats


def test_the_predictor_selects_between_refits_and_the_exact_scores_at_them(arch_path, monkeypatch):
    model = load_model(arch_path("llama"), "float32")
    exact = TokenEliminator(model, keep_ratio=0.5, dense_layers=0, block_size=8)
    plain = [grads_of(model, batch_of(2, 64, model.config.vocab_size, seed=step, pad_last=5))[0] for step in range(3)]
    exact.remove()
    calls = []
    real = TokenEliminator.exact_token_scores
    monkeypatch.setattr(TokenEliminator, "exact_token_scores",
                        lambda self, *a: calls.append(self.step) or real(self, *a))
    eliminator, losses, stats = predictor_run(model, 3)
    eliminator.remove()
    assert calls == [0, 2]  # one sparse layer: scored exactly at the fit and the refresh, never at step 1
    assert torch.equal(losses[0], plain[0]) and torch.equal(losses[2], plain[2])  # refits select by the exact scores
    assert [sorted(s) for s in stats] == [[], [], ["token_recall"]]  # the first fit has no earlier predictor
    assert 0.0 <= stats[2]["token_recall"].item() <= 1.0


def checkpoint_with_hooks(layer):
    """Checkpoint ``layer`` around its whole call, hooks included, as transformers before 5.x and other wrappers do:
    the eliminator's hooks then run again in the recomputation during backward (transformers 5 checkpoints only
    ``forward``)."""
    from torch.utils.checkpoint import checkpoint

    call = type(layer)._call_impl.__get__(layer)
    layer._call_impl = lambda *args, **kwargs: checkpoint(call, *args, use_reentrant=False, **kwargs)


@pytest.mark.parametrize("checkpointing", ["transformers", "hooks-recomputed"])
def test_a_predicting_step_is_the_same_under_gradient_checkpointing(arch_path, monkeypatch, checkpointing):
    from lowmem.model import enable_gradient_checkpointing
    from lowmem.activations.tokens import ScorePredictor

    # a content rule, so the predicted pattern differs from the exact one (position-driven in a random model)
    monkeypatch.setattr(ScorePredictor, "predict", lambda self, normed, counts: normed.sum(-1) * (counts > 0))
    results = []
    for checkpointed in (False, True):
        model = load_model(arch_path("llama"), "float64")  # recomputation: float64 (tests/float_error.py)
        if checkpointed and checkpointing == "transformers":
            enable_gradient_checkpointing(model)
        elif checkpointed:
            for layer in model.model.layers:
                checkpoint_with_hooks(layer)
        eliminator = TokenEliminator(model, keep_ratio=0.5, dense_layers=0, block_size=8, predictor=True,
                                     refresh_every=4)
        # step 1 fits off the schedule (as after a resume without a predictor): a recomputation in backward must
        # select by the exact scores again, not by the predictor fitted a moment before; step 2 predicts
        for step in (1, 2):
            eliminator.start_step(step)
            results.append(grads_of(model, batch_of(2, 64, model.config.vocab_size, seed=step)))
    for (loss_a, grads_a), (loss_b, grads_b) in zip(results[:2], results[2:]):
        assert torch.equal(loss_a, loss_b)
        assert_same_grads64(grads_a, grads_b)


def test_a_predicting_step_reads_nothing_on_the_host(arch_path):
    from lowmem.config import UpdateConfig
    from lowmem.rules import make_rule
    from lowmem.strategies import make_strategy

    model = load_model(arch_path("llama"), "float32")
    eliminator, _, _ = predictor_run(model, 1, refresh_every=100)  # fitted, then only predicting
    eliminator.start_step(1)
    config = UpdateConfig(rule="adamw", clip_grad_norm=1.0)
    strategy = make_strategy("fused", model, make_rule(config), config)
    guard = guarded_steps(model, strategy, [batch_of(2, 64, model.config.vocab_size, seed=seed) for seed in range(2)])
    assert not guard.marked and sum(guard.tolerated.values()) <= 2
    eliminator.start_step(100)  # a refit: exact scores, the recall and the solve stay on the device too
    guard = guarded_steps(model, strategy, [batch_of(2, 64, model.config.vocab_size, seed=4)])
    assert not guard.marked and sum(guard.tolerated.values()) <= 1
    assert "token_recall" in eliminator.step_stats()


def test_the_trainer_reports_recall_at_each_refit_and_resumes_the_predictor_exactly(tmp_path, micro_model_path,
                                                                                    text_data):
    import json

    from lowmem.trainer import train
    from test_trainer import assert_resume_is_exact

    args = ["update.strategy=fused", "update.rule=adalomo", "tokens.eliminate=true", "tokens.dense_layers=0",
            "tokens.block_size=8", "tokens.keep_ratio=0.5", "tokens.predictor=true", "tokens.refresh_every=3",
            "log.every_n_steps=100"]
    result = train(make_config(tmp_path, micro_model_path, text_data, *args, "train.max_steps=7", name="log"))
    records = [json.loads(line) for line in (result.output_dir / "metrics.jsonl").read_text().splitlines()]
    recalls = {r["step"]: r["token_recall"] for r in records if "token_recall" in r}
    assert sorted(recalls) == [4, 7] and all(0.0 <= v <= 1.0 for v in recalls.values())  # refits at steps 3 and 6
    # killed at step 2, between the fit (0) and the refit (3): the resumed run must predict with the saved predictor
    assert_resume_is_exact(tmp_path, micro_model_path, text_data, *args, "train.max_steps=5", split_at=2)


def test_loaded_predictors_go_to_the_training_device_wherever_the_layer_sits(arch_path):
    # with weight streaming the model is loaded in host memory and placed after the checkpoint is read: a predictor
    # put where its layer sat then (the host) would multiply device features by a host weight ("meta" stands in for
    # the GPU)
    model = load_model(arch_path("llama"), "float32")
    eliminator = TokenEliminator(model, 0.5, 0, 8, predictor=True, device=torch.device("meta"))
    width = model.config.hidden_size + 1
    eliminator.load_state_dict({f"predictor.{i}.weight": torch.randn(width) for i in range(len(eliminator.sparse))})
    eliminator.remove()
    assert eliminator.predictors and all(p.weight.device.type == "meta" for p in eliminator.predictors)


@pytest.mark.cuda
def test_cuda_resume_with_weight_streaming_and_the_predictor_is_exact(tmp_path, micro_model_path, text_data):
    from test_trainer import assert_resume_is_exact

    # top_down: the head trains first, so every unit below it streams; the predictor fitted at step 0 predicts at
    # step 2, the first after the resume
    assert_resume_is_exact(tmp_path, micro_model_path, text_data, "train.device=cuda", "update.strategy=hift",
                           "hift.group_size=1", "hift.order=top_down", "memory.offload_states=true",
                           "memory.offload_frozen_weights=true", "update.rule=adamw", "tokens.eliminate=true",
                           "tokens.dense_layers=0", "tokens.block_size=8", "tokens.keep_ratio=0.5",
                           "tokens.predictor=true", "tokens.refresh_every=3", "train.max_steps=5", split_at=2)
