"""Causal-LM loss as a sum over label tokens, so the loop can normalize by the label tokens of a whole
optimizer step: accumulating micro-batches then equals one large batch exactly.

Chunked loss (``memory.loss_chunk_tokens``; LeMo's segmented loss): the model body runs to its last hidden states,
then the output head and the cross-entropy run ``chunk`` positions at a time, each chunk under non-reentrant
activation checkpointing. A chunk's logits (and their float32 upcast) exist only while that chunk is computed, in
forward and again in backward, so the ``[batch, seq, vocab]`` logits tensor never does. The loss and every
gradient are those of the plain computation (summed in another order). What the model does to logits after its
head is applied the same way: Gemma-2/3's soft-capping, Cohere's ``logit_scale``, Granite's ``logits_scaling``;
:func:`check_chunked_head` refuses, in one line, a model whose logits come out otherwise.
"""

from __future__ import annotations

import logging
import math

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from lowmem.data import IGNORE
from lowmem.errors import UserError
from lowmem.ops.update import math_dtype

log = logging.getLogger("lowmem")
# A sharded model's method that calls fn(model, ...) inside its root's FSDP2 forward hooks (lowmem.distributed.shard):
# the chunked loss runs the body and the head itself, not through the model's forward, and must still have the root's
# own parameters (final norm, head) gathered before and their gradients reduced after
ROOT_CALL = "lowmem_root_call"
AUTO_CHUNK_TOKENS = 512  # positions per chunk when memory.loss_chunk_tokens is null (auto)
AUTO_MIN_VOCAB = 32_000  # auto turns chunking on from this vocabulary size


def chunk_tokens_for(setting: int | None, vocab_size: int) -> int:
    """``memory.loss_chunk_tokens`` resolved: null → AUTO_CHUNK_TOKENS from a 32k vocabulary, else 0 (off)."""
    if setting is None:
        return AUTO_CHUNK_TOKENS if vocab_size >= AUTO_MIN_VOCAB else 0
    return setting


def resolve_chunk_tokens(setting: int | None, model: torch.nn.Module) -> int:
    """``memory.loss_chunk_tokens`` resolved for ``model`` (0: the plain loss), after the probe that its head can be
    chunked: one that cannot is refused when chunking was asked for (``setting`` > 0), and gets the plain loss under
    auto (None)."""
    chunk = chunk_tokens_for(setting, model.config.vocab_size)
    if not chunk:
        return 0
    try:
        check_chunked_head(model)
    except UserError as err:
        if setting is not None:  # asked for: refuse
            raise
        log.warning("loss: not chunked (%s)", str(err).split(": ", 1)[1])  # auto: the plain loss
        return 0
    log.info("loss: head and cross-entropy %d positions at a time (the full logits never exist)", chunk)
    return chunk


def count_label_tokens(batch: dict[str, torch.Tensor]) -> int:
    """Tokens that are predicted: label positions 1.. (position 0 has no preceding context) not ignored."""
    return int((batch["labels"][:, 1:] != IGNORE).sum())


