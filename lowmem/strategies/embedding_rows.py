"""Row-sparse embedding updates: the input embedding's gradient holds only the rows of the batch's tokens.

A dense embedding gradient is vocabulary × hidden (Llama-3's: 128256 × 4096 in bfloat16, 1 GiB) for the ~2K rows a
step touches. Under the fused strategy the input embedding's lookup is replaced by :class:`RowSparseLookup`, whose
backward sums the output gradient's positions by token (in float32, deterministically, with no host read) and
hands the distinct rows to the strategy, which updates the weight at once: no dense gradient exists.

Only where that is exact: for rules whose update is zero where the gradient is zero (``row_sparse_exact``: sgd,
adalomo, adafactor without beta1) the update from the rows equals the dense update, weight decay and the factored
statistics included (lowmem/ops/update_rows.py). Other rules, other strategies, a tied head (whose dense gradient
governs), a masked embedding or an embedding class other than ``torch.nn.Embedding`` keep the dense gradient, and
:func:`install` says why.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from lowmem.ops.update import math_dtype

def row_gradient(ids: torch.Tensor, grad_out: torch.Tensor, n_rows: int, padding_idx: int | None):
    """(rows, values): the embedding weight's gradient for the lookup of ``ids`` given the output gradient ``grad_out``,
    as its distinct rows (ascending) and their sums, each summed in the positions' order in the weight's math dtype
    (float32, or float64), as torch's dense embedding backward sums on the CPU (the same bits there). ``padding_idx``'s
    row gets no gradient, as in ``torch.nn.functional.embedding``.

    Both have one entry per position, whatever the number k of distinct rows: entries past k have the row ``n_rows``
    (no row: :func:`lowmem.ops.update_rows.row_slots` passes over it) and zero values. No shape depends on the data,
    so nothing is read on the host (the device is not waited for) and the planner's fake tensors count the bound."""
    width = grad_out.shape[-1]
    flat_ids = ids.reshape(-1)
    values = grad_out.reshape(-1, width).to(math_dtype(grad_out.dtype))
    if padding_idx is not None:
        values = values.masked_fill((flat_ids == padding_idx).unsqueeze(1), 0.0)
    sorted_ids, order = torch.sort(flat_ids, stable=True)  # stable: each row's positions stay in their order
    first = torch.ones_like(sorted_ids, dtype=torch.bool)
    first[1:] = sorted_ids[1:] != sorted_ids[:-1]
    segment = first.long().cumsum(0) - 1  # which distinct row each sorted position adds to
    lengths = torch.zeros_like(sorted_ids).scatter_add_(0, segment, torch.ones_like(sorted_ids))
    rows = torch.full_like(sorted_ids, n_rows).scatter_(0, segment, sorted_ids)
    # one sum per segment, each a sequential loop over its positions (deterministic on CUDA too: no atomics);
    # unsafe: the lengths are non-negative and add up to the positions by construction, and checking them would read
    # two values on the host (a wait for the device)
    return rows, torch.segment_reduce(values[order], "sum", lengths=lengths, axis=0, unsafe=True)


class RowSparseLookup(torch.autograd.Function):
    """``F.embedding(ids, weight)`` whose backward hands the weight's gradient to ``sink(rows, values)`` instead of
    accumulating it: the weight gets no ``.grad``."""

    @staticmethod
    def forward(ctx, ids, weight, padding_idx, sink):
        ctx.save_for_backward(ids)
        ctx.n_rows, ctx.padding_idx, ctx.sink = weight.shape[0], padding_idx, sink
        return F.embedding(ids, weight, padding_idx)

    @staticmethod
    def backward(ctx, grad_out):
        (ids,) = ctx.saved_tensors
        ctx.sink(*row_gradient(ids, grad_out, ctx.n_rows, ctx.padding_idx))
        return None, None, None, None


def refusal(model: torch.nn.Module, params: dict[str, torch.Tensor], rule, masks) -> str | None:
    """Why the input embedding keeps a dense gradient under this rule, or None when its rows can be updated alone."""
    embedding = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if type(embedding) is not torch.nn.Embedding:
        return f"the input embedding is a {type(embedding).__name__}, not a torch.nn.Embedding"
    if embedding.max_norm is not None or embedding.scale_grad_by_freq:
        return "the input embedding renormalizes rows (max_norm) or scales gradients by frequency"
    if not any(p is embedding.weight for p in params.values()):
        return "the input embedding does not train"
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is not None and getattr(head, "weight", None) is embedding.weight:
        return "the embedding is tied to the head, whose dense gradient governs"
    if not getattr(rule, "row_sparse_exact", False):
        return f"update.rule={rule.name} moves rows without a gradient"
    name = next(n for n, p in params.items() if p is embedding.weight)
    if masks and masks.get(name, embedding.weight) is not None:
        return "the input embedding is pruned (masked)"
    return None


def install(model: torch.nn.Module, params: dict[str, torch.Tensor], rule, masks, sink_for) -> tuple[str | None, str]:
    """Replace the input embedding's lookup by :class:`RowSparseLookup` when :func:`refusal` allows it; ``sink_for(name,
    param)`` makes the function its backward hands the rows to. Returns (the embedding's parameter name or None, one
    line for the log)."""
    reason = refusal(model, params, rule, masks)
    if reason is not None:
        return None, f"dense gradient ({reason})"
    embedding = model.get_input_embeddings()
    name = next(n for n, p in params.items() if p is embedding.weight)
    sink = sink_for(name, embedding.weight)

    def lookup(ids: torch.Tensor) -> torch.Tensor:
        return RowSparseLookup.apply(ids, embedding.weight, embedding.padding_idx, sink)

    embedding.forward = lookup
    return name, "row-sparse updates (the batch's rows only; no vocabulary-sized gradient)"


def uninstall(model: torch.nn.Module) -> None:
    """Give the input embedding back its own lookup."""
    embedding = model.get_input_embeddings()
    if "forward" in vars(embedding):
        del embedding.forward
