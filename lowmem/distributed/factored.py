"""Adafactor / AdaLomo on a parameter sharded by rows (FSDP2's Shard(0)): the one-process rule
(``lowmem.ops.update.factored_update_ref``, transformers' Adafactor operation for operation) with its four whole-tensor
quantities summed over the ranks.

A rank holds rows [a, b) of θ and of the reduced gradient g. Of the statistics of an R × C matrix:

    row means of g² + ε₁     the rank's own rows, complete on it (a mean over the columns it holds whole)
    column means of g² + ε₁  a sum over all R rows: partial column sums, all-reduced, / R
    mean of the row statistic (r's normaliser)      a sum over all rows: all-reduced, / R
    RMS(θ) (α's scale)       a sum of squares over every element: all-reduced
    RMS(update) (clipping)   the same, once the update is made: all-reduced

so a step costs two all-reduces of C + 2 and 1 numbers. A matrix is worked in row slices of about ``SLICE`` values,
so its float32 temporaries are a slice's, not the shard's. The column statistic is the same on every rank (replicated
state); the row statistic, and β₁'s first moment, are sharded as the parameter is. A vector (a norm's weight) keeps
its full second moment, sharded; its update's RMS and RMS(θ) are summed the same way.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from lowmem.ops.update import SLICE, factored_step_scalars, math_dtype, scaled_grad


@torch.no_grad()
def sharded_factored_update_(rule, param, grad: torch.Tensor, state: dict[str, torch.Tensor], lr: float,
                             grad_scale=1.0) -> None:
    """One step of the factored ``rule`` on the DTensor ``param`` (Shard(0)), from this rank's shard ``grad`` of the
    reduced gradient; ``state`` holds this rank's share (see the module docstring)."""
    if param.dim() > 2:
        from lowmem.errors import UserError

        raise UserError(f"distributed: {rule.name} on a {param.dim()}-D parameter sharded by rows is not supported "
                        "(its column statistic would span more than one dimension); use update.rule=adamw")
    state["step"] += 1
    if state["exp_avg_sq_col"].numel() > 0:
        _matrix_update_(rule, param, grad, state, lr, grad_scale)
    else:
        _vector_update_(rule, param, grad, state, lr, grad_scale)


def _row_slices(rows: int, cols: int) -> list[tuple[int, int]]:
    """Row ranges of about :data:`SLICE` values: a matrix's float32 temporaries exist one slice at a time (a shard of a
    128k-vocabulary head is 1 GiB in float32; a slice 64 MiB)."""
    step = max(1, SLICE // max(cols, 1))
    return [(start, min(start + step, rows)) for start in range(0, rows, step)]


def _matrix_update_(rule, param, grad, state, lr, grad_scale) -> None:
    """A matrix, in three passes over row slices of the shard: the statistics (then one all-reduce of C + 2 sums), the
    update's square sum (then one all-reduce), the update applied. The update of a slice is made twice, from the
    gradient, rather than kept whole (a matrix of one slice keeps it)."""
    shard = param.to_local()
    rows_total, numel = param.shape[0], param.numel()
    dtype = math_dtype(shard.dtype)
    beta2t, keep_new, rho = factored_step_scalars(state["step"], lr, rule.relative_step, rule.decay_rate, dtype)
    row, col = state["exp_avg_sq_row"], state["exp_avg_sq_col"]
    slices = _row_slices(*shard.shape)
    sums = torch.zeros(2 + col.numel(), dtype=dtype, device=shard.device)  # Σθ², Σ row statistic, column sums of g²
    for a, b in slices:
        g = scaled_grad(grad[a:b], grad_scale, dtype)
        sq = g * g
        row[a:b].mul_(beta2t).add_((sq.mean(dim=-1) + rule.eps1) * keep_new)
        sums[0] += shard[a:b].to(dtype).pow(2).sum()
        sums[2:] += sq.sum(dim=-2)
    sums[1] = row.sum()
    dist.all_reduce(sums)
    col.mul_(beta2t).add_((sums[2:] / rows_total + rule.eps1) * keep_new)
    row_mean, col_factor = sums[1] / rows_total, col.unsqueeze(-2).rsqrt()

    def update(a: int, b: int) -> torch.Tensor:
        r_factor = (row[a:b] / row_mean).rsqrt().unsqueeze(-1)
        return scaled_grad(grad[a:b], grad_scale, dtype) * (r_factor * col_factor)

    kept = update(*slices[0]) if len(slices) == 1 else None  # one slice: made once, kept for the last pass
    update_sq = sum((kept if kept is not None else update(a, b)).pow(2).sum() for a, b in slices) if slices \
        else sums.new_zeros(())
    dist.all_reduce(update_sq)
    clip = ((update_sq / numel).sqrt() / rule.clip_threshold).clamp(min=1.0)
    alpha = rho * (sums[0] / numel).sqrt().clamp(min=rule.eps2) if rule.scale_parameter else rho
    exp_avg = state.get("exp_avg")
    for a, b in slices:
        u = (kept if kept is not None else update(a, b)).div_(clip).mul_(alpha)
        if exp_avg is not None:
            exp_avg[a:b].mul_(rule.beta1).add_(u, alpha=1.0 - rule.beta1)
            u = exp_avg[a:b]
        _apply_(shard[a:b], u, alpha, rule.weight_decay, dtype)


def _vector_update_(rule, param, grad, state, lr, grad_scale) -> None:
    """A vector (a norm's weight: small), whole: its full second moment, sharded as it is."""
    shard = param.to_local()
    numel = param.numel()
    dtype = math_dtype(shard.dtype)
    beta2t, keep_new, rho = factored_step_scalars(state["step"], lr, rule.relative_step, rule.decay_rate, dtype)
    row = state["exp_avg_sq_row"]
    g = scaled_grad(grad, grad_scale, dtype)
    row.mul_(beta2t).add_((g * g + rule.eps1) * keep_new)
    param_sq = shard.to(dtype).pow(2).sum().reshape(1)
    dist.all_reduce(param_sq)
    update = row.rsqrt() * g
    update_sq = update.pow(2).sum()
    dist.all_reduce(update_sq)
    update.div_(((update_sq / numel).sqrt() / rule.clip_threshold).clamp(min=1.0))
    alpha = rho * (param_sq[0] / numel).sqrt().clamp(min=rule.eps2) if rule.scale_parameter else rho
    update.mul_(alpha)
    exp_avg = state.get("exp_avg")
    if exp_avg is not None:
        exp_avg.mul_(rule.beta1).add_(update, alpha=1.0 - rule.beta1)
        update = exp_avg
    _apply_(shard, update, alpha, rule.weight_decay, dtype)


def _apply_(shard: torch.Tensor, update: torch.Tensor, alpha, weight_decay: float, dtype: torch.dtype) -> None:
    """θ ← θ(1 − α·wd) − update, in the math dtype, written back into the shard."""
    work = shard.to(dtype, copy=True)
    if weight_decay and isinstance(alpha, torch.Tensor):
        work.addcmul_(work, alpha * -weight_decay)
    elif weight_decay:
        work.add_(work, alpha=-weight_decay * alpha)
    work.add_(-update)
    shard.copy_(work)