def loss_sum(model: torch.nn.Module, batch: dict[str, torch.Tensor], chunk_tokens: int = 0) -> torch.Tensor:
    """Sum of next-token cross-entropy over the label tokens of ``batch`` (a float32 scalar; float64 for a float64
    model); ``chunk_tokens`` > 0
    computes head and loss that many positions at a time (see the module docstring)."""
    targets = batch["labels"][:, 1:]
    if chunk_tokens > 0:
        return _as_model_call(model, _chunked_loss_sum)(batch, targets, chunk_tokens)
    logits = model(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask")).logits
    shifted_logits = logits[:, :-1].to(math_dtype(logits.dtype))
    return F.cross_entropy(
        shifted_logits.reshape(-1, shifted_logits.size(-1)), targets.reshape(-1), ignore_index=IGNORE, reduction="sum"
    )


def _as_model_call(model: torch.nn.Module, fn):
    """``fn(model, ...)`` called as the model's own forward would be: inside a sharded model's root hooks
    (:data:`ROOT_CALL`), or directly."""
    inside_root = getattr(model, ROOT_CALL, None)
    if inside_root is not None:
        return lambda *args: inside_root(fn, *args)
    return lambda *args: fn(model, *args)


def _body(model: torch.nn.Module) -> torch.nn.Module:
    body = model.base_model
    if body is model:
        raise UserError(f"memory.loss_chunk_tokens: {type(model).__name__} has no separate base model to run up to "
                        "the head (set memory.loss_chunk_tokens=0)")
    return body


def _after_head(config):
    """What the model does to its head's output before the loss (as its own forward does it, in its dtype)."""
    softcap = getattr(config, "final_logit_softcapping", None)
    scale = getattr(config, "logit_scale", None)  # Cohere: multiplies
    divisor = getattr(config, "logits_scaling", None)  # Granite: divides

    def apply(logits: torch.Tensor) -> torch.Tensor:
        if scale is not None:
            logits = logits * scale
        if divisor is not None:
            logits = logits / divisor
        if softcap is not None:
            logits = torch.tanh(logits / softcap) * softcap
        return logits

    return apply


class _HeadGradient:
    """The output head's weight gradient summed over the loss chunks in one buffer: each chunk's backward adds its
    product into it in place (``addmm_``), and the chunk whose backward runs last hands the sum to autograd. Autograd's
    own sum of a weight used by n chunks holds each chunk's full gradient before adding it (at Llama-3's 128k
    vocabulary, 1 GiB apiece in bf16); this holds one. The count starts again after each hand-over: a graph run
    backward twice (the fused strategy's two-pass clipping) hands the sum over once per pass."""

    def __init__(self, chunks: int):
        self.chunks = chunks
        self.remaining = chunks
        self.total: torch.Tensor | None = None

    def chunk_done(self) -> torch.Tensor | None:
        """Count one chunk's backward; after the last, the sum (taken out of this holder), else None."""
        self.remaining -= 1
        if self.remaining > 0:
            return None
        self.remaining = self.chunks
        total, self.total = self.total, None
        return total


class _ChunkHead(torch.autograd.Function):
    """logits = hidden·Wᵀ (+ b) for one chunk, its weight gradient accumulated in a shared :class:`_HeadGradient`."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, summed: _HeadGradient):
        ctx.save_for_backward(hidden, weight)
        ctx.summed, ctx.has_bias = summed, bias is not None
        return F.linear(hidden, weight, bias)

    @staticmethod
    def backward(ctx, grad_logits):
        hidden, weight = ctx.saved_tensors
        summed: _HeadGradient = ctx.summed
        grad_hidden = grad_logits @ weight if ctx.needs_input_grad[0] else None
        grad_weight = grad_bias = None
        if ctx.needs_input_grad[1]:
            if summed.total is None:
                summed.total = grad_logits.T @ hidden
            else:
                summed.total.addmm_(grad_logits.T, hidden)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_bias = grad_logits.sum(0)  # a bias is a vocabulary-sized vector: autograd's sum is cheap
        grad_weight = summed.chunk_done()
        return grad_hidden, grad_weight, grad_bias, None


HEAD_SLICE_VALUES = 2**24  # values of an int8 head dequantized at once: 32 MiB in bf16 (4096 rows of Llama-3-8B's)


def _head_slices(weight) -> list[tuple[int, int]]:
    rows, cols = weight.shape
    step = max(1, HEAD_SLICE_VALUES // max(cols, 1))
    return [(start, min(start + step, rows)) for start in range(0, rows, step)]


class _Int8ChunkHead(torch.autograd.Function):
    """logits = hidden·Wᵀ (+ b) for one chunk with an int8 head (``model.int8.include_head``): W is dequantized
    :data:`HEAD_SLICE_VALUES` values (whole vocabulary rows) at a time, in forward and again in backward, so no float
    copy of the head exists; its weight gradient is summed over the chunks in one buffer (:class:`_HeadGradient`)
    and handed to the int8 weight once, after the last chunk (whose hooks then run the fused update). ``anchor``
    (int8_weights' ``backward_anchor``) reaches backward when nothing else needs a gradient (a frozen body)."""

    @staticmethod
    def forward(ctx, hidden, anchor, weight, bias, summed: _HeadGradient):
        ctx.save_for_backward(hidden)
        ctx.weight, ctx.summed, ctx.has_bias = weight, summed, bias is not None
        logits = hidden.new_empty(hidden.shape[0], weight.shape[0])
        for start, stop in _head_slices(weight):
            logits[:, start:stop] = hidden @ weight.dequantize_rows(start, stop, hidden.dtype).T
        return logits if bias is None else logits.add_(bias)

    @staticmethod
    def backward(ctx, grad_logits):
        (hidden,) = ctx.saved_tensors
        weight, summed = ctx.weight, ctx.summed
        slices = _head_slices(weight)
        grad_hidden = grad_bias = None
        if ctx.needs_input_grad[0]:  # summed over the slices in the math dtype, rounded once
            acc = torch.zeros(hidden.shape, dtype=math_dtype(hidden.dtype), device=hidden.device)
            for start, stop in slices:
                acc.addmm_(grad_logits[:, start:stop].to(acc.dtype), weight.dequantize_rows(start, stop, acc.dtype))
            grad_hidden = acc.to(hidden.dtype)
        if weight.requires_grad:
            if summed.total is None:
                summed.total = torch.zeros(weight.shape, dtype=grad_logits.dtype, device=grad_logits.device)
            for start, stop in slices:
                summed.total[start:stop].addmm_(grad_logits[:, start:stop].T, hidden)
        if ctx.has_bias and ctx.needs_input_grad[3]:
            grad_bias = grad_logits.sum(0)
        total = summed.chunk_done()
        if total is not None:
            weight.accumulate_grad(total)  # once per backward, as autograd would for a parameter
        return grad_hidden, None, None, grad_bias, None


def _int8_head(head: torch.nn.Module) -> bool:
    """An int8 head (``model.int8.include_head``) in nn.Linear's layout."""
    from lowmem.weights.int8 import Int8Linear

    return isinstance(head, Int8Linear) and not head.transposed


def _linear_head(head: torch.nn.Module) -> bool:
    """A plain linear head (its weight a parameter of it, no hooks or adapters around its forward)."""
    return (type(head) is torch.nn.Linear and not head._forward_hooks and not head._forward_pre_hooks
            and isinstance(head.weight, torch.nn.Parameter))


def _chunk_loss(hidden: torch.Tensor, targets: torch.Tensor, head: torch.nn.Module, after_head,
                summed: _HeadGradient | None = None) -> torch.Tensor:
    if summed is not None and _int8_head(head):
        from lowmem.weights.int8 import backward_anchor

        anchor = backward_anchor(head.weight)
        logits = after_head(_Int8ChunkHead.apply(hidden, anchor, head.weight, head.bias, summed))
    elif summed is not None:
        logits = after_head(_ChunkHead.apply(hidden, head.weight, head.bias, summed))
    else:
        logits = after_head(head(hidden))
    logits = logits.to(math_dtype(logits.dtype))
    return F.cross_entropy(logits, targets, ignore_index=IGNORE, reduction="sum")


def _chunked_loss_sum(model, batch, targets: torch.Tensor, chunk_tokens: int) -> torch.Tensor:
    out = _body(model)(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask"))
    hidden = out[0][:, :-1]
    hidden = hidden.reshape(-1, hidden.shape[-1])
    flat_targets = targets.reshape(-1)
    head, after_head = model.get_output_embeddings(), _after_head(model.config)
    grad = torch.is_grad_enabled()
    n_chunks = -(-hidden.shape[0] // chunk_tokens)
    if _int8_head(head):  # every chunk, with or without grad: the head is only ever dequantized a slice at a time
        if head._forward_hooks or head._forward_pre_hooks:
            raise UserError("model.int8.include_head: the int8 head has hooks around its forward, which the chunked "
                            "loss would bypass (set model.int8.include_head=false)")
        summed = _HeadGradient(n_chunks)
    elif grad and n_chunks > 1 and _linear_head(head) and head.weight.requires_grad:
        summed = _HeadGradient(n_chunks)
    else:
        summed = None
    total = None
    for start in range(0, hidden.shape[0], chunk_tokens):
        end = start + chunk_tokens
        args = (hidden[start:end], flat_targets[start:end], head, after_head, summed)
        # recomputed in backward, so no chunk's logits are kept for it; without grad there is no backward
        part = checkpoint(_chunk_loss, *args, use_reentrant=False) if grad else _chunk_loss(*args)
        total = part if total is None else total + part
    return total


@torch.no_grad()
def check_chunked_head(model: torch.nn.Module) -> None:
    """Refuse, in one line, a model whose logits are not its head applied to its base model's last hidden states
    (and the known transforms after it): chunking would compute another loss. One forward of four tokens."""
    was_training = model.training
    model.eval()
    try:
        # where the logits are made: the input embedding may live in host memory (memory.offload_embeddings)
        device = model.get_output_embeddings().weight.device
        ids = torch.arange(4, device=device).unsqueeze(0) % model.config.vocab_size
        batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
        expected = model(**batch).logits.float()
        ours = _as_model_call(model, _head_on_body)(batch).float()
    finally:
        model.train(was_training)
    if not torch.allclose(ours, expected, rtol=1e-3, atol=1e-3):
        raise UserError(f"memory.loss_chunk_tokens: {type(model).__name__} computes its logits otherwise than its "
                        "head on its last hidden states, so a chunked loss would differ (set memory.loss_chunk_tokens=0)")


def _head_on_body(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The logits as the chunked loss makes them (all positions at once)."""
    return _after_head(model.config)(model.get_output_embeddings()(_body(model)(**batch)[0]))


@torch.no_grad()
def evaluate(model: torch.nn.Module, batches, device: torch.device, chunk_tokens: int = 0,
             world=None) -> dict[str, float]:
    """Token-weighted mean loss and perplexity over ``batches`` (head and loss ``chunk_tokens`` positions at a
    time when > 0). ``world`` (``lowmem.distributed.world.World``): each rank's ``batches`` are its share, and the
    loss and the label tokens are summed over the ranks."""
    was_training = model.training
    model.eval()
    total, tokens = None, 0
    for batch in batches:
        tokens += count_label_tokens(batch)  # on the host batch
        batch = {k: v.to(device) for k, v in batch.items()}
        summed = loss_sum(model, batch, chunk_tokens)
        total = summed if total is None else total + summed  # summed on the device, read once at the end
    model.train(was_training)
    if world is not None and world.active:  # every rank ran as many batches (eval_batches' part)
        total = world.sum_(total if total is not None else torch.zeros((), device=device))
        (tokens,) = world.sum_counts(tokens)
    if tokens == 0 or total is None:
        return {}
    loss = float(total) / tokens
    return {"val_loss": loss, "val_ppl": math.exp(min(loss, 50.0)), "val_tokens": tokens}
